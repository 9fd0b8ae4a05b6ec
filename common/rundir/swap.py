"""Folders replaced whole and result sets: how a run directory changes without a reader ever seeing a mix.

``staged_dir``/``swap_dir`` replace one folder (``best/``, ``checkpoints/last/``) by a complete new one;
``result_set`` commits several files (predictions, ``results.*``, figures) together; ``recover_results`` finishes
or drops the sets a killed writer left, and every medvl tool calls it before it reads or writes a run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.run_guard import run_lock, try_run_lock
from common.rundir.files import atomic_write_json

log = logging.getLogger("medvl.rundir")


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
