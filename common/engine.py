"""The one training loop of medvl, on Accelerate.

Every pipeline hands ``fit`` a model, an optimizer, datasets and a small ``TrainTask`` (how to compute the
loss of a batch, how to validate, how to save the best model); the loop owns everything else: devices and
DDP, AMP, gradient accumulation and clipping, warm-up + cosine/step schedules, evaluation every epoch,
best-by-metric with a mode, early stopping, ``metrics.jsonl``, and checkpoints that ``--resume`` continues
exactly (model, optimizer, scheduler, RNG and the position in the epoch's data order).

The learning-rate schedule always spans ``epochs``; ``max_steps`` only stops early, so a run stopped by
``max_steps`` (or killed) and resumed ends where an uninterrupted run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, send_to_device, set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from common.checkpoint import LAST_DIR, atomic_write_text
from common.device import mixed_precision, pick_device
from common.errors import ConfigError, DataError

log = logging.getLogger("medvl.engine")

SCHEDULERS = ("cosine", "step", "constant")


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
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("--scheduler", f"unknown scheduler {self.scheduler!r}; choose {', '.join(SCHEDULERS)}")
        if self.mode not in ("min", "max"):
            raise ConfigError("--mode", f"mode must be min or max, not {self.mode!r}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}", "must be at least 1")


class TrainTask(Protocol):
    """What a pipeline tells the loop about its problem."""

    def training_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar loss of one (device-resident) batch."""

    def validate(self, model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """Metrics on the validation set; must include the monitored key."""

    def save_best(self, model: torch.nn.Module, metrics: dict[str, float], directory: Path) -> None:
        """Write the best model (``best/model.safetensors`` + ``model.json``, or an adapter)."""


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


class _LoopState:
    """Counters saved with every checkpoint (registered with Accelerate for ``save_state``)."""

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
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class FitResult:
    best_value: float | None
    best_epoch: int | None
    global_step: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


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


def _save_last(accelerator: Accelerator, run_dir: Path) -> None:
    """Write the resumable state into a fresh folder, then swap it in: a kill never leaves half a checkpoint."""
    last = run_dir / LAST_DIR
    tmp, old = last.with_name("last.tmp"), last.with_name("last.old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(old, ignore_errors=True)
        if last.exists():
            os.replace(last, old)
        os.replace(tmp, last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_resume_dir(run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from; a missing one is a one-line error."""
    last = Path(run_dir) / LAST_DIR
    for candidate in (last, last.with_name("last.old")):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    raise DataError(last, "--resume given but there is no checkpoint to resume from")


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=float) + "\n")


def _truncate_history(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop records written after the checkpoint we resume from, so ``metrics.jsonl`` matches one clean run."""
    if not path.is_file():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in kept))
    return kept


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if mode == "min" else value > best


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    task: TrainTask,
    config: TrainConfig,
    run_dir: Path,
    collate_fn: Callable | None = None,
) -> FitResult:
    """Train ``model`` and keep the best checkpoint by ``config.monitor``; see the module docstring."""
    run_dir = Path(run_dir)
    device = pick_device(config.device)
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed_precision(config.precision, device),
    )
    set_seed(config.seed)
    state = _LoopState()
    sampler = EpochSampler(len(train_dataset), config.seed, True, accelerator.process_index, accelerator.num_processes)
    train_loader = DataLoader(train_dataset, batch_size=config.batch_size, sampler=sampler,
                              num_workers=config.num_workers, collate_fn=collate_fn,
                              generator=torch.Generator().manual_seed(config.seed))
    val_loader = None
    if val_dataset is not None:
        val_loader = DataLoader(val_dataset, batch_size=config.eval_batch_size or config.batch_size, shuffle=False,
                                num_workers=config.num_workers, collate_fn=collate_fn)
    batches_per_epoch = math.ceil(len(train_dataset) / accelerator.num_processes / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    accelerator.register_for_checkpointing(scheduler, state)

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    _attach_log_file(run_dir / "train.log", accelerator.is_main_process)
    history: list[dict[str, Any]] = []
    if config.resume:
        resume_dir = find_resume_dir(run_dir)
        accelerator.load_state(str(resume_dir))
        if accelerator.is_main_process:
            history = _truncate_history(metrics_path, state.global_step)
        log.info("resumed from %s at epoch %d, step %d", resume_dir, state.epoch, state.global_step)
    elif accelerator.is_main_process and metrics_path.exists():
        metrics_path.unlink()

    stopped_early = False
    start = time.time()
    while not state.finished and state.epoch < config.epochs:
        epoch = state.epoch
        sampler.set_epoch(epoch, skip=state.batches_done * config.batch_size)
        train_loader.generator.manual_seed(config.seed * 7_919 + epoch)
        model.train()
        bar = tqdm(total=batches_per_epoch, initial=state.batches_done, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and accelerator.is_local_main_process), leave=False)
        hit_max_steps = False
        for batch in train_loader:
            index = state.batches_done
            group_end = min(batches_per_epoch, (index // config.grad_accum + 1) * config.grad_accum)
            group_size = group_end - (index // config.grad_accum) * config.grad_accum
            is_step = index + 1 == group_end
            batch = send_to_device(batch, accelerator.device)
            context = accelerator.no_sync(model) if not is_step else contextlib.nullcontext()
            with context, accelerator.autocast():
                loss = task.training_loss(model, batch)
            if not torch.isfinite(loss):
                raise DataError(run_dir, f"training loss became {loss.item()} at epoch {epoch + 1}, batch {index}; "
                                         "lower --lr or check the data")
            accelerator.backward(loss / group_size)
            state.loss_sum += loss.item()
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
                bar.set_postfix(loss=f"{state.loss_sum / state.loss_count:.4f}")
                if config.max_steps is not None and state.global_step >= config.max_steps:
                    hit_max_steps = True
                    break
                if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
                    _save_last(accelerator, run_dir)
        bar.close()
        if hit_max_steps and state.batches_done < batches_per_epoch:
            _save_last(accelerator, run_dir)
            log.info("stopped at --max-steps %d (epoch %d, batch %d); --resume continues", state.global_step,
                     epoch + 1, state.batches_done)
            break

        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.global_step,
                                  "train_loss": state.loss_sum / max(1, state.loss_count),
                                  "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - start, 2)}
        if val_loader is not None and (epoch + 1) % config.eval_every == 0:
            record.update(_validate(accelerator, model, val_loader, task))
            value = record.get(config.monitor)
            if value is None:
                raise ConfigError("--monitor", f"validation returned no {config.monitor!r} (has {sorted(record)})")
            if _improved(float(value), state.best_value, config.mode):
                state.best_value, state.best_epoch, state.bad_evals = float(value), epoch + 1, 0
                if accelerator.is_main_process:
                    task.save_best(accelerator.unwrap_model(model), record, run_dir / "best")
                record["is_best"] = True
            else:
                state.bad_evals += 1
            if config.patience is not None and state.bad_evals >= config.patience:
                stopped_early = True
        elif val_loader is None and accelerator.is_main_process:
            task.save_best(accelerator.unwrap_model(model), record, run_dir / "best")
        state.epoch, state.batches_done, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
        state.finished = stopped_early or state.epoch >= config.epochs
        if accelerator.is_main_process:
            _append_jsonl(metrics_path, record)
            history.append(record)
            log.info("epoch %d: %s", epoch + 1, _format_record(record))
        _save_last(accelerator, run_dir)
        if stopped_early:
            log.info("early stop: %s has not improved for %d evaluations", config.monitor, config.patience)
        if hit_max_steps:
            break
    accelerator.wait_for_everyone()
    return FitResult(state.best_value, state.best_epoch, state.global_step, stopped_early, history)


def _validate(accelerator: Accelerator, model, loader: DataLoader, task: TrainTask) -> dict[str, float]:
    """Validate on the main process over the whole set (no padded duplicates), then share the numbers."""
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        rng = torch.get_rng_state()
        with torch.no_grad(), accelerator.autocast():
            metrics = task.validate(unwrapped, loader, accelerator.device)
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
    """Training flags shared by all pipelines, with each pipeline's own defaults."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--batch-size", type=int, default=batch_size)
    group.add_argument("--eval-batch-size", type=int, default=None)
    group.add_argument("--lr", type=float, default=lr)
    group.add_argument("--weight-decay", type=float, default=weight_decay)
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument("--clip-grad-norm", type=float, default=None)
    group.add_argument("--scheduler", choices=SCHEDULERS, default=scheduler)
    group.add_argument("--warmup-steps", type=int, default=0)
    group.add_argument("--min-lr-ratio", type=float, default=0.0)
    group.add_argument("--monitor", default=monitor, help="validation metric that picks the best epoch")
    group.add_argument("--mode", choices=["min", "max"], default=mode)
    group.add_argument("--patience", type=int, default=None, help="early stop after this many evals without gain")
    group.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N optimizer steps")
    group.add_argument("--num-workers", type=int, default=0)
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


__all__ = ["TrainConfig", "TrainTask", "FitResult", "fit", "add_train_args", "config_from_args", "EpochSampler",
           "build_scheduler", "find_resume_dir"]
