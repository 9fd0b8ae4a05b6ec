"""Run-directory layout and checkpoint files: atomic writes, safetensors weights, JSON metadata."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.errors import DataError
from common.run_guard import run_lock, try_run_lock

log = logging.getLogger("medvl.checkpoint")

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
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise DataError(path, f"weights do not fit this model ({' '.join(str(err).split())[:200]})") from err
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


def find_model_dir(run_dir: Path) -> Path:
    """Accept a run directory or its ``best/`` directory and return the one holding the model files."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DataError(run_dir, "run directory does not exist")
    if not run_dir.is_dir():
        raise DataError(run_dir, "not a directory")
    recover_results(run_dir)
    for candidate in (committed_dir(run_dir / BEST_DIR), run_dir):
        if (candidate / META_FILE).is_file():
            return candidate
    raise DataError(run_dir, f"no trained model here (expected {BEST_DIR}/{META_FILE}); train first")


# --- directories swapped in whole -------------------------------------------------------------------------------

def _sibling(final: Path, suffix: str) -> Path:
    return final.with_name(final.name + suffix)


def committed_dir(final: Path) -> Path:
    """``final``, or its previous version when a kill fell between the two renames of ``swap_dir``."""
    final = Path(final)
    old = _sibling(final, ".old")
    return old if not final.exists() and old.is_dir() else final


def swap_dir(staged: Path, final: Path) -> None:
    """Replace directory ``final`` by the complete directory ``staged``; a reader sees one or the other.

    Two renames: ``final -> final.old`` then ``staged -> final``. A kill between them leaves ``final.old``
    (found by ``committed_dir``) and is repaired by the next swap.
    """
    staged, final = Path(staged), Path(final)
    old = _sibling(final, ".old")
    if not final.exists() and old.is_dir():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _scratch(path: Path) -> Iterator[Path]:
    """A fresh empty directory that is removed if the block fails (a kill leaves it for the next writer)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty sibling directory to fill; on success it replaces ``final`` whole, on error it is dropped."""
    final = Path(final)
    with _scratch(_sibling(final, ".tmp")) as staged:
        yield staged
    swap_dir(staged, final)


# --- result sets: several files of a run directory replaced together ------------------------------------------

PENDING_DIR = ".pending"
COMMIT_FILE = "COMMIT.json"


@contextlib.contextmanager
def result_set(run_dir: Path) -> Iterator[Path]:
    """Yield a staging root that mirrors ``run_dir``; on success every file in it replaces its twin together.

    Files are written under a staging folder of this writer alone, ``run_dir/.pending-<pid>-<random>/``
    (``predictions/test.csv``, ``results.json`` ...), while the writer holds the run's lock (``common.run_guard``;
    re-entrant, so a command that already holds it keeps it, and a second writer stops with one line naming the
    first). The commit point is one atomic write of ``COMMIT.json`` listing the files; they are then renamed into
    place. A failure before the commit point leaves the old set untouched; a kill after it is finished by
    ``recover_results``, which every medvl tool calls before it reads or writes a run directory, so the set seen
    is always the old one or the new one. A folder on a result file's way that is a symbolic link is refused
    (one DataError naming it) before the commit point: results are never written through, or dropped at, a link.
    """
    run_dir = Path(run_dir)
    with run_lock(run_dir, create=True):
        recover_results(run_dir)
        staging = run_dir / f"{PENDING_DIR}-{os.getpid()}-{secrets.token_hex(4)}"
        with _scratch(staging) as pending:
            yield pending
        files = sorted(str(p.relative_to(pending)) for p in pending.rglob("*") if p.is_file())
        try:
            for name in files:
                _check_target(run_dir, Path(name))
        except DataError:
            shutil.rmtree(pending, ignore_errors=True)
            raise
        atomic_write_json(pending / COMMIT_FILE, {"files": files})
        recover_results(run_dir)


def _check_target(run_dir: Path, name: Path) -> None:
    """A result file can replace its twin: no folder stands where the file goes, no file where a folder goes, no
    symbolic link where a folder goes."""
    target = run_dir / name
    folders = [run_dir / Path(*name.parts[:k]) for k in range(1, len(name.parts))]
    for folder in folders:
        if folder.is_symlink():
            raise DataError(folder, "is a symbolic link inside the run; results are not written through links "
                                    "(make it a real folder, or move it away)")
    if target.is_dir() and not target.is_symlink():
        raise DataError(target, "is a directory where the result file goes; move it away")
    for parent in reversed(folders):
        if parent.exists() and not parent.is_dir():
            raise DataError(parent, "is a file where the results need a folder; move it away")


def _inside(run_dir: Path, name: Any) -> bool:
    """``name`` is a plain relative path whose real location (symlinks followed) stays inside ``run_dir``."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    root = Path(run_dir).resolve()
    return (root / name).resolve().is_relative_to(root)


def pending_dirs(run_dir: Path) -> list[Path]:
    """The staging folders of result sets in ``run_dir`` (``.pending`` and ``.pending-<writer>``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name == PENDING_DIR or p.name.startswith(PENDING_DIR + "-"))


def recover_results(run_dir: Path) -> None:
    """Finish each committed result set of a writer that is gone (move its files into place) and drop each
    uncommitted or malformed one; the sets of a live writer (who holds the run's lock) are left to it.

    The commit record comes from the run directory, so it is not trusted: a name that is not a plain relative
    path, or that leads outside the run directory (``..``, a symlinked folder), drops the whole set unapplied.
    """
    run_dir = Path(run_dir)
    if not pending_dirs(run_dir):
        return
    with try_run_lock(run_dir) as free:
        if not free:
            return
        found = pending_dirs(run_dir)
        commit_time = lambda p: (p / COMMIT_FILE).stat().st_mtime if (p / COMMIT_FILE).is_file() else 0  # noqa: E731
        for pending in sorted(found, key=lambda p: (commit_time(p) if p.is_dir() and not p.is_symlink() else 0)):
            _recover_set(run_dir, pending)


def _recover_set(run_dir: Path, pending: Path) -> None:
    if pending.is_symlink() or (pending.exists() and not pending.is_dir()):
        pending.unlink()
        return
    if not pending.is_dir():
        return
    commit = pending / COMMIT_FILE
    try:
        files = json.loads(commit.read_text()).get("files") if commit.is_file() else None
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError, OSError):
        files = None
    if not isinstance(files, list) or not all(_inside(run_dir, name) and _inside(pending, name) for name in files):
        if files is not None:
            log.warning("%s: dropped a result set whose commit record is malformed or points outside the run", pending)
        shutil.rmtree(pending, ignore_errors=True)
        return
    for name in files:
        source = pending / name
        if source.is_file() and not source.is_symlink():
            target = Path(run_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    shutil.rmtree(pending, ignore_errors=True)


# --- CSV tables ---------------------------------------------------------------------------------------------------

def read_csv(path: Path, columns: tuple[str, ...] = (), missing: str = "file not found", **kwargs: Any):
    """A CSV file as a DataFrame; a missing or unreadable file or an absent column is one DataError naming it.

    ``kwargs`` go to ``pandas.read_csv`` (``dtype=str, keep_default_na=False`` keeps ids such as ``00012``).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(path, missing)
    try:
        frame = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(path, f"not a readable CSV ({str(err).splitlines()[0]})") from err
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise DataError(path, f"missing column(s) {', '.join(absent)} (has {', '.join(map(str, frame.columns))})")
    return frame


# --- JSON lines ---------------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a ``.jsonl`` file; an unterminated last line (a write cut short) is dropped with a warning.

    Any other line that is not a JSON object is a DataError naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise DataError(path, f"cannot read ({err.strerror})") from err
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: dropped an unfinished last line", path)
                continue
            raise DataError(path, f"line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise DataError(path, f"line {number} is not a JSON object")
        records.append(record)
    return records
