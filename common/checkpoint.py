"""Run-directory layout and checkpoint files: atomic writes, safetensors weights, JSON metadata."""

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

BEST_DIR = "best"
LAST_DIR = "checkpoints/last"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` so that a reader sees the old file or the new one, never half of it."""
    return _atomic_replace(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (the format comes from the suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _atomic_replace(path, lambda handle: fig.savefig(handle, format=fmt, dpi=dpi, bbox_inches="tight"))


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


def save_model(directory: Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Save weights as safetensors plus ``model.json`` (how to rebuild the model, and provenance).

    The weights file is written before the metadata, so a directory with ``model.json`` always has weights.
    """
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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


def load_model_files(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``model.safetensors`` and ``model.json`` from a directory; a missing or broken file is a DataError."""
    directory = Path(directory)
    weights, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
    for path in (meta_path, weights):
        if not path.is_file():
            raise DataError(path, "no trained model here (run training first, or pass the run directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(meta_path, f"not valid JSON ({err.msg})") from err
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises SafetensorError, OSError or ValueError for damaged files
        raise DataError(weights, f"cannot read weights ({err})") from err
    return state, meta


def find_model_dir(run_dir: Path) -> Path:
    """Accept a run directory or its ``best/`` directory and return the one holding the model files."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DataError(run_dir, "run directory does not exist")
    for candidate in (run_dir / BEST_DIR, run_dir):
        if (candidate / META_FILE).is_file():
            return candidate
    raise DataError(run_dir, f"no trained model here (expected {BEST_DIR}/{META_FILE}); train first")
