"""Caption files (JSONL, one ``{"image", "caption"}`` per tile) and their cached text-token states.

    python -c "from pathology_brats.captions import read_captions; print(len(read_captions('d/captions.jsonl')))"

A caption file is appended to batch by batch while captions are generated, so its last line may be cut short by a
kill: such a line is dropped with a warning (the next run regenerates it). A malformed line anywhere else is an
error naming the line. The text encoder is frozen: each caption's token states (max length 128) are computed once
and cached by caption text and encoder (``common.feature_cache``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from common.checkpoint import read_jsonl
from common.errors import DataError
from common.feature_cache import CachedTensors, FeatureCache, text_digest
from common.text_encoders import load_text_encoder

log = logging.getLogger("medvl.pathology_brats")

MAX_TOKENS = 128


def read_captions(path: Path) -> dict[str, str]:
    """``{image file name: caption}``; a truncated last line (a killed writer) is dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "captions file not found")
    out: dict[str, str] = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        image, caption = record.get("image"), record.get("caption")
        if not isinstance(image, str) or not isinstance(caption, str):
            raise DataError(path, f"record {number}: needs string 'image' and 'caption' fields")
        out[Path(image).name] = caption
    return out


def check_captions(captions: dict[str, str], known: Sequence[str], needed: Sequence[str], path: Path) -> None:
    """Every ``needed`` image has a caption, and no caption names an image outside ``known``."""
    known_set = set(known)
    stray = [name for name in captions if name not in known_set]
    if stray:
        raise DataError(path, f"{len(stray)} caption(s) for images not in the data, e.g. {stray[0]!r}")
    lacking = [name for name in needed if name not in captions]
    if lacking:
        raise DataError(path, f"no caption for {len(lacking)} image(s), e.g. {lacking[0]!r}; generate them with "
                              "python -m pathology_brats.caption")


def text_cache(encoder_name: str, cache_root: Path, writer: str = "", dim: int | None = None) -> FeatureCache:
    """The cache of ``encoder_name``'s caption token states (float16 (L, D) rows, keyed by caption text)."""
    return FeatureCache(cache_root, f"text-{encoder_name.replace('/', '_')}-{MAX_TOKENS}",
                        {"encoder": encoder_name, "max_tokens": str(MAX_TOKENS)}, writer=writer,
                        row_shape=(None, dim) if dim is not None else None)


def caption_tokens(texts: Sequence[str], encoder_name: str, cache_root: Path, hub_cache: Path | None = None, *,
                   device: str | torch.device = "cpu", batch_size: int = 256, rank: int = 0, world: int = 1,
                   writer: str = "", read_back: bool = True) -> CachedTensors | None:
    """Lazy (L_i, D) float32 token states of each text (a ragged ``CachedTensors``), the missing ones computed
    first with the frozen encoder on ``device``, ``batch_size`` texts at a time, each batch written as a float16
    shard as it comes (never all held at once). ``rank::world`` splits the missing texts between processes (the
    extract command); ``read_back=False`` returns None instead of the view (before the other processes finish)."""
    cache = text_cache(encoder_name, cache_root, writer)
    keys = [text_digest(t) for t in texts]
    if cache.missing(keys):
        # The share is taken before looking at the cache: other processes write into it meanwhile.
        todo = [t for t in list(dict.fromkeys(texts))[rank::world] if text_digest(t) not in cache]
        if todo:
            log.info("encoding %d caption(s) with %s on %s", len(todo), encoder_name, device)
            encoder = load_text_encoder(encoder_name, cache_dir=hub_cache, device=device)
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                states = encoder.token_states(chunk, MAX_TOKENS)
                cache.add({text_digest(t): s.half() for t, s in zip(chunk, states)})
    return cache.view(keys, torch.float32, ragged=True) if read_back else None


def pad_tokens(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) zero-padded states and the (N, L) mask of real tokens (L: the longest of these; the
    ``TileDataset`` pads each batch to its own longest caption)."""
    if not tokens:
        return torch.zeros(0, 0, 1), torch.zeros(0, 0, dtype=torch.bool)
    longest = max(len(t) for t in tokens)
    out = torch.zeros(len(tokens), longest, tokens[0].shape[-1])
    mask = torch.zeros(len(tokens), longest, dtype=torch.bool)
    for i, t in enumerate(tokens):
        out[i, : len(t)] = t
        mask[i, : len(t)] = True
    return out, mask


__all__ = ["MAX_TOKENS", "read_captions", "check_captions", "text_cache", "caption_tokens", "pad_tokens"]
