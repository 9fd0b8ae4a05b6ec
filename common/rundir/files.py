"""Files of a run directory written so a reader sees the old version or the new one, never half of one (atomic
writes of bytes, text, JSON and figures), and the readers of the tables and logs runs keep (CSV, JSON lines): a
missing or damaged file is one ``DataError`` naming it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from common.errors import DataError

log = logging.getLogger("medvl.rundir")


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
