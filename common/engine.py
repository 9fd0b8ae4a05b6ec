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
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, send_to_device, set_seed
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

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
from common.run_guard import run_lock
from common.rundir import resume
from common.rundir.files import atomic_write_text
from common.rundir.layout import BEST_DIR, HISTORY_FILE, LOG_FILE, read_history, write_history
from common.rundir.policy import check_output_dir, clear_run
from common.rundir.resume import check_resume, find_resume_dir, identity, save_last
from common.rundir.swap import recover_results, staged_dir

log = logging.getLogger("medvl.engine")

SCHEDULERS = ("cosine", "step", "constant")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def _knob(default: Any, help: str, *, type: Callable[[Any], Any] | None = None,  # noqa: A002
          choices: tuple[str, ...] | None = None, group: str | None = "training") -> Any:
    """A ``TrainConfig`` field and its flag in one place: ``add_train_args`` makes the flag from this (``group``
    None: the flag comes from ``common.cli.base_parser``), ``__post_init__`` checks values with the same ``type``."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "group": group})


@dataclass
class TrainConfig:
    """Knobs of the training loop, each with its flag (``add_train_args``); pipelines fill it from their argparse
    namespace with ``config_from_args``. A pipeline changes a default by passing it to ``add_train_args``."""

    epochs: int = _knob(10, "passes over the training split (the schedule always spans them)", type=positive_int)
    batch_size: int = _knob(32, "samples per micro-batch (per process)", type=positive_int)
    eval_batch_size: int | None = _knob(None, "samples per validation batch (default: --batch-size)",
                                        type=positive_int)
    lr: float | None = _knob(1e-3, "peak learning rate of the optimizer the script builds", type=positive_float)
    weight_decay: float = _knob(0.0, "decoupled weight decay of the optimizer the script builds",
                                type=nonnegative_float)
    grad_accum: int = _knob(1, "micro-batches per optimizer step", type=positive_int)
    clip_grad_norm: float | None = _knob(None, "clip the gradient's global norm to this (default: no clipping)",
                                         type=positive_float)
    scheduler: str = _knob("cosine", "learning-rate schedule after the warm-up: cosine decay to --min-lr-ratio, "
                                     "step decay (--step-size-epochs, --step-gamma) or constant", choices=SCHEDULERS)
    warmup_steps: int = _knob(0, "optimizer steps of linear warm-up from 0 to --lr", type=nonnegative_int)
    step_size_epochs: int = _knob(10, "--scheduler step: epochs between decays", type=positive_int)
    step_gamma: float = _knob(0.1, "--scheduler step: factor the learning rate is multiplied by at each decay",
                              type=positive_float)
    min_lr_ratio: float = _knob(0.0, "--scheduler cosine: final learning rate as a fraction of --lr",
                                type=unit_interval)
    precision: str = _knob("auto", "autocast dtype", group=None)
    device: str = _knob("auto", "training device", group=None)
    monitor: str = _knob("val_loss", "validation metric that picks the best epoch")
    mode: str = _knob("min", "whether a larger (max) or smaller (min) --monitor is better", choices=("min", "max"))
    patience: int | None = _knob(None, "early stop after this many evals without gain", type=positive_int)
    eval_every: int = _knob(1, "validate (and consider the epoch for the best model) after every N-th epoch",
                            type=positive_int)
    checkpoint_every: int | None = _knob(None, "also checkpoint every N optimizer steps", type=positive_int)
    max_steps: int | None = _knob(None, "stop after this many optimizer steps (the schedule still spans --epochs)",
                                  type=positive_int, group="resume")
    seed: int = _knob(0, "seed of every random choice", group=None)
    resume: bool = _knob(False, "continue from <output-dir>/checkpoints/last", group="resume")
    overwrite: bool = _knob(False, "replace the run already in --output-dir (without it, a non-empty run dir is "
                                   "refused)", group="resume")
    num_workers: int | None = _knob(None, "DataLoader workers for data not held on the device (default: 0 on CPU, "
                                          "else up to 4 per process)", type=nonnegative_int, group="speed")
    progress: bool = _knob(True, "show a progress bar per epoch")
    log_every: int = _knob(50, "optimizer steps between reads of the running training loss (each read waits for "
                               "the device)", type=positive_int)
    data_on_device: bool | None = _knob(None, "hold tensor datasets on the training device and gather batches there "
                                              "(default: when the split fits in half the device's free memory)",
                                        group="speed")
    channels_last: bool = _knob(False, "convolution weights and image batches in channels-last layout",
                                group="speed")
    compile: str = _knob("none", "torch.compile the training steps with this mode", choices=COMPILE_MODES,
                         group="speed")
    ema_decay: float | None = _knob(None, "validate, pick the best epoch by and save an exponential moving average "
                                          "of the weights with this decay per optimizer step (e.g. 0.99; common.ema)",
                                    type=open_unit_interval)
    ema_warmup: bool = _knob(False, "--ema-decay: use min(decay, (1 + t) / (10 + t)) at step t, so the average does "
                                    "not keep the random initialisation for hundreds of steps")
    cpu_bf16: bool = _knob(False, "--precision auto autocasts to bf16 on CPUs with AMX-BF16 (for models that gain "
                                  "from it; see common.device.mixed_precision)", group="speed")

    def __post_init__(self) -> None:
        """The flags' own converters and choices, for code that builds a TrainConfig directly."""
        for spec in fields(self):
            value, flag = getattr(self, spec.name), f"--{spec.name.replace('_', '-')}"
            convert, choices = spec.metadata["type"], spec.metadata["choices"]
            if value is None:
                continue
            if choices is not None and value not in choices:
                raise ConfigError(flag, f"unknown value {value!r}; choose {', '.join(choices)}")
            if convert is not None:
                if isinstance(value, bool | str):
                    raise ConfigError(flag, f"expected a number, got {value!r}")
                try:
                    convert(value)
                except argparse.ArgumentTypeError as err:
                    raise ConfigError(flag, str(err)) from None


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


def check_run_setup(config: TrainConfig, run_dir: Path) -> torch.device:
    """Everything about a training run that can be checked before its data is loaded: the device and precision
    exist here, and the run directory can be written without losing work. Returns the device."""
    device = pick_device(config.device)
    mixed_precision(config.precision, device, config.cpu_bf16)
    check_output_dir(run_dir, config.resume, config.overwrite)
    return device


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
        *, run_files: dict[str, str] | None = None) -> FitResult:
    """Train ``model`` and keep the best checkpoint by ``config.monitor`` (see ``_fit``), holding the run
    directory's lock (``common.run_guard``) throughout: one writer per run, also when called from code."""
    with run_lock(Path(run_dir), "--output-dir", create=True):
        return _fit(model, optimizer, train_dataset, val_dataset, task, config, run_dir, run_files)


def _fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    task: TrainTask,
    config: TrainConfig,
    run_dir: Path,
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
    run_identity = identity(config, len(train_dataset), accelerator.num_processes)
    resume_dir = saved_state = None
    if config.resume:
        resume_dir = find_resume_dir(run_dir)
        saved_state = resume.load_trainer(resume_dir)
        if saved_state["num_processes"] != accelerator.num_processes:
            raise ConfigError("--resume", f"the checkpoint was written by {saved_state['num_processes']} process(es), "
                                          f"this run has {accelerator.num_processes}; resume with the same number")
        check_resume(resume_dir, saved_state, run_identity, run_dir, run_files,
                     {spec.name: spec.default for spec in fields(TrainConfig)})
    set_seed(config.seed)
    loop = _Loop(accelerator, model, optimizer, train_dataset, val_dataset, task, config, run_dir, run_identity)
    if resume_dir is not None:
        loop.restore(resume_dir, saved_state)
    else:
        loop.start(run_files)
    accelerator.wait_for_everyone()
    _attach_log_file(run_dir / LOG_FILE, accelerator.is_main_process)
    log.info("training data: %s", loop.train_batches.describe())
    return loop.run()


class _Loop:
    """One call of ``fit`` once everything is checked: the prepared model, optimizer, batches and schedule, and the
    loop's steps (``restore`` or ``start``, then ``run``: ``train_epoch`` and ``end_epoch`` per epoch)."""

    def __init__(self, accelerator: Accelerator, model, optimizer, train_dataset: Dataset,
                 val_dataset: Dataset | None, task: TrainTask, config: TrainConfig, run_dir: Path,
                 run_identity: dict[str, Any]):
        self.accelerator, self.task, self.config, self.run_dir = accelerator, task, config, run_dir
        self.identity, self.train_size = run_identity, len(train_dataset)
        self.state = _LoopState()
        self.sampler = EpochSampler(len(train_dataset), config.seed, True, accelerator.process_index,
                                    accelerator.num_processes)
        self.batches_per_epoch = math.ceil(len(train_dataset) / accelerator.num_processes / config.batch_size)
        steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        if config.channels_last:
            model_to_channels_last(model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # The compiled module runs the training steps only; validation, hooks and checkpoints use the eager model.
        self.train_model = self.model if config.compile == "none" else torch.compile(self.model, mode=config.compile)
        workers = config.num_workers if config.num_workers is not None else default_num_workers(
            accelerator.device, accelerator.num_processes)
        self.train_batches = TrainBatches(train_dataset, self.sampler, config.batch_size, accelerator.device,
                                          num_workers=workers, on_device=config.data_on_device,
                                          channels_last=config.channels_last)
        self.val_batches = None
        if val_dataset is not None:
            self.val_batches = EvalBatches(val_dataset, config.eval_batch_size or config.batch_size,
                                           accelerator.device, num_workers=workers, on_device=config.data_on_device)
        self.scheduler = build_scheduler(self.optimizer, config, steps_per_epoch)
        self.ema = (WeightEMA(accelerator.unwrap_model(self.model), config.ema_decay, config.ema_warmup)
                    if config.ema_decay else None)
        self.metrics_path = run_dir / HISTORY_FILE
        self.history: list[dict[str, Any]] = []
        self.stopped_early = self.hit_max_steps = False
        self.epoch_seconds: list[float] = []
        # float64 keeps the sum as exact as the per-batch Python floats it replaces; MPS has no float64.
        self.sum_dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64
        self.start_time = time.time()

    def restore(self, resume_dir: Path, saved_state: dict[str, Any]) -> None:
        """``--resume``: model, optimizer, schedule, loop counters, scaler, RNG and task tensors as checkpointed, and
        the history cut back to the checkpoint's step."""
        accelerator, state = self.accelerator, self.state
        resume.load_last_model(accelerator.unwrap_model(self.model), resume_dir)
        if self.ema is not None:
            resume.load_last_model(self.ema.module, resume_dir / resume.EMA_DIR)
        resume.load_optimizer(self.optimizer, resume_dir)
        _match_parameter_layout(self.optimizer)
        try:
            self.scheduler.load_state_dict(saved_state["scheduler"])
            state.load_state_dict(saved_state["loop"])
            scaler = getattr(accelerator, "scaler", None)
            if scaler is not None and saved_state.get("scaler"):
                scaler.load_state_dict(saved_state["scaler"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(resume_dir / resume.TRAINER_JSON, f"does not load ({type(err).__name__}: {err})") \
                from err
        resume.load_rng(resume_dir, accelerator.process_index)
        if hasattr(self.task, "load_task_tensors"):
            try:
                self.task.load_task_tensors(resume.load_task_tensors(resume_dir))
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(resume_dir / resume.TASK_TENSORS, f"does not fit this run ({err})") from err
        self.history = [r for r in read_history(self.metrics_path) if r["step"] <= state.global_step]
        if accelerator.is_main_process:
            recover_results(self.run_dir)
            write_history(self.metrics_path, self.history)
        log.info("resumed from %s at epoch %d, step %d", resume_dir, state.epoch, state.global_step)

    def start(self, run_files: dict[str, str]) -> None:
        """A new run: an earlier one cleared (``--overwrite``), then the run's files written."""
        if self.accelerator.is_main_process:
            if self.config.overwrite:
                clear_run(self.run_dir, tuple(run_files))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for name, text in run_files.items():
                atomic_write_text(self.run_dir / name, text)

    def run(self) -> FitResult:
        """Epochs until the last, an early stop or ``max_steps``; the result."""
        state = self.state
        while not state.finished and state.epoch < self.config.epochs:
            epoch = state.epoch
            self.train_epoch(epoch)
            if self.hit_max_steps and state.batches_done < self.batches_per_epoch:
                self.save_last()
                log.info("stopped at --max-steps %d (epoch %d, batch %d); --resume continues", state.global_step,
                         epoch + 1, state.batches_done)
                break
            self.end_epoch(epoch)
            if self.hit_max_steps:
                break
        self.accelerator.wait_for_everyone()
        completed = state.finished
        if completed and state.best_value is None:
            raise DataError(self.metrics_path, f"{self.config.monitor} was never a finite number, so no best model was "
                                               "saved; check the validation data or choose another --monitor")
        return FitResult(state.best_value, state.best_epoch, state.global_step, self.stopped_early, self.history,
                         completed, self.epoch_seconds)

    def evaluated_model(self) -> torch.nn.Module:
        """What validation sees and ``best/`` holds: the weights' moving average under ``--ema-decay``."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    def save_last(self) -> None:
        save_last(self.accelerator, self.model, self.optimizer, self.scheduler, self.state, self.run_dir,
                  self.identity, self.task, self.ema.module if self.ema is not None else None)

    def read_loss(self, loss_sum: torch.Tensor, epoch: int) -> float:
        """Read the device's running loss sum into the loop state (the loop's only wait for the device)."""
        value = float(loss_sum)
        if not math.isfinite(value):
            raise DataError(self.run_dir, f"training loss became {value} in epoch {epoch + 1} (by step "
                                          f"{self.state.global_step}); lower --lr or check the data")
        self.state.loss_sum = value
        return value

    def train_epoch(self, epoch: int) -> None:
        """The epoch's training batches from where the loop state stands (mid-epoch after a resume), with gradient
        accumulation, clipping, the schedule, periodic checkpoints and ``max_steps``."""
        accelerator, config, state, model = self.accelerator, self.config, self.state, self.model
        self.sampler.set_epoch(epoch, skip=state.batches_done * config.batch_size)
        if state.batches_done == 0 and hasattr(self.task, "start_epoch"):
            _start_epoch(accelerator, model, self.task, epoch)
        model.train()
        bar = tqdm(total=self.batches_per_epoch, initial=state.batches_done, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and accelerator.is_local_main_process), leave=False)
        # The running sum lives on the device and continues the checkpointed one, so a resumed run adds the same
        # numbers in the same order as an uninterrupted one.
        loss_sum = torch.tensor(state.loss_sum, dtype=self.sum_dtype, device=accelerator.device)
        epoch_start, paused = time.perf_counter(), 0.0
        for batch in self.train_batches:
            index = state.batches_done
            group_end = min(self.batches_per_epoch, (index // config.grad_accum + 1) * config.grad_accum)
            group_size = group_end - (index // config.grad_accum) * config.grad_accum
            is_step = index + 1 == group_end
            context = accelerator.no_sync(model) if not is_step else contextlib.nullcontext()
            with context, accelerator.autocast():
                try:
                    loss = self.task.training_loss(self.train_model, batch)
                except ValueError as err:
                    if "Expected more than 1 value per channel" not in str(err):
                        raise
                    raise ConfigError("--batch-size", f"{self.train_size} training samples leave a last batch "
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
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.accelerator.unwrap_model(self.model), state.global_step)
                if state.global_step % config.log_every == 0:
                    mean = self.read_loss(loss_sum, epoch) / state.loss_count
                    bar.set_postfix(loss=f"{mean:.4f}")
                    log.debug("step %d: running train_loss %.4f", state.global_step, mean)
                if config.max_steps is not None and state.global_step >= config.max_steps:
                    self.hit_max_steps = True
                    break
                if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
                    self.read_loss(loss_sum, epoch)
                    saving = time.perf_counter()
                    self.save_last()
                    paused += time.perf_counter() - saving
        self.read_loss(loss_sum, epoch)
        self.epoch_seconds.append(time.perf_counter() - epoch_start - paused)
        bar.close()

    def end_epoch(self, epoch: int) -> None:
        """Validate (every ``eval_every`` epochs), keep the best model, count towards early stopping, append the
        epoch's record to the history and checkpoint."""
        accelerator, config, state = self.accelerator, self.config, self.state
        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.global_step,
                                  "train_loss": state.loss_sum / max(1, state.loss_count),
                                  "lr": self.scheduler.get_last_lr()[0],
                                  "elapsed_s": round(time.time() - self.start_time, 2)}
        evaluated = self.val_batches is not None and (epoch + 1) % config.eval_every == 0
        if evaluated:
            record.update(_validate(accelerator, self.evaluated_model(), self.val_batches, self.task))
        if evaluated or self.val_batches is None:
            value = record.get(config.monitor)
            if value is None:
                raise ConfigError("--monitor", f"validation returned no {config.monitor!r} (has {sorted(record)})")
            if _improved(float(value), state.best_value, config.mode):
                state.best_value, state.best_epoch, state.bad_evals = float(value), epoch + 1, 0
                if accelerator.is_main_process:
                    with staged_dir(self.run_dir / BEST_DIR) as staged:
                        self.task.save_best(self.evaluated_model(), record, staged)
                record["is_best"] = True
            else:
                state.bad_evals += 1
            if config.patience is not None and state.bad_evals >= config.patience:
                self.stopped_early = True
        state.epoch, state.batches_done, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
        state.finished = self.stopped_early or state.epoch >= config.epochs
        if accelerator.is_main_process:
            self.history.append(record)
            write_history(self.metrics_path, self.history)
            log.info("epoch %d: %s", epoch + 1, _format_record(record))
        self.save_last()
        if self.stopped_early:
            log.info("early stop: %s has not improved for %d evaluations", config.monitor, config.patience)


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
    """Build a TrainConfig from an argparse namespace that used ``add_train_args`` (``overrides`` win)."""
    values = {spec.name: getattr(args, spec.name) for spec in fields(TrainConfig) if hasattr(args, spec.name)}
    return TrainConfig(**{**values, **overrides})


def add_train_args(parser, **defaults: Any) -> None:
    """The flags of every ``TrainConfig`` field (training, speed and resume groups), with this pipeline's defaults.

    ``defaults`` overrides a field's default by name (``epochs=30, monitor="val_auroc", mode="max"``). A training
    script's parent parser opts into ``seed``, ``device`` and ``precision`` (``common.cli.base_parser``).
    """
    known = {spec.name: spec for spec in fields(TrainConfig)}
    unknown = sorted(set(defaults) - set(known))
    if unknown:
        raise TypeError(f"add_train_args: no TrainConfig field {', '.join(unknown)}")
    groups: dict[str, Any] = {}
    for name, spec in known.items():
        group_name = spec.metadata["group"]
        if group_name is None:
            continue
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        default = defaults.get(name, spec.default)
        kwargs: dict[str, Any] = {"default": default, "help": spec.metadata["help"]}
        if spec.type in ("bool", "bool | None"):
            kwargs["action"] = "store_true" if name in ("resume", "overwrite") else argparse.BooleanOptionalAction
        if spec.metadata["type"] is not None:
            kwargs["type"] = spec.metadata["type"]
        if spec.metadata["choices"] is not None:
            kwargs["choices"] = spec.metadata["choices"]
        groups[group_name].add_argument(f"--{name.replace('_', '-')}", **kwargs)


__all__ = ["TrainConfig", "TrainTask", "EpochTask", "FitResult", "fit", "add_train_args", "config_from_args",
           "EpochSampler", "build_scheduler", "check_run_setup", "check_monitor", "DeviceBatches", "COMPILE_MODES"]
