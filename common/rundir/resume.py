"""Resume state: what ``checkpoints/last/`` holds, how it is written and read back, and what a resume must match.

Written as safetensors + JSON: nothing in a run directory is ever unpickled.

Accelerate's ``save_state``/``load_state`` pickle the registered objects (loop counters, scheduler) and the RNG
states, and unpickle them on ``--resume``; a run directory received from someone else could then run code. This
module writes the same information in formats that cannot: tensors in safetensors, everything else in JSON.

``checkpoints/last/`` holds:
    model.safetensors        the unwrapped model's state dict
    optimizer.safetensors    every tensor of the optimizer state (``state/<param index>/<name>``)
    optimizer.json           its non-tensor parts (param groups, scalar state entries)
    trainer.json             loop counters, scheduler and grad-scaler state, number of processes
    rng_<rank>.safetensors   torch CPU and CUDA generator states of each process
    rng_<rank>.json          Python ``random`` and NumPy generator states of each process
    task.safetensors         tensors a task keeps across steps (e.g. the LRF basis of the epoch), when it has any

``save_last`` writes the folder whole (staged, then swapped in); ``find_resume_dir`` finds it; ``check_resume``
refuses a resume whose loop settings (``identity``), ``config.yaml`` or data files differ from the interrupted run's.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.errors import ConfigError, DataError
from common.rundir.files import atomic_write_json
from common.rundir.layout import LAST_DIR
from common.rundir.swap import committed_dir, swap_dir
from common.rundir.weights import load_model_state, model_state

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TRAINER_JSON = "trainer.json"
TASK_TENSORS = "task.safetensors"
FORMAT = "medvl-train-state-1"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(path, "missing from the checkpoint (it is incomplete; start again with --overwrite)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"not valid JSON ({type(err).__name__})") from err


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(path, "missing from the checkpoint (it is incomplete; start again with --overwrite)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DataError(path, f"not a readable safetensors file ({str(err).splitlines()[0][:120]})") from err


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = _to_json(value)
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    atomic_write_json(directory / OPTIMIZER_JSON, {"param_groups": _to_json(state["param_groups"]),
                                                   "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    tensors = _read_tensors(directory / OPTIMIZER_TENSORS)
    json_path = directory / OPTIMIZER_JSON
    saved = _read_json(json_path)
    template = optimizer.state_dict()
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(template["param_groups"]):
        raise DataError(json_path, "param_groups do not match this optimizer (another model or optimizer?)")
    restored_groups = []
    for live, group in zip(template["param_groups"], groups):
        if not isinstance(group, dict) or set(group) != set(live) or group["params"] != live["params"]:
            raise DataError(json_path, "param_groups do not match this optimizer (another model or optimizer?)")
        restored_groups.append({k: tuple(v) if isinstance(live[k], tuple) and isinstance(v, list) else v
                                for k, v in group.items()})
    known = {p for group in template["param_groups"] for p in group["params"]}
    entries: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in known:
            raise DataError(directory / OPTIMIZER_TENSORS, f"unexpected entry {key!r}")
        entries.setdefault(int(parts[1]), {})[parts[2]] = value
    scalars = saved.get("scalars", {})
    if not isinstance(scalars, dict):
        raise DataError(json_path, "'scalars' must be an object")
    for index, values in scalars.items():
        if not str(index).isdigit() or int(index) not in known or not isinstance(values, dict):
            raise DataError(json_path, f"unexpected scalar state for parameter {index!r}")
        entries.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({"state": entries, "param_groups": restored_groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise DataError(json_path, f"does not fit this optimizer ({str(err).splitlines()[0][:120]})") from err


def save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    save_file(tensors, str(directory / f"rng_{rank}.safetensors"))
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    atomic_write_json(directory / f"rng_{rank}.json", {
        "python": [version, list(py_state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    })


def load_rng(directory: Path, rank: int) -> None:
    tensor_path, json_path = directory / f"rng_{rank}.safetensors", directory / f"rng_{rank}.json"
    tensors = _read_tensors(tensor_path)
    saved = _read_json(json_path)
    try:
        cpu = tensors["torch_cpu"]
        python = saved["python"]
        numpy_state = saved["numpy"]
        py_state = (int(python[0]), tuple(int(v) for v in python[1]), python[2])
        np_state = (str(numpy_state[0]), np.asarray(numpy_state[1], dtype=np.uint32), int(numpy_state[2]),
                    int(numpy_state[3]), float(numpy_state[4]))
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise DataError(json_path if not isinstance(err, KeyError) or "torch" not in str(err) else tensor_path,
                        f"not a medvl RNG state ({type(err).__name__}: {err})") from err
    try:
        torch.set_rng_state(cpu)
    except (RuntimeError, TypeError, ValueError) as err:
        raise DataError(tensor_path, f"RNG state does not load ({str(err).splitlines()[0][:120]})") from err
    try:
        random.setstate(py_state)
        np.random.set_state(np_state)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise DataError(json_path, f"RNG state does not load ({str(err).splitlines()[0][:120]})") from err
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(len(tensors)) if f"torch_cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_last_model(model: torch.nn.Module, directory: Path) -> None:
    save_file(model_state(model), str(directory / MODEL_FILE))


def load_last_model(model: torch.nn.Module, directory: Path) -> None:
    path = directory / MODEL_FILE
    load_model_state(model, _read_tensors(path), path)


def save_trainer(directory: Path, record: dict[str, Any]) -> None:
    atomic_write_json(directory / TRAINER_JSON, {"format": FORMAT, **_to_json(record)})


def load_trainer(directory: Path) -> dict[str, Any]:
    path = directory / TRAINER_JSON
    record = _read_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(path, f"not a medvl training state (expected format {FORMAT!r})")
    for key in ("loop", "scheduler", "num_processes"):
        if key not in record:
            raise DataError(path, f"missing key {key!r}")
    return record


def save_task_tensors(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / TASK_TENSORS))


def load_task_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return _read_tensors(directory / TASK_TENSORS)



def save_last(accelerator, model, optimizer, scheduler, loop_state, run_dir: Path, identity: dict[str, Any],
              task) -> None:
    """Write the resumable state into a fresh folder, then swap it in: a kill never leaves half a checkpoint."""
    last = Path(run_dir) / LAST_DIR
    tmp = last.with_name("last.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_last_model(accelerator.unwrap_model(model), tmp)
        save_optimizer(optimizer, tmp)
        scaler = getattr(accelerator, "scaler", None)
        save_trainer(tmp, {"loop": loop_state.state_dict(), "scheduler": scheduler.state_dict(),
                           "scaler": scaler.state_dict() if scaler is not None else None,
                           "num_processes": accelerator.num_processes, "identity": identity})
        if hasattr(task, "task_tensors"):
            save_task_tensors(task.task_tensors(), tmp)
    save_rng(tmp, accelerator.process_index)
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

IDENTITY_KEYS = ("epochs", "batch_size", "grad_accum", "clip_grad_norm", "scheduler", "warmup_steps",
                 "step_size_epochs", "step_gamma", "min_lr_ratio", "precision", "monitor", "mode", "patience",
                 "eval_every", "seed", "channels_last", "compile")
"""The loop settings a resumed run must share with the interrupted one to end at the same weights."""


def identity(config, train_size: int, num_processes: int) -> dict[str, Any]:
    """The ``IDENTITY_KEYS`` of a ``TrainConfig``, the training split's size and the number of processes."""
    return {**{k: getattr(config, k) for k in IDENTITY_KEYS}, "train_size": train_size,
            "num_processes": num_processes}


def check_resume(resume_dir: Path, saved: dict[str, Any], current: dict[str, Any], run_dir: Path,
                 run_files: dict[str, str], defaults: Mapping[str, Any]) -> None:
    """Refuse a resume whose settings or data differ from the interrupted run's, naming what changed. A key the
    checkpoint predates had its default then (``defaults``: the ``TrainConfig`` field defaults)."""
    before = saved.get("identity") or {}
    before = {k: before.get(k, defaults.get(k)) for k in current}
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in current.items() if before.get(k) != v]
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
            # A key only the new config has is a flag added since the interrupted run (it ran with the default).
            keys = sorted(set(old_cfg) - set(RESUMABLE_CHANGES) - set(current))
            changed += [f"{k} {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in keys
                        if old_cfg.get(k) != new_cfg.get(k)]
        elif old != text:
            changed.append(f"{name} (the data or its split changed)")
    if changed:
        raise ConfigError("--resume", f"settings differ from the interrupted run in {run_dir}: {'; '.join(changed)}. "
                                      "Resume with the original settings, or start a new run")
