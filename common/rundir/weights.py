"""A model's files in a run directory: weights as safetensors (never a pickle) beside ``model.json``, written into
a folder that is swapped in whole, with the provenance (git commit, library versions) the record carries."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.errors import DataError
from common.rundir.files import _umask_mode, atomic_write_json
from common.rundir.layout import META_FILE, WEIGHTS_FILE


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "transformers", "medvl"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``model``: its state less the keys it says its source rebuilds.

    A model may define ``rebuilt_keys()`` (frozen pretrained weights, e.g. the base layers under LoRA adapters):
    those are not written, so a LoRA run over a billion-parameter backbone saves megabytes, not gigabytes.
    """
    rebuilt = _skipped_keys(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in rebuilt}


def tied_keys(model: torch.nn.Module) -> set[str]:
    """State keys that alias an earlier key's tensor (tied weights, e.g. an LM head sharing the input embedding):
    safetensors refuses to write shared memory twice, and loading the first fills both."""
    seen: set[int] = set()
    tied = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if value.numel() == 0:
            continue
        pointer = value.data_ptr()
        if pointer in seen:
            tied.add(key)
        seen.add(pointer)
    return tied


def _skipped_keys(model: torch.nn.Module) -> set[str]:
    rebuilt = set(model.rebuilt_keys()) if hasattr(model, "rebuilt_keys") else set()
    return rebuilt | tied_keys(model)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a saved state into ``model``; only the keys it rebuilds from its source (or ties to another) may be
    absent."""
    rebuilt = _skipped_keys(model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise DataError(path, f"weights do not fit this model ({' '.join(str(err).split())[:200]})") from err
    if result is None:  # an override that drops torch's answer (smp's encoders): compare the keys here
        own = set(model.state_dict())
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    else:
        missing, unexpected = result
    missing = sorted(set(missing) - rebuilt)
    if missing or unexpected:
        kind, keys = ("missing", missing) if missing else ("unexpected", list(unexpected))
        more = " ..." if len(keys) > 3 else ""
        raise DataError(path, f"weights do not fit this model ({kind} {', '.join(keys[:3])}{more})")


def save_model(directory: Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Save weights as safetensors plus ``model.json`` (how to rebuild the model, and provenance).

    Into a fresh directory that is then swapped in whole (``staged_dir``), so weights and metadata always come
    from the same epoch; the training loop hands ``save_best`` such a directory.
    """
    directory = Path(directory)
    state = model_state(model)
    tmp_fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".tmp", dir=_ensure(directory))
    os.close(tmp_fd)
    try:
        save_file(state, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, directory / WEIGHTS_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = {**meta, "git_sha": git_sha(), "versions": environment_versions()}
    atomic_write_json(directory / META_FILE, meta)
    return directory


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def read_model_json(directory: Path) -> Any:
    """``model.json`` of a model folder, parsed; a missing or broken file is a DataError naming it."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(path, "no trained model here (run training first, or pass the run directory)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"not valid JSON ({getattr(err, 'msg', type(err).__name__)})") from err


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of a model folder; a missing or damaged file is a DataError naming it."""
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(weights, "no trained model here (run training first, or pass the run directory)")
    try:
        return load_file(str(weights))
    except Exception as err:  # safetensors raises SafetensorError, OSError or ValueError for damaged files
        raise DataError(weights, f"cannot read weights ({err})") from err


def load_model_files(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``model.safetensors`` and ``model.json`` from a directory; a missing or broken file is a DataError."""
    directory = Path(directory)
    for path in (directory / META_FILE, directory / WEIGHTS_FILE):
        if not path.is_file():
            raise DataError(path, "no trained model here (run training first, or pass the run directory)")
    meta = read_model_json(directory)
    return read_weights(directory), meta


def require_keys(meta: dict[str, Any], path: Path, types: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Check that ``model.json`` (or any JSON record) has each key with a value of the expected type."""
    if not isinstance(meta, dict):
        raise DataError(path, "expected a JSON object")
    for key, kind in types.items():
        if key not in meta:
            raise DataError(path, f"missing key {key!r}")
        value = meta[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise DataError(path, f"key {key!r} has the wrong type (bool)")
        if not isinstance(value, kind):
            raise DataError(path, f"key {key!r} has the wrong type ({type(value).__name__})")
    return meta
