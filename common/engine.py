"""The one training loop of medvl, on Accelerate.

Every pipeline hands ``fit`` a model, an optimizer, datasets and a small ``TrainTask`` (how to compute the
loss of a batch, how to validate, how to save the best model); the loop owns everything else: devices and
DDP, AMP, gradient accumulation and clipping, warm-up + cosine/step schedules, evaluation every epoch,
best-by-metric with a mode, early stopping, ``metrics.jsonl``, and checkpoints that ``--resume`` continues
exactly (model, optimizer, scheduler, RNG and the position in the epoch's data order).

Data reaches the model by one of two paths (``common.device_data``): a split held as tensors is moved to the
device once and batches are gathered there by index, augmented as whole batches; anything else goes through
DataLoader workers. The loop itself never waits for the device per step: the training loss is summed on the
device and read every ``log_every`` optimizer steps, at checkpoints and at the end of each epoch.

The learning-rate schedule always spans ``epochs``; ``max_steps`` only stops early, so a run stopped by
``max_steps`` (or killed) and resumed ends where an uninterrupted run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, send_to_device, set_seed
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from common import train_state
from common.checkpoint import (
    BEST_DIR,
    LAST_DIR,
    atomic_write_text,
    committed_dir,
    read_jsonl,
    recover_results,
    staged_dir,
    swap_dir,
)
from common.cli import (
    nonnegative_float,
    nonnegative_int,
    open_unit_interval,
    positive_float,
    positive_int,
    unit_interval,
)
from common.device import mixed_precision, pick_device
from common.device_data import EvalBatches, TrainBatches, default_num_workers, model_to_channels_last
from common.ema import WeightEMA
from common.errors import ConfigError, DataError
from common.pipelines import FLOOR_OUTPUTS, matching_outputs
from common.pipelines import run_outputs as pipeline_run_outputs
from common.run_guard import LOCK_FILE, run_lock

log = logging.getLogger("medvl.engine")

SCHEDULERS = ("cosine", "step", "constant")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    """Knobs of the training loop; pipelines fill it from their argparse namespace."""

    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    scheduler: str = "cosine"
    warmup_steps: int = 0
    step_size_epochs: int = 10
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0
    precision: str = "auto"
    device: str = "auto"
    monitor: str = "val_loss"
    mode: str = "min"
    patience: int | None = None
    eval_every: int = 1
    checkpoint_every: int | None = None
    max_steps: int | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    num_workers: int | None = None
    progress: bool = True
    log_every: int = 50
    data_on_device: bool | None = None
    channels_last: bool = False
    compile: str = "none"
    ema_decay: float | None = None
    """Validate and save an exponential moving average of the weights (``common.ema``) instead of the weights."""
    ema_warmup: bool = False
    """Lower the EMA decay over the first steps (``common.ema.WeightEMA``)."""
    cpu_bf16: bool = False
    """``--precision auto`` on a CPU with AMX-BF16 autocasts to bf16 (for models that gain from it, see
    ``common.device.mixed_precision``)."""

    def __post_init__(self) -> None:
        """The same rules as the flags' converters, for code that builds a TrainConfig directly."""
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("--scheduler", f"unknown scheduler {self.scheduler!r}; choose {', '.join(SCHEDULERS)}")
        if self.mode not in ("min", "max"):
            raise ConfigError("--mode", f"mode must be min or max, not {self.mode!r}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError("--compile", f"unknown mode {self.compile!r}; choose {', '.join(COMPILE_MODES)}")
        at_least = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "eval_every": 1, "step_size_epochs": 1,
                    "warmup_steps": 0, "num_workers": 0, "eval_batch_size": 1, "patience": 1, "checkpoint_every": 1,
                    "max_steps": 1, "log_every": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"--{name.replace('_', '-')}", f"expected an integer >= {low}, got {value!r}")
        if self.ema_decay is not None and (isinstance(self.ema_decay, bool) or not isinstance(
                self.ema_decay, int | float) or not 0 < self.ema_decay < 1):
            raise ConfigError("--ema-decay", f"expected a number strictly between 0 and 1, got {self.ema_decay!r}")
        for name, low, high in (("clip_grad_norm", 0, math.inf), ("step_gamma", 0, math.inf),
                                ("min_lr_ratio", 0, 1)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or not low <= value <= high or (
                    name != "min_lr_ratio" and value == 0):
                raise ConfigError(f"--{name.replace('_', '-')}", f"out of range: {value!r}")


class TrainTask(Protocol):
    """What a pipeline tells the loop about its problem.

    Both ``training_loss`` and ``validate`` receive batches already on the model's device (``validate`` iterates
    a ``DeviceBatches``, which also has ``.dataset`` and ``len``); training batches are already augmented when the
    dataset has a ``batch_augment``, and ``training_loss`` gets the ``torch.compile``d model under ``--compile``.
    ``metric_names`` lists the keys ``validate`` returns (without ``val_``) so that a wrong ``--monitor`` fails
    before training.
    """

    metric_names: tuple[str, ...]

    def training_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar loss of one (device-resident) batch."""

    def validate(self, model: torch.nn.Module, loader: DeviceBatches, device: torch.device) -> dict[str, float]:
        """Metrics on the validation set; must include the monitored key."""

    def save_best(self, model: torch.nn.Module, metrics: dict[str, float], directory: Path) -> None:
        """Write the best model into ``directory`` (a fresh folder the loop swaps in as ``best/`` whole)."""


class EpochTask(TrainTask, Protocol):
    """A task that recomputes something from the model once per epoch (optional methods, found by ``hasattr``).

    ``start_epoch`` runs before the epoch's first batch, without gradient and with the model in eval mode (e.g.
    the features of the whole training split, as LRFL's truncated nuclear norm needs). What it computes lives in
    ``task_tensors()``, which the loop saves with every checkpoint and hands back through ``load_task_tensors``
    on ``--resume``, so a run resumed in the middle of an epoch uses the epoch's own values, not recomputed ones.
    """

    def start_epoch(self, model: torch.nn.Module, epoch: int, device: torch.device) -> None: ...

    def task_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_task_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


class EpochSampler(Sampler[int]):
    """Data order that depends only on (seed, epoch): a resumed run sees exactly the batches it would have.

    Shards the permutation across processes (padding like DistributedSampler so every rank takes as many
    steps) and can start part-way through an epoch without loading the skipped samples.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        per_rank = math.ceil(self.size / self.world)
        order += order[: per_rank * self.world - self.size]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world) - self.skip

    def draws(self, count: int) -> torch.Tensor:
        """``count`` uniform numbers in [0, 1) per sample of this epoch, aligned with the iteration order.

        They are drawn for the whole padded permutation and sharded like it, so a sample's numbers depend only
        on (seed, epoch, position): a resumed run, and each of several processes, draw what one uninterrupted
        process draws for the same sample. Batch augmentation reads its randomness from here.
        """
        per_rank = math.ceil(self.size / self.world)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 0x5EED_0000_0000)
        values = torch.rand(per_rank * self.world, count, generator=gen)
        return values[self.rank :: self.world][self.skip :]


class _LoopState:
    """Counters saved with every checkpoint (``trainer.json``), type-checked when a resume reads them back."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_done = 0
        self.global_step = 0
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_evals = 0
        self.finished = False
        self.loss_sum = 0.0
        self.loss_count = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self.state_dict()
        if not isinstance(state, dict) or set(state) != set(expected):
            raise KeyError(f"loop state keys {sorted(state) if isinstance(state, dict) else state!r}")
        for key, value in state.items():
            default = expected[key]
            kind = (int, float) if isinstance(default, float) or default is None else type(default)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)):
                raise TypeError(f"loop state {key!r} is {value!r}")
            setattr(self, key, value)


@dataclass
class FitResult:
    """What ``fit`` ends with; ``completed`` is False when ``max_steps`` stopped it before the last epoch."""

    best_value: float | None
    best_epoch: int | None
    global_step: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    completed: bool = True
    epoch_seconds: list[float] = field(default_factory=list)
    """Wall time of the training batches of each epoch this call ran (no validation or checkpoints)."""

    def summary(self, monitor: str, run_dir: Path) -> str:
        """The line a training script prints at the end: the best epoch, or how to continue a stopped run."""
        if self.completed:
            return f"best {monitor} {self.best_value:.4f} at epoch {self.best_epoch}; model in {Path(run_dir) / 'best'}"
        return f"stopped at step {self.global_step} (--max-steps); continue with --resume"


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over all epochs, a step decay, or constant."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(config.warmup_steps, total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if config.scheduler == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if config.scheduler == "step":
            return config.step_gamma ** (step // max(1, config.step_size_epochs * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_output_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that would lose work: a file, or a previous run without ``--resume``/``--overwrite``.

    Reads only; nothing is written, so it can run before the data is loaded.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--output-dir", f"{run_dir} is a file, not a directory")
    if resume and overwrite:
        raise ConfigError("--overwrite", "cannot be combined with --resume")
    if resume:
        find_resume_dir(run_dir)
        return
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        if not overwrite:
            raise ConfigError("--output-dir", f"{run_dir} already holds a run; pass --resume to continue it or "
                                              "--overwrite to replace it")
        if not any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints", "best")):
            raise ConfigError("--overwrite", f"{run_dir} is not empty and is not a medvl run directory; choose a new "
                                             "or empty --output-dir")


def check_run_setup(config: TrainConfig, run_dir: Path) -> torch.device:
    """Everything about a training run that can be checked before its data is loaded: the device and precision
    exist here, and the run directory can be written without losing work. Returns the device."""
    device = pick_device(config.device)
    mixed_precision(config.precision, device, config.cpu_bf16)
    check_output_dir(run_dir, config.resume, config.overwrite)
    return device


RUN_OUTPUTS = FLOOR_OUTPUTS
"""What the loop itself writes; ``common.pipelines.run_outputs()`` adds what each declared pipeline writes."""


def _clear_run(run_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """``--overwrite``: remove what an earlier run wrote (and only that), once the new run has been validated: the
    loop's own outputs, ``extra`` (this run's ``run_files``) and every output a declared pipeline names
    (``common.pipelines``), so no result of the earlier model stays beside the new one."""
    for path in matching_outputs(run_dir, (*pipeline_run_outputs(), *extra)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


EMA_DIR = "ema"
"""Subfolder of a checkpoint holding the averaged weights (``--ema-decay``)."""


def _save_last(accelerator: Accelerator, model, optimizer, scheduler, state: _LoopState, run_dir: Path,
               identity: dict[str, Any], task: TrainTask, ema: WeightEMA | None = None) -> None:
    """Write the resumable state into a fresh folder, then swap it in: a kill never leaves half a checkpoint."""
    last = run_dir / LAST_DIR
    tmp = last.with_name("last.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        train_state.save_model_state(accelerator.unwrap_model(model), tmp)
        train_state.save_optimizer(optimizer, tmp)
        scaler = getattr(accelerator, "scaler", None)
        train_state.save_trainer(tmp, {"loop": state.state_dict(), "scheduler": scheduler.state_dict(),
                                       "scaler": scaler.state_dict() if scaler is not None else None,
                                       "num_processes": accelerator.num_processes, "identity": identity})
        if hasattr(task, "task_tensors"):
            train_state.save_task_tensors(task.task_tensors(), tmp)
        if ema is not None:
            (tmp / EMA_DIR).mkdir()
            train_state.save_model_state(ema.module, tmp / EMA_DIR)
    train_state.save_rng(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_dir(tmp, last)
    accelerator.wait_for_everyone()


def find_resume_dir(run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from; a missing one is a one-line error."""
    last = committed_dir(Path(run_dir) / LAST_DIR)
    if last.is_dir() and any(last.iterdir()):
        return last
    raise DataError(Path(run_dir) / LAST_DIR, "--resume given but there is no checkpoint to resume from (a run "
                                              "stopped before its first checkpoint starts again with --overwrite)")


RESUMABLE_CHANGES = ("max_steps", "progress", "num_workers", "device", "cache_dir", "checkpoint_every",
                     "eval_batch_size", "output_dir", "log_every", "data_on_device")
"""config.yaml keys ``--resume`` lets differ: they do not change which batches are drawn or how weights move."""


def _identity(config: TrainConfig, train_size: int, num_processes: int) -> dict[str, Any]:
    """The loop settings a resumed run must share with the interrupted one to end at the same weights."""
    keys = ("epochs", "batch_size", "grad_accum", "clip_grad_norm", "scheduler", "warmup_steps", "step_size_epochs",
            "step_gamma", "min_lr_ratio", "precision", "monitor", "mode", "patience", "eval_every", "seed",
            "channels_last", "compile", "ema_decay", "ema_warmup")
    return {**{k: getattr(config, k) for k in keys}, "train_size": train_size, "num_processes": num_processes}


def _check_resume(resume_dir: Path, saved: dict[str, Any], identity: dict[str, Any], run_dir: Path,
                  run_files: dict[str, str]) -> None:
    """Refuse a resume whose settings or data differ from the interrupted run's, naming what changed."""
    before = saved.get("identity") or {}
    fields = TrainConfig.__dataclass_fields__
    # A key the checkpoint predates had its default then (channels_last and compile came later).
    before = {k: before.get(k, fields[k].default if k in fields else None) for k in identity}
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in identity.items() if before.get(k) != v]
    for name, text in run_files.items():
        path = run_dir / name
        if not path.is_file():
            raise DataError(path, "missing or not a file: the interrupted run's settings cannot be checked")
        old = path.read_text(encoding="utf-8", errors="replace")
        if name.endswith((".yaml", ".yml")):
            try:
                old_cfg, new_cfg = yaml.safe_load(old) or {}, yaml.safe_load(text) or {}
            except yaml.YAMLError as err:
                raise DataError(path, f"not valid YAML ({str(err).splitlines()[0]})") from err
            if not isinstance(old_cfg, dict):
                raise DataError(path, "not a mapping of settings")
            keys = sorted((set(old_cfg) | set(new_cfg)) - set(RESUMABLE_CHANGES) - set(identity))
            changed += [f"{k} {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in keys
                        if old_cfg.get(k) != new_cfg.get(k)]
        elif old != text:
            changed.append(f"{name} (the data or its split changed)")
    if changed:
        raise ConfigError("--resume", f"settings differ from the interrupted run in {run_dir}: {'; '.join(changed)}. "
                                      "Resume with the original settings, or start a new run")


def _read_history(path: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` records, each with an integer ``step`` (what resume truncates by)."""
    if path.exists() and not path.is_file():
        raise DataError(path, "is not a file")
    records = read_jsonl(path) if path.is_file() else []
    for number, record in enumerate(records, 1):
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise DataError(path, f"record {number} has no integer 'step'")
    return records


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` whole (it is small): a kill never leaves a partial line."""
    atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in history))


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if mode == "min" else value > best


class DeviceBatches:
    """A validation loader whose batches arrive on the model's device, as ``training_loss`` receives them."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device, self.dataset = loader, device, loader.dataset

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield send_to_device(batch, self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.loader)


def make_accelerator(device: torch.device, precision: str) -> Accelerator:
    """An ``Accelerator`` for one run. Accelerate keeps one mixed-precision state per process and refuses a second
    run with another precision in the same process (an ablation, the speed benchmark, the test suite); that part
    of its state is reset then, while the process group (``PartialState``) is kept."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


def check_monitor(config: TrainConfig, task: TrainTask, has_val: bool) -> None:
    """Fail before any work when ``--monitor`` names a metric this task's validation never returns."""
    names = getattr(task, "metric_names", None)
    if not has_val:
        if config.monitor != "train_loss":
            raise ConfigError("--monitor", f"{config.monitor!r} needs a validation split, and this run has none")
        return
    if names is None:
        return
    known = sorted({f"val_{n}" for n in names} | {"train_loss"})
    if config.monitor not in known:
        raise ConfigError("--monitor", f"unknown metric {config.monitor!r}; this task reports {', '.join(known)}")


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_dataset: Dataset,
        val_dataset: Dataset | None, task: TrainTask, config: TrainConfig, run_dir: Path,
        collate_fn: Callable | None = None, run_files: dict[str, str] | None = None) -> FitResult:
    """Train ``model`` and keep the best checkpoint by ``config.monitor`` (see ``_fit``), holding the run
    directory's lock (``common.run_guard``) throughout: one writer per run, also when called from code."""
    with run_lock(Path(run_dir), "--output-dir", create=True):
        return _fit(model, optimizer, train_dataset, val_dataset, task, config, run_dir, collate_fn, run_files)


def _fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    task: TrainTask,
    config: TrainConfig,
    run_dir: Path,
    collate_fn: Callable | None = None,
    run_files: dict[str, str] | None = None,
) -> FitResult:
    """Train ``model`` and keep the best checkpoint by ``config.monitor``; see the module docstring.

    Everything is checked before the run directory is touched: the data is not empty, the monitored metric
    exists, the directory is fresh (or ``overwrite``), and on ``resume`` the checkpoint is readable and the
    settings and ``run_files`` match the interrupted run's. ``run_files`` (``config.yaml``, ``split.csv`` ...)
    are then written for a new run, or compared with the saved ones on resume and left as they are.
    """
    run_dir = Path(run_dir)
    run_files = dict(run_files or {})
    if len(train_dataset) == 0:
        raise DataError("training data", "the training split is empty; nothing to train on")
    if val_dataset is not None and len(val_dataset) == 0:
        raise DataError("validation data", "the validation split is empty")
    check_monitor(config, task, val_dataset is not None)
    device = check_run_setup(config, run_dir)
    accelerator = make_accelerator(device, mixed_precision(config.precision, device, config.cpu_bf16))
    identity = _identity(config, len(train_dataset), accelerator.num_processes)
    saved_state = None
    if config.resume:
        resume_dir = find_resume_dir(run_dir)
        saved_state = train_state.load_trainer(resume_dir)
        if saved_state["num_processes"] != accelerator.num_processes:
            raise ConfigError("--resume", f"the checkpoint was written by {saved_state['num_processes']} process(es), "
                                          f"this run has {accelerator.num_processes}; resume with the same number")
        _check_resume(resume_dir, saved_state, identity, run_dir, run_files)
    set_seed(config.seed)
    state = _LoopState()
    sampler = EpochSampler(len(train_dataset), config.seed, True, accelerator.process_index, accelerator.num_processes)
    batches_per_epoch = math.ceil(len(train_dataset) / accelerator.num_processes / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    if config.channels_last:
        model_to_channels_last(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The compiled module runs the training steps only; validation, hooks and checkpoints use the eager model.
    train_model = model if config.compile == "none" else torch.compile(model, mode=config.compile)
    workers = config.num_workers if config.num_workers is not None else default_num_workers(
        accelerator.device, accelerator.num_processes)
    train_batches = TrainBatches(train_dataset, sampler, config.batch_size, accelerator.device,
                                 collate_fn=collate_fn, num_workers=workers, on_device=config.data_on_device,
                                 channels_last=config.channels_last)
    val_batches = None
    if val_dataset is not None:
        val_batches = EvalBatches(val_dataset, config.eval_batch_size or config.batch_size, accelerator.device,
                                  collate_fn=collate_fn, num_workers=workers, on_device=config.data_on_device)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    ema = WeightEMA(accelerator.unwrap_model(model), config.ema_decay, config.ema_warmup) if config.ema_decay else None

    metrics_path = run_dir / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if config.resume:
        train_state.load_model_state(accelerator.unwrap_model(model), resume_dir)
        if ema is not None:
            train_state.load_model_state(ema.module, resume_dir / EMA_DIR)
        train_state.load_optimizer(optimizer, resume_dir)
        _match_parameter_layout(optimizer)
        try:
            scheduler.load_state_dict(saved_state["scheduler"])
            state.load_state_dict(saved_state["loop"])
            scaler = getattr(accelerator, "scaler", None)
            if scaler is not None and saved_state.get("scaler"):
                scaler.load_state_dict(saved_state["scaler"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(resume_dir / train_state.TRAINER_JSON, f"does not load ({type(err).__name__}: {err})") \
                from err
        train_state.load_rng(resume_dir, accelerator.process_index)
        if hasattr(task, "load_task_tensors"):
            try:
                task.load_task_tensors(train_state.load_task_tensors(resume_dir))
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(resume_dir / train_state.TASK_TENSORS, f"does not fit this run ({err})") from err
        history = [r for r in _read_history(metrics_path) if r["step"] <= state.global_step]
        if accelerator.is_main_process:
            recover_results(run_dir)
            _write_history(metrics_path, history)
        log.info("resumed from %s at epoch %d, step %d", resume_dir, state.epoch, state.global_step)
    elif accelerator.is_main_process:
        if config.overwrite:
            _clear_run(run_dir, tuple(run_files))
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in run_files.items():
            atomic_write_text(run_dir / name, text)
    accelerator.wait_for_everyone()
    _attach_log_file(run_dir / "train.log", accelerator.is_main_process)
    log.info("training data: %s", train_batches.describe())

    def save_last() -> None:
        _save_last(accelerator, model, optimizer, scheduler, state, run_dir, identity, task, ema)

    def read_loss(loss_sum: torch.Tensor, epoch: int) -> float:
        """Read the device's running loss sum into the loop state (the loop's only wait for the device)."""
        value = float(loss_sum)
        if not math.isfinite(value):
            raise DataError(run_dir, f"training loss became {value} in epoch {epoch + 1} (by step "
                                     f"{state.global_step}); lower --lr or check the data")
        state.loss_sum = value
        return value

    stopped_early = False
    hit_max_steps = False
    epoch_seconds: list[float] = []
    start = time.time()
    # float64 keeps the sum as exact as the per-batch Python floats it replaces; MPS has no float64.
    sum_dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64
    while not state.finished and state.epoch < config.epochs:
        epoch = state.epoch
        sampler.set_epoch(epoch, skip=state.batches_done * config.batch_size)
        if state.batches_done == 0 and hasattr(task, "start_epoch"):
            _start_epoch(accelerator, model, task, epoch)
        model.train()
        bar = tqdm(total=batches_per_epoch, initial=state.batches_done, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and accelerator.is_local_main_process), leave=False)
        # The running sum lives on the device and continues the checkpointed one, so a resumed run adds the same
        # numbers in the same order as an uninterrupted one.
        loss_sum = torch.tensor(state.loss_sum, dtype=sum_dtype, device=accelerator.device)
        epoch_start, paused = time.perf_counter(), 0.0
        for batch in train_batches:
            index = state.batches_done
            group_end = min(batches_per_epoch, (index // config.grad_accum + 1) * config.grad_accum)
            group_size = group_end - (index // config.grad_accum) * config.grad_accum
            is_step = index + 1 == group_end
            context = accelerator.no_sync(model) if not is_step else contextlib.nullcontext()
            with context, accelerator.autocast():
                try:
                    loss = task.training_loss(train_model, batch)
                except ValueError as err:
                    if "Expected more than 1 value per channel" not in str(err):
                        raise
                    raise ConfigError("--batch-size", f"{len(train_dataset)} training samples leave a last batch "
                                                      "BatchNorm cannot train on (one sample); choose another "
                                                      "batch size") from err
            accelerator.backward(loss / group_size)
            loss_sum += loss.detach().reshape(())
            state.loss_count += 1
            state.batches_done += 1
            bar.update(1)
            if is_step:
                if config.clip_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), state.global_step)
                if state.global_step % config.log_every == 0:
                    mean = read_loss(loss_sum, epoch) / state.loss_count
                    bar.set_postfix(loss=f"{mean:.4f}")
                    log.debug("step %d: running train_loss %.4f", state.global_step, mean)
                if config.max_steps is not None and state.global_step >= config.max_steps:
                    hit_max_steps = True
                    break
                if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
                    read_loss(loss_sum, epoch)
                    saving = time.perf_counter()
                    save_last()
                    paused += time.perf_counter() - saving
        read_loss(loss_sum, epoch)
        epoch_seconds.append(time.perf_counter() - epoch_start - paused)
        bar.close()
        if hit_max_steps and state.batches_done < batches_per_epoch:
            save_last()
            log.info("stopped at --max-steps %d (epoch %d, batch %d); --resume continues", state.global_step,
                     epoch + 1, state.batches_done)
            break

        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.global_step,
                                  "train_loss": state.loss_sum / max(1, state.loss_count),
                                  "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - start, 2)}
        evaluated = val_batches is not None and (epoch + 1) % config.eval_every == 0
        if evaluated:
            record.update(_validate(accelerator, ema.module if ema is not None else model, val_batches, task))
        if evaluated or val_batches is None:
            value = record.get(config.monitor)
            if value is None:
                raise ConfigError("--monitor", f"validation returned no {config.monitor!r} (has {sorted(record)})")
            if _improved(float(value), state.best_value, config.mode):
                state.best_value, state.best_epoch, state.bad_evals = float(value), epoch + 1, 0
                if accelerator.is_main_process:
                    with staged_dir(run_dir / BEST_DIR) as staged:
                        task.save_best(ema.module if ema is not None else accelerator.unwrap_model(model), record,
                                       staged)
                record["is_best"] = True
            else:
                state.bad_evals += 1
            if config.patience is not None and state.bad_evals >= config.patience:
                stopped_early = True
        state.epoch, state.batches_done, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
        state.finished = stopped_early or state.epoch >= config.epochs
        if accelerator.is_main_process:
            history.append(record)
            _write_history(metrics_path, history)
            log.info("epoch %d: %s", epoch + 1, _format_record(record))
        save_last()
        if stopped_early:
            log.info("early stop: %s has not improved for %d evaluations", config.monitor, config.patience)
        if hit_max_steps:
            break
    accelerator.wait_for_everyone()
    completed = state.finished
    if completed and state.best_value is None:
        raise DataError(metrics_path, f"{config.monitor} was never a finite number, so no best model was saved; "
                                      "check the validation data or choose another --monitor")
    return FitResult(state.best_value, state.best_epoch, state.global_step, stopped_early, history, completed,
                     epoch_seconds)


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor its parameter's memory layout again (checkpoints store contiguous
    copies). Fused optimizers pair elements in memory order, so a channels-last weight beside a contiguous moment
    would be updated from the wrong elements."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _start_epoch(accelerator: Accelerator, model, task: EpochTask, epoch: int) -> None:
    """Every process runs the hook (each needs its result); RNG is restored so data order and dropout are unchanged."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    rng = torch.get_rng_state()
    with torch.no_grad(), accelerator.autocast():
        task.start_epoch(unwrapped, epoch, accelerator.device)
    torch.set_rng_state(rng)
    unwrapped.train()


def _validate(accelerator: Accelerator, model, loader: EvalBatches, task: TrainTask) -> dict[str, float]:
    """Validate on the main process over the whole set (no padded duplicates), then share the numbers."""
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        rng = torch.get_rng_state()
        with torch.no_grad(), accelerator.autocast():
            metrics = task.validate(unwrapped, DeviceBatches(loader, accelerator.device), accelerator.device)
        torch.set_rng_state(rng)
        unwrapped.train()
        payload = [{f"val_{k}" if not k.startswith("val_") else k: float(v) for k, v in metrics.items()}]
    if accelerator.num_processes > 1:
        broadcast_object_list(payload)
    return payload[0]


def _format_record(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _attach_log_file(path: Path, main_process: bool) -> None:
    if not main_process:
        return
    root = logging.getLogger("medvl")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)


def config_from_args(args, **overrides: Any) -> TrainConfig:
    """Build a TrainConfig from an argparse namespace that used ``add_train_args``."""
    names = {f for f in TrainConfig.__dataclass_fields__}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values.update(overrides)
    return TrainConfig(**values)


def add_train_args(parser, *, epochs: int, batch_size: int, lr: float, monitor: str, mode: str,
                   scheduler: str = "cosine", weight_decay: float = 0.0) -> None:
    """Training and resume flags shared by all pipelines, with each pipeline's own defaults.

    A training script's parent parser should opt into ``output_dir``, ``seed``, ``device`` and ``precision``.
    """
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=epochs)
    group.add_argument("--batch-size", type=positive_int, default=batch_size)
    group.add_argument("--eval-batch-size", type=positive_int, default=None)
    group.add_argument("--lr", type=positive_float, default=lr)
    group.add_argument("--weight-decay", type=nonnegative_float, default=weight_decay)
    group.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    group.add_argument("--clip-grad-norm", type=positive_float, default=None)
    group.add_argument("--scheduler", choices=SCHEDULERS, default=scheduler)
    group.add_argument("--warmup-steps", type=nonnegative_int, default=0)
    group.add_argument("--min-lr-ratio", type=unit_interval, default=0.0)
    group.add_argument("--ema-decay", type=open_unit_interval, default=None,
                       help="validate, pick the best epoch by and save an exponential moving average of the weights "
                            "with this decay per optimizer step (e.g. 0.99); off by default")
    group.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=False,
                       help="use the decay min(d, (1 + t) / (10 + t)) at step t, so the average does not keep the "
                            "random initialisation for hundreds of steps")
    group.add_argument("--monitor", default=monitor, help="validation metric that picks the best epoch")
    group.add_argument("--mode", choices=["min", "max"], default=mode)
    group.add_argument("--patience", type=positive_int, default=None,
                       help="early stop after this many evals without gain")
    group.add_argument("--checkpoint-every", type=positive_int, default=None,
                       help="also checkpoint every N optimizer steps")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--log-every", type=positive_int, default=50,
                       help="optimizer steps between reads of the running training loss (each read waits for the "
                            "device)")
    group = parser.add_argument_group("speed")
    group.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None,
                       help="hold tensor datasets on the training device and gather batches there (default: when "
                            "the split fits in half the device's free memory)")
    group.add_argument("--num-workers", type=nonnegative_int, default=None,
                       help="DataLoader workers for data not held on the device (default: 0 on CPU, else up to 4 "
                            "per process)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                       help="convolution weights and image batches in channels-last layout")
    group.add_argument("--compile", choices=COMPILE_MODES, default="none",
                       help="torch.compile the training steps with this mode")
    group = parser.add_argument_group("resume")
    group.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/last")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output-dir (without it, a non-empty run dir is refused)")
    group.add_argument("--max-steps", type=positive_int, default=None,
                       help="stop after this many optimizer steps (the schedule still spans --epochs)")


__all__ = ["TrainConfig", "TrainTask", "EpochTask", "FitResult", "fit", "add_train_args", "config_from_args",
           "EpochSampler", "build_scheduler", "find_resume_dir", "check_output_dir", "check_run_setup", "check_monitor",
           "DeviceBatches", "COMPILE_MODES"]
