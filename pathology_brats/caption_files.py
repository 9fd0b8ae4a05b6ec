"""Caption files and their cached text-token states.

    python -c "from pathology_brats.caption_files import read_captions; print(len(read_captions('d/captions.jsonl')))"

Two formats: medvl's JSONL (one ``{"image", "caption"}`` per tile) and the seed's CSV (columns ``image, response``).
``image`` is a path as the writer knew it (relative to the data root, a file name, or someone else's absolute path);
a tile takes the caption whose path shares the longest tail with the tile's id (at least the file name), so the
seed's file with its own prefixes fits our data root. Two different captions for one image, or two that fit a tile
equally well, are an error naming them.

A JSONL caption file is appended to batch by batch while captions are generated, so its last line may be cut short by
a kill: such a line is dropped with a warning (the next run regenerates it). A malformed line anywhere else is an
error naming the line. The text encoder is frozen: each caption's token states (max length 128) are computed once
and cached by caption text and encoder (``common.feature_cache``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import torch

from common.errors import DataError
from common.feature_cache import CachedTensors, FeatureCache, text_digest
from common.rundir import read_csv, read_jsonl
from common.text_encoders import load_text_encoder

log = logging.getLogger("medvl.pathology_brats")

MAX_TOKENS = 128


CSV_CAPTION_COLUMNS = ("response", "caption")
"""Caption column of a CSV caption file: the seed's ``response``, or ``caption``."""


def _records(path: Path) -> list[tuple[int, object, object]]:
    """(record number, image, caption) of a JSONL or CSV caption file."""
    if path.suffix.lower() == ".csv":
        frame = read_csv(path, ("image",), "captions file not found", dtype=str, keep_default_na=False)
        column = next((c for c in CSV_CAPTION_COLUMNS if c in frame.columns), None)
        if column is None:
            raise DataError(path, f"needs an 'image' column and one of {', '.join(CSV_CAPTION_COLUMNS)} (has "
                                  f"{', '.join(map(str, frame.columns))})")
        return [(line, image, caption) for line, (image, caption) in
                enumerate(zip(frame["image"], frame[column]), start=2)]
    return [(number, record.get("image"), record.get("caption"))
            for number, record in enumerate(read_jsonl(path), start=1)]


def read_captions(path: Path) -> dict[str, str]:
    """``{image path as written (POSIX): caption}``; a truncated last JSONL line (a killed writer) is dropped with a
    warning; an image given two different captions is an error naming both records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "captions file not found")
    out: dict[str, str] = {}
    where: dict[str, int] = {}
    for number, image, caption in _records(path):
        if not isinstance(image, str) or not isinstance(caption, str) or not image.strip():
            raise DataError(path, f"record {number}: needs string 'image' and 'caption' fields")
        key = PurePosixPath(image.strip().replace("\\", "/")).as_posix()
        if key in out and out[key] != caption:
            raise DataError(path, f"records {where[key]} and {number} give {key!r} two different captions")
        out[key], where[key] = caption, where.get(key, number)
    return out


def _shared_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def match_captions(captions: dict[str, str], ids: Sequence[str], path: Path) -> dict[str, str]:
    """``{tile id: caption}`` for the ids some caption fits: the caption whose image path shares the longest tail
    with the id (the file name at least). Two different captions that fit one tile equally well are an error."""
    by_name: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for key, text in captions.items():
        parts = PurePosixPath(key).parts
        by_name.setdefault(parts[-1], []).append((parts, text))
    out: dict[str, str] = {}
    for tile in ids:
        parts = PurePosixPath(tile).parts
        candidates = by_name.get(parts[-1])
        if not candidates:
            continue
        scored = [(_shared_tail(parts, key), key, text) for key, text in candidates]
        best = max(score for score, _, _ in scored)
        fits = {text: key for score, key, text in scored if score == best}
        if len(fits) > 1:
            names = " and ".join(repr(k) for k in list(fits.values())[:2])
            raise DataError(path, f"{names} give {tile!r} different captions; name the images by their path "
                                  "under --data-root")
        out[tile] = next(iter(fits))
    return out


def check_captions(captions: dict[str, str], known: Sequence[str], needed: Sequence[str], path: Path,
                   skip_missing: bool = False) -> dict[str, str]:
    """``{tile id: caption}`` for ``needed`` ids. A caption whose file name is no image in ``known`` (ids or file
    names) is an error; a needed tile without a caption is an error, or with ``skip_missing`` left out."""
    known_names = {PurePosixPath(k).name for k in known}
    stray = [key for key in captions if PurePosixPath(key).name not in known_names]
    if stray:
        raise DataError(path, f"{len(stray)} caption(s) for images not in the data, e.g. {stray[0]!r}")
    found = match_captions(captions, needed, path)
    lacking = [tile for tile in needed if tile not in found]
    if lacking and not skip_missing:
        raise DataError(path, f"no caption for {len(lacking)} image(s), e.g. {lacking[0]!r}; generate them with "
                              "python -m pathology_brats.caption (or --skip-bad leaves such tiles out)")
    if lacking:
        log.warning("%s: %d tile(s) have no caption and are left out (--skip-bad)", path, len(lacking))
    return found


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


__all__ = ["MAX_TOKENS", "CSV_CAPTION_COLUMNS", "read_captions", "match_captions", "check_captions", "text_cache",
           "caption_tokens", "pad_tokens"]
