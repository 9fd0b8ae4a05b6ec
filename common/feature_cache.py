"""Tensors computed once per input (frozen-encoder features, text token states), cached as safetensors shards.

    cache = FeatureCache(Path("~/.cache/medvl/features"), "prov-gigapath-imagenet", {"dim": "1536"})
    todo = cache.missing(keys); cache.add({key: tensor for ...}); tensors = cache.get(keys)

Keys are content hashes (``file_digest``), so a renamed file is still a hit and a changed one is a miss. Each
``add`` writes one new shard atomically: a kill loses at most the batch in flight, never a written shard, and a
rerun computes only what is missing. Every shard records the namespace's metadata (encoder, preprocessing, feature
size); a shard whose metadata differs from the caller's (say, another feature size under the same name) is one
error line naming it, never silently mixed in.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from common.errors import DataError
from common.rundir import atomic_write_bytes

SHARD_PATTERN = "shard-*.safetensors"
CACHE_ENV = "MEDVL_CACHE_DIR"
"""Environment variable that moves medvl's cache root (what ``--cache-dir`` does for one command)."""


def default_cache_root(cache_dir: Path | None, name: str) -> Path:
    """``<--cache-dir>/<name>``, else ``$MEDVL_CACHE_DIR/<name>``, else ``$XDG_CACHE_HOME/medvl/<name>``
    (``~/.cache/medvl/<name>``): where derived files (tile features, preprocessed volumes, converted models) live
    between runs."""
    if cache_dir is not None:
        return Path(cache_dir) / name
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / name
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medvl" / name


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex, first 32 characters): the cache key of an input file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class FeatureCache:
    """A folder of shards for one namespace (encoder + preprocessing); metadata must match in every shard.

    ``writer`` goes into the names of the shards this object writes (``shard-<writer>-<hash>``), so processes that
    fill one cache side by side (``rank::world`` shares under ``accelerate launch``) never write the same file.
    ``row_shape`` (None for a free axis: ``(None, 768)`` for token states of any length) is checked against every
    shard's header when the cache is opened: a shard that does not read, or holds rows of another shape, is one
    ``DataError`` naming it (delete it and the next run recomputes its rows), never a traceback later.
    """

    def __init__(self, root: Path, namespace: str, meta: dict[str, str], *, writer: str = "",
                 row_shape: tuple[int | None, ...] | None = None):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", namespace):
            raise ValueError(f"namespace {namespace!r} must be a plain folder name")
        if writer and not re.fullmatch(r"[A-Za-z0-9_]+", writer):
            raise ValueError(f"writer {writer!r} must be letters, digits or _")
        self.root, self.namespace = Path(root).expanduser(), namespace
        self.directory = self.root / namespace
        self.meta = {str(k): str(v) for k, v in meta.items()}
        self.writer, self.row_shape = writer, row_shape
        self._where: dict[str, Path] = {}
        self.rescan()

    def rescan(self) -> None:
        """Read the folder again (shards other processes wrote since this object was made)."""
        for shard in sorted(self.directory.glob(SHARD_PATTERN)) if self.directory.is_dir() else []:
            try:
                with safe_open(str(shard), "pt") as handle:
                    stored = handle.metadata() or {}
                    keys = list(handle.keys())
                    shapes = [handle.get_slice(k).get_shape() for k in keys] if self.row_shape is not None else []
            except (SafetensorError, OSError, ValueError) as err:
                raise DataError(shard, f"unreadable cache shard ({str(err)[:80]}); delete it to recompute") from err
            differs = {k: (stored.get(k), v) for k, v in self.meta.items() if stored.get(k) != v}
            if differs:
                what = ", ".join(f"{k} {a!r} here, {b!r} wanted" for k, (a, b) in differs.items())
                raise DataError(shard, f"cache shard does not match this encoder ({what}); use another cache "
                                       "folder or delete it")
            for shape in shapes:
                if not shape_fits(shape, self.row_shape):
                    raise DataError(shard, f"cache shard holds a row of shape {tuple(shape)}, not "
                                           f"{_shape_text(self.row_shape)}; delete it to recompute")
            for key in keys:
                self._where[key] = shard

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def missing(self, keys: list[str]) -> list[str]:
        """Keys with nothing cached, in their first-seen order, without duplicates."""
        return [k for k in dict.fromkeys(keys) if k not in self._where]

    def shard_of(self, key: str) -> Path:
        return self._where[key]

    def add(self, tensors: dict[str, torch.Tensor]) -> Path | None:
        """Write one new shard holding ``tensors`` (keys already cached are skipped)."""
        fresh = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if k not in self._where}
        if not fresh:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(sorted(fresh)).encode()).hexdigest()[:16]
        shard = self.directory / f"shard-{self.writer + '-' if self.writer else ''}{name}.safetensors"
        atomic_write_bytes(shard, save(fresh, metadata=self.meta))
        for key in fresh:
            self._where[key] = shard
        return shard

    def get(self, keys: list[str]) -> list[torch.Tensor]:
        """The cached tensors of ``keys``, in order; a key never added is a KeyError."""
        by_shard: dict[Path, list[str]] = {}
        for key in dict.fromkeys(keys):
            by_shard.setdefault(self._where[key], []).append(key)
        found: dict[str, torch.Tensor] = {}
        for shard, wanted in by_shard.items():
            try:
                with safe_open(str(shard), "pt") as handle:
                    for key in wanted:
                        found[key] = handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as err:
                raise DataError(shard, f"unreadable cache shard ({str(err)[:80]}); delete it to recompute") from err
        return [found[k] for k in keys]

    def view(self, keys: list[str], dtype: torch.dtype = torch.float32, ragged: bool = False) -> CachedTensors:
        """A lazy ``CachedTensors`` over ``keys`` (all must be cached): rows are read when asked for."""
        return CachedTensors(self, keys, dtype, ragged=ragged)


def shape_fits(shape, wanted: tuple[int | None, ...] | None) -> bool:
    return wanted is None or (len(shape) == len(wanted) and all(w is None or int(s) == w
                                                                 for s, w in zip(shape, wanted)))


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("L" if s is None else str(s) for s in shape) + ")"


OPEN_SHARDS = 8
"""Shards a ``CachedTensors`` keeps open (memory-mapped) between reads; older ones are closed, so the resident
memory of reading never grows with the number of shards."""


class CachedTensors:
    """A lazy (N, ...) stack of cached rows: nothing is read until rows are asked for, a batch at a time.

    ``view[i]`` (an int) is one row; ``view[index]`` (a slice, index array, boolean mask or tensor) is a lazy view
    of those rows; ``view.rows(index)`` reads them, stacked (a list of (L_i, D) tensors when ``ragged``: token
    states of varying length); ``view.batches(b)`` walks the rows in order; ``view.tensor()`` reads everything
    (small data and tests only). ``shape`` is (N, *row shape), with None for a ragged length. Pickles without its
    open files, so DataLoader workers read their own. Reading converts to ``dtype`` (float16 text states become
    the float32 the models see, as the in-memory path did).
    """

    def __init__(self, cache: FeatureCache, keys: list[str], dtype: torch.dtype = torch.float32, *,
                 ragged: bool = False):
        self.dtype, self.ragged = dtype, ragged
        where = [cache.shard_of(k) for k in keys]
        self.shards = list(dict.fromkeys(str(p) for p in where))
        number = {s: i for i, s in enumerate(self.shards)}
        self.keys = np.asarray(keys, dtype=object)
        self.shard_index = np.asarray([number[str(p)] for p in where], dtype=np.int32)
        self.row_shape: tuple[int | None, ...] = ()
        if len(self.keys):
            shard = self.shards[self.shard_index[0]]
            try:
                with safe_open(shard, "pt") as handle:
                    first = tuple(handle.get_slice(self.keys[0]).get_shape())
            except (SafetensorError, OSError, ValueError) as err:
                raise DataError(shard, f"unreadable cache shard ({str(err)[:80]}); delete it to recompute") from err
            self.row_shape = (None, *first[1:]) if ragged else first
        self._open: OrderedDict[int, object] = OrderedDict()

    @classmethod
    def _subset(cls, parent: CachedTensors, keys: np.ndarray, shard_index: np.ndarray) -> CachedTensors:
        out = cls.__new__(cls)
        out.dtype, out.ragged, out.shards, out.row_shape = parent.dtype, parent.ragged, parent.shards, parent.row_shape
        out.keys, out.shard_index, out._open = keys, shard_index, OrderedDict()
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple:
        return (len(self.keys), *self.row_shape)

    def __getitem__(self, index):
        if isinstance(index, int | np.integer) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            return self.rows([int(index)])[0]
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return self._subset(self, self.keys[index], self.shard_index[index])

    def _handle(self, number: int):
        handle = self._open.pop(number, None)
        if handle is None:
            try:
                handle = safe_open(self.shards[number], "pt")
            except (SafetensorError, OSError, ValueError) as err:
                raise DataError(self.shards[number], f"unreadable cache shard ({str(err)[:80]}); delete it to "
                                                     "recompute") from err
            while len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open[number] = handle
        return handle

    def rows(self, index) -> torch.Tensor | list[torch.Tensor]:
        """The rows at ``index`` (positions in this view), read shard by shard, in the order asked."""
        positions = np.arange(len(self))[index] if not isinstance(index, list) else np.asarray(index, dtype=np.int64)
        positions = np.atleast_1d(positions)
        out: list[torch.Tensor | None] = [None] * len(positions)
        numbers = self.shard_index[positions]
        for number in np.unique(numbers):
            handle = self._handle(int(number))
            for j in np.flatnonzero(numbers == number):
                key = self.keys[positions[j]]
                try:
                    row = handle.get_tensor(key)
                except (SafetensorError, OSError, ValueError) as err:
                    raise DataError(self.shards[number], f"unreadable cache shard ({str(err)[:80]}); delete it to "
                                                         "recompute") from err
                if not shape_fits(row.shape, self.row_shape):
                    raise DataError(self.shards[number], f"cache shard holds a row of shape {tuple(row.shape)}, not "
                                                         f"{_shape_text(self.row_shape)}; delete it to recompute")
                out[j] = row.to(self.dtype)
        if self.ragged:
            return out
        if not out:
            return torch.zeros(0, *self.row_shape, dtype=self.dtype)
        return torch.stack(out)

    def batches(self, batch_size: int = 1024):
        """The rows in order, ``batch_size`` at a time (what a streaming pass over all of them reads)."""
        for start in range(0, len(self), batch_size):
            yield self.rows(slice(start, start + batch_size))

    def tensor(self) -> torch.Tensor | list[torch.Tensor]:
        """Every row at once (small data and tests)."""
        return self.rows(slice(None))

    def __repr__(self) -> str:
        return f"CachedTensors(shape={self.shape}, dtype={self.dtype}, shards={len(set(self.shard_index.tolist()))})"


__all__ = ["FeatureCache", "CachedTensors", "file_digest", "text_digest", "shape_fits", "OPEN_SHARDS"]
