"""Frozen-feature extraction for BraTS-Path: tiles decoded in DataLoader workers, encoded on the device, streamed
into cache shards, read back lazily, batch by batch.

    python -m pathology_brats.extract --data-root data/brats_path --encoder prov-gigapath \\
        --text-encoder biolinkbert-large --feature-cache /scratch/features [--images data/brats_path/val] [--tta 8]
    accelerate launch --num_processes 4 -m pathology_brats.extract ...      # each process takes every 4th tile

Train, evaluate and submit extract whatever is missing themselves (one process), so this command is only a
speed-up: several GPUs at once, and the validation patches or the eight dihedral views (``--tta 8``) before the
runs that need them. Workers decode and crop the JPEGs (``--num-workers``; pinned memory on CUDA); each batch is
normalised and encoded on the device under autocast (bf16, or fp16 before Ampere; none on a CPU, so CPU features
equal the old path's), and written to the cache every ``--shard-tiles`` tiles: a kill leaves complete shards only,
and a rerun encodes only what is missing. Under ``accelerate launch`` process r of w encodes the missing tiles
``r::w`` into its own shards (``shard-r<r>-...``); process 0 waits for all and checks that nothing is missing.
Caption token states are computed on the device the same way (float16 shards, keyed by caption text).

Read back, features are ``common.feature_cache.CachedTensors``: lazy (N, T, D) views that a ``TileDataset`` reads
a batch at a time, so memory does not grow with the number of tiles.

Dihedral views: ``dihedral(pixels, k)`` is ``rot90`` by ``k % 4`` over (H, W), then a horizontal flip when
``k >= 4`` (k = 0 is the tile itself). View k != 0 is cached in its own namespace (``...-d<k>``), so test-time
augmentation can average the classifier's probabilities over ``DIHEDRAL`` = 8 views (``image_inputs(...,
dihedral=k)`` or ``view_features``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import compute_dtype, pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.feature_cache import CachedTensors, FeatureCache, file_digest
from common.run_guard import guard_command
from pathology_brats.encoder import (
    PROV_GIGAPATH_PREPROCESSING,
    TileEncoder,
    TilePreprocessing,
    cache_for,
    crop_pixels,
    load_tile_encoder,
    normalize_pixels,
    read_rgb,
)

log = logging.getLogger("medvl.pathology_brats")

DIHEDRAL = 8
"""Views of the dihedral group of the square: 4 rotations, each with and without a horizontal flip."""
SHARD_TILES = 256
"""Tiles per written shard: 7.5 MiB of Prov-GigaPath features (5 x 1536 float32); a kill loses at most these."""


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: allocations at least this large are mmapped, and unmapped when freed."""


@functools.cache
def fixed_mmap_threshold(size: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (once per process; Linux with glibc only, else nothing).

    By default glibc raises the threshold to the size of each large block freed (up to 32 MiB), so after the
    first batch the 19 MiB float buffers of each normalised batch come from the heap, which fragments and keeps
    its high-water mark: measured +300 to +450 MiB of peak RSS over 4,000 tiles with a decoding worker, varying
    from run to run, against +100 MiB with the threshold fixed at 1 MiB. Process-wide, as the setting is."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(size)))
    except (OSError, AttributeError):
        return False


def dihedral(pixels: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th dihedral view of (..., H, W) pixels: ``rot90`` by k % 4 over (H, W), then a horizontal flip when
    k >= 4. k = 0 is the identity; views 4..7 are their own inverses."""
    if not 0 <= int(k) < DIHEDRAL:
        raise ConfigError("--tta", f"a dihedral view is 0..{DIHEDRAL - 1}, not {k}")
    out = torch.rot90(pixels, int(k) % 4, dims=(-2, -1)) if k % 4 else pixels
    return out.flip(-1) if k >= 4 else out


def view_cache(encoder: TileEncoder, root: Path, normalize: str, view: int = 0, writer: str = "") -> FeatureCache:
    """The cache of dihedral view ``view`` of ``encoder``'s features: ``cache_for``'s namespace for view 0 (the
    caches written before views existed), ``<namespace>-d<k>`` with ``dihedral: k`` in its metadata otherwise."""
    base = cache_for(encoder, root, normalize)
    namespace, meta = base.namespace, dict(base.meta)
    if view:
        dihedral(torch.zeros(1, 1), view)  # checks the range
        namespace, meta = f"{namespace}-d{view}", {**meta, "dihedral": str(view)}
    return FeatureCache(root, namespace, meta, writer=writer, row_shape=(encoder.image_tokens, encoder.dim))


def default_workers(device: torch.device, num_processes: int = 1) -> int:
    """Decoding workers: one on a CPU with a spare core (decoding a 384 px JPEG and its bicubic resize cost as
    much as the tiny encoder, so they overlap), none on a single core; up to 8 per process on a GPU, leaving a
    core per process for the loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, num_processes)
    if device.type == "cpu":
        return 1 if per_process >= 2 else 0
    return max(0, min(8, per_process - 1))


class TileCrops(Dataset):
    """(position, uint8 (3, S, S) crop of the tile, ok): decoding and cropping run in DataLoader workers; a file
    that does not decode comes back as ``ok = False`` (with its reason) for the main process to stop or skip."""

    def __init__(self, paths: Sequence[Path], preprocessing, view: int = 0):
        self.paths, self.preprocessing, self.view = list(paths), preprocessing, view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            crop = crop_pixels(read_rgb(self.paths[i]), self.preprocessing)
        except DataError as err:
            return i, torch.zeros(3, self.preprocessing.crop, self.preprocessing.crop, dtype=torch.uint8), err.message
        return i, dihedral(crop, self.view) if self.view else crop, ""


def _collate(rows):
    positions, crops, errors = zip(*rows)
    return torch.as_tensor(positions), torch.stack(crops), list(errors)


def tile_digests(paths: Sequence[Path], skip_bad: bool) -> tuple[list[str | None], list[int]]:
    """Content digest of each file (None where it is missing) and the positions of missing files; a missing file
    stops with its name unless ``skip_bad``."""
    digests: list[str | None] = []
    for path in paths:
        if Path(path).is_file():
            digests.append(file_digest(path))
        elif skip_bad:
            digests.append(None)
        else:
            raise DataError(path, "image file not found")
    return digests, [i for i, d in enumerate(digests) if d is None]


@torch.no_grad()
def extract_tiles(encoder: TileEncoder, paths: Sequence[Path], cache: FeatureCache, device: torch.device,
                  normalize: str = "imagenet", batch_size: int = 32, skip_bad: bool = False, *,
                  num_workers: int | None = None, dihedral_view: int = 0, rank: int = 0, world: int = 1,
                  shard_tiles: int = SHARD_TILES, digests: list[str | None] | None = None) -> list[int]:
    """Encode the tiles of ``paths`` missing from ``cache`` (this process's share ``rank::world`` of them) and
    write them in shards of ``shard_tiles`` as they come; returns the positions that do not decode (skipped with
    ``skip_bad``, else the first one stops with its name)."""
    if digests is None:
        digests, _ = tile_digests(paths, skip_bad)
    first: dict[str, int] = {}
    for i, digest in enumerate(digests):
        if digest is not None and digest not in first:
            first[digest] = i
    # The share is taken before looking at the cache: other processes write into it meanwhile.
    todo = [i for i in list(first.values())[rank::world] if digests[i] not in cache]
    if not todo:
        return []
    log.info("encoding %d tiles with %s%s (%d cached)", len(todo), encoder.name,
             f", view {dihedral_view}" if dihedral_view else "", len(cache))
    workers = default_workers(device, world) if num_workers is None else num_workers
    loader = DataLoader(TileCrops([paths[i] for i in todo], encoder.preprocessing, dihedral_view),
                        batch_size=batch_size, num_workers=min(workers, max(0, len(todo) // batch_size)),
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    fixed_mmap_threshold()
    encoder.eval().to(device)
    autocast = torch.autocast(device.type, dtype=compute_dtype(device), enabled=device.type == "cuda")
    bad: list[int] = []
    pending: dict[str, torch.Tensor] = {}
    for positions, crops, errors in loader:
        ok = [j for j, e in enumerate(errors) if not e]
        for j, error in enumerate(errors):
            if error:
                if not skip_bad:
                    raise DataError(paths[todo[int(positions[j])]], error)
                bad.append(todo[int(positions[j])])
        if not ok:
            continue
        if len(ok) < len(errors):
            crops, positions = crops[ok], positions[ok]
        pixels = crops.to(device, non_blocking=True)
        with autocast:
            tokens = encoder(normalize_pixels(pixels, normalize, encoder.preprocessing))
        tokens = tokens.float().cpu()
        pending.update({digests[todo[int(p)]]: t for p, t in zip(positions, tokens)})
        if len(pending) >= shard_tiles:
            cache.add(pending)
            pending = {}
    if pending:
        cache.add(pending)
    if bad:
        log.warning("skipped %d unreadable image(s) (--skip-bad)", len(bad))
    return bad


def encode_tiles(encoder: TileEncoder, paths: Sequence[Path], cache: FeatureCache, device: torch.device,
                 normalize: str = "imagenet", batch_size: int = 32, skip_bad: bool = False, *,
                 num_workers: int | None = None, dihedral_view: int = 0,
                 shard_tiles: int = SHARD_TILES) -> tuple[CachedTensors, np.ndarray]:
    """(lazy (N, T, D) float32 features, indices of ``paths`` kept): the missing ones encoded and cached first.

    A file that does not decode stops with its name, or with ``skip_bad`` is left out (and counted). Pass the
    cache of the same dihedral view (``view_cache``) as ``dihedral_view``.
    """
    if cache.meta.get("dihedral", "0") != str(dihedral_view):
        raise ConfigError("--tta", f"the cache {cache.namespace} is not the one of dihedral view {dihedral_view}; "
                                   "take it from view_cache")
    digests, missing_files = tile_digests(paths, skip_bad)
    bad = set(missing_files) | set(extract_tiles(encoder, paths, cache, device, normalize, batch_size, skip_bad,
                                                 num_workers=num_workers, dihedral_view=dihedral_view,
                                                 shard_tiles=shard_tiles, digests=digests))
    if missing_files:
        log.warning("skipped %d missing image(s) (--skip-bad)", len(missing_files))
    kept = [i for i, d in enumerate(digests) if i not in bad and d is not None and d in cache]
    return cache.view([digests[i] for i in kept]), np.asarray(kept, dtype=np.int64)


def view_features(encoder: TileEncoder, paths: Sequence[Path], cache_root: Path, device: torch.device,
                  normalize: str = "imagenet", view: int = 0, skip_bad: bool = False,
                  **kwargs) -> tuple[CachedTensors, np.ndarray]:
    """Lazy (N, T, D) features of dihedral view ``view`` of each tile (encoded and cached where missing), and the
    indices kept: what test-time augmentation averages over, for view in range(DIHEDRAL)."""
    return encode_tiles(encoder, paths, view_cache(encoder, cache_root, normalize, view), device, normalize,
                        skip_bad=skip_bad, dihedral_view=view, **kwargs)


def pixel_tiles(paths: list[Path], skip_bad: bool = False,
                preprocessing: TilePreprocessing = PROV_GIGAPATH_PREPROCESSING) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 3, S, S) uint8 crops of ``paths`` (the encoder's resize and crop) for training through the encoder, and
    the indices kept."""
    crops, kept = [], []
    for i, path in enumerate(paths):
        try:
            crops.append(crop_pixels(read_rgb(path), preprocessing))
            kept.append(i)
        except DataError:
            if not skip_bad:
                raise
    if len(kept) < len(paths):
        log.warning("skipped %d unreadable image(s) (--skip-bad)", len(paths) - len(kept))
    if not crops:
        return (torch.zeros(0, 3, preprocessing.crop, preprocessing.crop, dtype=torch.uint8),
                np.zeros(0, dtype=np.int64))
    return torch.stack(crops), np.asarray(kept, dtype=np.int64)


# --- the command ---------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    from pathology_brats.shared import (  # shared.py builds on this module
        add_captions_arg,
        add_data_root_arg,
        add_encoder_arg,
        add_feature_cache_arg,
        add_image_tokens_arg,
        add_images_arg,
        add_labels_csv_arg,
        add_normalize_arg,
        add_schema_arg,
        add_skip_bad_arg,
        add_text_encoder_arg,
        add_tta_arg,
    )

    parent = base_parser(device=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root_arg(parser)
    add_labels_csv_arg(parser)
    add_schema_arg(parser)
    add_images_arg(parser, help="a folder of unlabelled patches (submission)")
    add_captions_arg(parser, help="captions JSONL whose token states to cache (with --text-encoder)")
    add_encoder_arg(parser)
    add_image_tokens_arg(parser)
    add_normalize_arg(parser)
    add_text_encoder_arg(parser, default=None, help="also cache the captions' token states with it")
    add_feature_cache_arg(parser)
    add_tta_arg(parser, help="1: the tiles as they are; 8: all eight dihedral views, each cached on its own")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="tiles per encoder batch")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding workers per process (default: 1 on a CPU with 2+ cores, up to 8 on a GPU)")
    parser.add_argument("--shard-tiles", type=positive_int, default=SHARD_TILES, help="tiles per cache shard file")
    add_skip_bad_arg(parser)
    return parser


def _inputs(args: argparse.Namespace) -> tuple[list[Path], list[str], list[bool]]:
    """The tiles to extract, their ids (path under the data root; ``<folder>/<file>`` for unlabelled patches) and
    whether each is an unlabelled patch (which may lack a caption)."""
    from pathology_brats.data import load_tiles, unlabeled_images
    from pathology_brats.schema import get_schema

    paths, ids, unlabelled = [], [], []
    if args.data_root is not None:
        labelled = load_tiles(args.data_root, get_schema(args.schema), args.labels_csv)
        paths, ids, unlabelled = list(labelled.paths), labelled.ids, [False] * len(labelled)
    if args.images is not None:
        extra = unlabeled_images(args.images)
        paths += extra
        ids += [f"{args.images.name}/{p.name}" for p in extra]
        unlabelled += [True] * len(extra)
    if not paths:
        raise ConfigError("--data-root", "name the tiles: --data-root (labelled) and/or --images (unlabelled)")
    return paths, ids, unlabelled


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from accelerate import PartialState

    from pathology_brats.caption_files import caption_tokens, match_captions, read_captions
    from pathology_brats.shared import default_feature_cache

    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("feature_cache",), reads=("data_root", "labels_csv", "images", "captions"))
    paths, ids, unlabelled = _inputs(args)
    state = PartialState(cpu=args.device == "cpu")
    device = state.device if args.device == "auto" or state.num_processes > 1 else pick_device(args.device)
    rank, world = state.process_index, state.num_processes
    writer = f"r{rank}" if world > 1 else ""
    root = args.feature_cache or default_feature_cache(args.cache_dir)
    # Random weights (the tiny twins) come from a fixed seed, so every process and the training run agree.
    encoder = load_tile_encoder(args.encoder, args.image_tokens)
    digests, missing_files = tile_digests(paths, args.skip_bad)
    bad: set[int] = set(missing_files)
    for view in range(args.tta):
        cache = view_cache(encoder, root, args.normalize, view, writer)
        bad |= set(extract_tiles(encoder, paths, cache, device, args.normalize, args.batch_size, args.skip_bad,
                                 num_workers=args.num_workers, dihedral_view=view, rank=rank, world=world,
                                 shard_tiles=args.shard_tiles, digests=digests))
    texts = None
    if args.text_encoder:
        source = args.captions or (args.data_root / "captions.jsonl" if args.data_root else None)
        if source is None:
            raise ConfigError("--captions", "--text-encoder needs the captions file (or --data-root with one)")
        captions = match_captions(read_captions(source), ids, source)
        texts = [captions.get(tile, "" if extra else None) for tile, extra in zip(ids, unlabelled)]
        texts = [t for t in texts if t is not None]
        caption_tokens(texts, args.text_encoder, root, args.cache_dir, device=device, rank=rank, world=world,
                       writer=writer, read_back=False)
    state.wait_for_everyone()
    if world > 1:
        from accelerate.utils import gather_object

        bad = set(gather_object(sorted(bad)))
    if state.is_main_process:
        lacking = 0
        for view in range(args.tta):
            cache = view_cache(encoder, root, args.normalize, view)
            lacking += len(cache.missing([d for i, d in enumerate(digests) if d is not None and i not in bad]))
        if lacking:
            raise DataError(root, f"{lacking} tile feature(s) still missing after extraction")
        print(f"features of {len(paths) - len(bad)} tile(s) x {args.tta} view(s) cached in {root}"
              + (f", {len(bad)} unreadable" if bad else "")
              + (f"; token states of {len(set(texts))} caption(s)" if texts is not None else ""))
    return 0


__all__ = ["DIHEDRAL", "SHARD_TILES", "fixed_mmap_threshold", "dihedral", "view_cache", "default_workers",
           "TileCrops", "tile_digests", "extract_tiles", "encode_tiles", "view_features", "pixel_tiles"]


if __name__ == "__main__":
    raise SystemExit(main())
