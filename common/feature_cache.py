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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from common.checkpoint import atomic_write_bytes
from common.errors import DataError

SHARD_PATTERN = "shard-*.safetensors"


def default_cache_root(cache_dir: Path | None, name: str) -> Path:
    """``<--cache-dir>/<name>``, else ``$XDG_CACHE_HOME/medvl/<name>`` (``~/.cache/medvl/<name>``): where derived
    tensors (tile features, preprocessed volumes) live between runs."""
    if cache_dir is not None:
        return Path(cache_dir) / name
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
    """A folder of shards for one namespace (encoder + preprocessing); metadata must match in every shard."""

    def __init__(self, root: Path, namespace: str, meta: dict[str, str]):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", namespace):
            raise ValueError(f"namespace {namespace!r} must be a plain folder name")
        self.directory = Path(root).expanduser() / namespace
        self.meta = {str(k): str(v) for k, v in meta.items()}
        self._where: dict[str, Path] = {}
        for shard in sorted(self.directory.glob(SHARD_PATTERN)) if self.directory.is_dir() else []:
            try:
                with safe_open(str(shard), "pt") as handle:
                    stored = handle.metadata() or {}
                    keys = list(handle.keys())
            except (SafetensorError, OSError) as err:
                raise DataError(shard, f"unreadable cache shard ({str(err)[:80]}); delete it to recompute") from err
            differs = {k: (stored.get(k), v) for k, v in self.meta.items() if stored.get(k) != v}
            if differs:
                what = ", ".join(f"{k} {a!r} here, {b!r} wanted" for k, (a, b) in differs.items())
                raise DataError(shard, f"cache shard does not match this encoder ({what}); use another cache "
                                       "folder or delete it")
            for key in keys:
                self._where[key] = shard

    def __len__(self) -> int:
        return len(self._where)

    def missing(self, keys: list[str]) -> list[str]:
        """Keys with nothing cached, in their first-seen order, without duplicates."""
        return [k for k in dict.fromkeys(keys) if k not in self._where]

    def add(self, tensors: dict[str, torch.Tensor]) -> Path | None:
        """Write one new shard holding ``tensors`` (keys already cached are skipped)."""
        fresh = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if k not in self._where}
        if not fresh:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(sorted(fresh)).encode()).hexdigest()[:16]
        shard = self.directory / f"shard-{name}.safetensors"
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
            with safe_open(str(shard), "pt") as handle:
                for key in wanted:
                    found[key] = handle.get_tensor(key)
        return [found[k] for k in keys]


__all__ = ["FeatureCache", "file_digest", "text_digest"]
