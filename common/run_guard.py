"""Run safety for every command: inputs are never outputs, and one writer per run directory.

Every command that writes calls ``guard_command`` right after parsing its arguments, before it reads data or
writes anything::

    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "cache_dir"), runs=("init",),
                  lock="output_dir")

``writes`` name the output paths (argparse destinations), ``reads`` the paths read whole (data roots, caches,
runs a stage starts from), ``runs`` the runs read whose model and records must survive (``best/``,
``checkpoints/``, ``config.yaml``, ``split.csv``, ``metrics.jsonl``): an output that is, contains or lies inside
one of them is one ``ConfigError`` naming the output flag and both paths (exit 2, nothing written).

``lock`` names the run directory the command writes into: it is locked (``fcntl.flock`` on ``<run>/.lock``) for
the life of the command, so a second writer stops with one line naming the holder (pid, command, start). The OS
drops the lock when the process ends, however it ends; the file is removed on a normal exit. ``result_set`` and
the training loop take the same lock, re-entrantly, so a writer that skips ``guard_command`` is still alone.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from common.errors import ConfigError, DataError, current_command

LOCK_FILE = ".lock"
RUN_NEEDS = ("best", "best.old", "checkpoints", "config.yaml", "split.csv", "metrics.jsonl")
"""What a run another command starts from or evaluates needs of itself: no output may land on them."""

_HELD: dict[str, list] = {}
"""Run directories this process holds: realpath -> [fd, depth]; a nested acquire by the same process nests."""


def flag_name(dest: str) -> str:
    return dest if dest.startswith("-") else "--" + dest.replace("_", "-")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def overlap(out: Path, inp: Path) -> str | None:
    """How output ``out`` overlaps input ``inp`` (``is``, ``lies inside``, ``contains``), symlinks followed."""
    o, i = _real(out), _real(inp)
    if o == i:
        return "is"
    if o.is_relative_to(i):
        return "lies inside"
    if i.is_relative_to(o):
        return "contains"
    return None


Paths = Iterable[Path | None] | Path | None


def check_not_inputs(writes: Mapping[str, Path | None], reads: Mapping[str, Paths],
                     beside: Mapping[str, Paths] | None = None) -> None:
    """Refuse an output that is, contains or lies inside an input: ``ConfigError(<output flag>, both paths)``.

    ``writes`` and ``reads`` map a flag (or a description) to its path(s); None is skipped. ``beside`` are input
    folders an output may be written into as a new file (``caption --out DATA_ROOT/captions.jsonl``) but may not
    be or contain. Reads only the file system's names, so it can run before anything is loaded or written.
    """
    groups = [(reads, ("is", "lies inside", "contains")), (beside or {}, ("is", "contains"))]
    for out_flag, out in writes.items():
        if out is None:
            continue
        for inputs, refused in groups:
            for in_flag, paths in inputs.items():
                for inp in ([paths] if paths is None or isinstance(paths, str | os.PathLike) else paths):
                    if inp is None:
                        continue
                    relation = overlap(out, inp)
                    if relation in refused:
                        raise ConfigError(out_flag, f"{out} {relation} {in_flag} {inp}, which this command reads; "
                                                    f"choose another {out_flag}")


def guard_command(args: argparse.Namespace, *, writes: Iterable[str] = (), reads: Iterable[str] = (),
                  runs: Iterable[str] = (), beside: Iterable[str] = (), lock: str | None = None, create: bool = False,
                  extra_reads: Mapping[str, Paths] | None = None) -> None:
    """The run-safety floor of one command (see the module docstring); call it first thing in ``main``.

    Args:
        args: the parsed arguments.
        writes: destinations of the output paths (``"output_dir"``, ``"out"``).
        reads: destinations of paths read whole (``"data_root"``, ``"cache_dir"``, ``"image_run"``).
        runs: destinations of runs read only through their model and records (``RUN_NEEDS``).
        beside: destinations of input folders an output may be a new file in, but not be or contain.
        lock: destination of the run directory the command writes into, locked for the command's life.
        create: create that directory to lock it (training; removed again if the command leaves it empty). A
            directory that does not exist and is not created is not locked (the command reports it missing).
        extra_reads: further inputs by description, e.g. a split file given as text.
    """
    value = lambda name: getattr(args, name)  # noqa: E731
    out = {flag_name(n): value(n) for n in writes}
    inputs: dict[str, Iterable[Path | None] | Path | None] = {flag_name(n): value(n) for n in reads}
    for name in runs:
        run = value(name)
        if run is not None:
            inputs[flag_name(name)] = [Path(run) / need for need in RUN_NEEDS]
    inputs.update(extra_reads or {})
    check_not_inputs(out, inputs, {flag_name(n): value(n) for n in beside})
    if lock is not None and value(lock) is not None:
        hold_run(Path(value(lock)), flag_name(lock), create=create)


def path_values(args: argparse.Namespace, *names: str) -> dict[str, Path | None]:
    """Flags that take a keyword or a path (``--split stratified|official|FILE``), for ``extra_reads``: those whose
    value names an existing file or folder."""
    found: dict[str, Path | None] = {}
    for name in names:
        value = getattr(args, name)
        found[flag_name(name)] = Path(value) if value is not None and Path(str(value)).expanduser().exists() else None
    return found


def hold_run(run_dir: Path, flag: str | None = None, *, create: bool = False) -> None:
    """Lock ``run_dir`` until the running ``cli_entry`` command ends (or for good, outside one: use ``run_lock``)."""
    scope = current_command()
    if scope is None:
        raise RuntimeError("hold_run outside a cli_entry command; use `with run_lock(...)`")
    scope[1].enter_context(run_lock(run_dir, flag, create=create))


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or "pid" not in record:
        return "another process"
    since = record.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else ""
    return f"pid {record['pid']} ({record.get('command', '?')}){when}"


def _main_process() -> bool:
    """False on the other ranks of a distributed launch: rank 0 holds the run's lock for all of them."""
    return all(os.environ.get(key, "0") in ("", "0") for key in ("RANK", "LOCAL_RANK"))


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(path, "is a symbolic link; remove it (the run's lock file is never followed)") from err
        raise


@contextlib.contextmanager
def run_lock(run_dir: Path, flag: str | None = None, *, create: bool = False, wait: bool = False) -> Iterator[bool]:
    """Hold the advisory lock of ``run_dir`` (``<run>/.lock``) for the block; re-entrant within this process.

    Yields True when held (False: no directory and ``create`` off, or a directory this user cannot write, where no
    writer can be either). Another holder is a ``ConfigError`` naming ``flag`` (or the directory), the directory and
    the holder. A directory created here and left empty is removed again.
    """
    run_dir = Path(run_dir)
    key = str(_real(run_dir))
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield True
        finally:
            _HELD[key][1] -= 1
        return
    if not _main_process() or (run_dir.exists() and not run_dir.is_dir()):
        yield False
        return
    created = False
    if not run_dir.exists():
        if not create:
            yield False
            return
        run_dir.mkdir(parents=True)
        created = True
    path = run_dir / LOCK_FILE
    try:
        fd = _acquire(path, flag or str(run_dir), run_dir, wait)
    except PermissionError:
        yield False
        return
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    if fd is None:
        yield False
        return
    scope = current_command()
    record = {"pid": os.getpid(), "command": scope[0] if scope else "medvl", "since": round(time.time(), 3)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield True
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            path.unlink()  # still holding it: a process that opened the old file re-checks the inode and retries
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def _acquire(path: Path, source: str, run_dir: Path, wait: bool) -> int | None:
    """Open and lock ``path``, retrying when the file was replaced between the open and the lock."""
    for _ in range(100):
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(source, f"{run_dir} is being written by {holder}; one writer per run: wait for it "
                                      "to finish (or stop it) and run this again") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    return None


def holds_run(run_dir: Path) -> bool:
    """This process holds ``run_dir``'s lock."""
    return str(_real(run_dir)) in _HELD


@contextlib.contextmanager
def try_run_lock(run_dir: Path) -> Iterator[bool]:
    """Yield False (without waiting) when another process holds ``run_dir``'s lock, else True, holding it if the
    directory can be locked at all (a read-only one cannot have a writer either)."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(run_lock(run_dir))
    except ConfigError:
        yield False
        return
    with stack:
        yield True


__all__ = ["LOCK_FILE", "RUN_NEEDS", "check_not_inputs", "guard_command", "hold_run", "holds_run", "overlap",
           "path_values", "run_lock", "try_run_lock"]
