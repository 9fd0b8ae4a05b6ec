"""Frozen-feature extraction for BraTS-Path at real scale: the streamed path against the former in-memory one.

    python -m benchmarks.pathology_extract --sizes 1000 4000 16000 --device cpu --json extract.json
    python -m benchmarks.pathology_extract --sizes 16000 73900 --device cuda --encoder prov-gigapath

Tiles are 384 px phantom JPEGs (``common.phantoms.histology`` textures, as large as BraTS-Path's patches): a pool
of distinct tiles is drawn once and every file is one of them with its own number in a JPEG comment, so each file
has its own content digest (nothing is deduplicated) and decodes as a full 384 px tile. They are written once under
``--work-dir`` (default: a ``medvl-extract-bench`` folder in the temp directory) and reused.

Each row runs in a fresh subprocess with an empty feature cache, so its peak resident memory is its own: the larger
of the row's process and its DataLoader workers (``ru_maxrss``). Both paths extract every tile, then read the
features back as training does: one streaming standardisation pass and one shuffled epoch of batches of 32.

- ``streamed``: ``pathology_brats.extract.encode_tiles`` (decoding in ``--num-workers`` DataLoader workers, batches
  encoded under autocast on CUDA, shards of 256 tiles), a lazy ``CachedTensors`` read back a batch at a time.
- ``in_memory``: a copy of the former ``encode_tiles`` (tiles decoded one by one in the main process, no
  autocast, a shard per batch, every feature stacked into one tensor), the in-memory standardisation and
  batches sliced from that tensor. Run up to ``--in-memory-max`` tiles.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.errors import cli_entry
from common.rundir import atomic_write_text
from common.tables import markdown_table

PATHS = ("streamed", "in_memory")
POOL = 32
TILE_PX = 384


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(device=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[1000, 4000, 16000],
                        help="tile counts measured, one row each")
    parser.add_argument("--encoder", default="gigapath-tiny", help="gigapath-tiny (offline) or prov-gigapath")
    parser.add_argument("--image-tokens", type=positive_int, default=5,
                        help="class token + pooled patch grid (1 + g^2)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="tiles per encoder batch")
    parser.add_argument("--num-workers", type=int, default=None, help="streamed path (default: extract's)")
    parser.add_argument("--paths", choices=PATHS, nargs="+", default=list(PATHS), help="extraction paths measured")
    parser.add_argument("--in-memory-max", type=positive_int, default=16000,
                        help="largest size the in-memory path is run at (it holds every feature)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads in each row's process (default: torch's own choice)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the phantom tiles are written once and reused")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--row", nargs=2, metavar=("PATH", "TILES"), help=argparse.SUPPRESS)
    return parser


# --- tiles ---------------------------------------------------------------------------------------------------------

def _with_comment(jpeg: bytes, number: int) -> bytes:
    """The same JPEG with a COM segment after SOI naming ``number``: another digest, the same pixels."""
    text = f"medvl benchmark tile {number}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def write_tiles(folder: Path, count: int) -> list[Path]:
    """``count`` distinct 384 px tile files under ``folder`` (written once, reused), their paths in order."""
    from PIL import Image

    from common.phantoms.histology import SCHEMA_CLASSES, tile

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"tile_{i:06d}.jpg" for i in range(count)]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        rng = np.random.default_rng(0)
        classes = SCHEMA_CLASSES["2025"]
        pool = []
        for i in range(POOL):
            image = tile(classes[i % len(classes)], TILE_PX, rng, float(rng.random()))
            buffer = io.BytesIO()
            Image.fromarray((image * 255).round().astype(np.uint8), mode="RGB").save(buffer, "JPEG", quality=90)
            pool.append(buffer.getvalue())
        for i in todo:
            paths[i].write_bytes(_with_comment(pool[i % POOL], i))
    return paths


# --- the two paths -------------------------------------------------------------------------------------------------

@torch.no_grad()
def former_encode_tiles(encoder, paths, cache, device, normalize="imagenet", batch_size=32):
    """The former ``pathology_brats.encoder.encode_tiles`` (before streaming), as it was: decode and preprocess one
    tile at a time in the main process, encode without autocast, a shard per batch, then every feature stacked."""
    from common.feature_cache import file_digest
    from pathology_brats.encoder import preprocess, read_rgb

    digests = [file_digest(p) for p in paths]
    kept = list(range(len(paths)))
    todo = [i for i in kept if digests[i] in set(cache.missing([digests[j] for j in kept]))]
    seen: set[str] = set()
    todo = [i for i in todo if not (digests[i] in seen or seen.add(digests[i]))]
    encoder.eval().to(device)
    for start in range(0, len(todo), batch_size):
        chunk, images = [], []
        for i in todo[start : start + batch_size]:
            images.append(preprocess(read_rgb(paths[i]), normalize))
            chunk.append(i)
        tokens = encoder(torch.stack(images).to(device)).float().cpu()
        cache.add({digests[i]: t for i, t in zip(chunk, tokens)})
    return torch.stack(cache.get([digests[i] for i in kept])), np.asarray(kept, dtype=np.int64)


def _read_back(model, features, batch_size: int) -> float:
    """What training reads: the standardisation fit, then one shuffled epoch of batches."""
    from pathology_brats.shared import TileDataset

    model.fit_standardization(features)
    dataset = TileDataset(np.zeros(len(features)), features)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    total = 0.0
    for batch in loader:
        total += float(batch["image"].sum())
    return total


def run_row(path: str, tiles: int, args: argparse.Namespace) -> dict:
    from common.device import pick_device
    from pathology_brats.encoder import cache_for, load_tile_encoder
    from pathology_brats.extract import encode_tiles, view_cache
    from pathology_brats.model import TileCaptionClassifier

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = write_tiles(args.work_dir / "tiles", tiles)
    torch.manual_seed(0)
    encoder = load_tile_encoder(args.encoder, args.image_tokens)
    model = TileCaptionClassifier(encoder.dim, 1, 9, modality="image")
    cache_root = Path(tempfile.mkdtemp(prefix=f"cache-{path}-", dir=args.work_dir))
    try:
        start = time.perf_counter()
        if path == "streamed":
            features, _ = encode_tiles(encoder, paths, view_cache(encoder, cache_root, "imagenet"), device,
                                       batch_size=args.batch_size, num_workers=args.num_workers)
        else:
            features, _ = former_encode_tiles(encoder, paths, cache_for(encoder, cache_root, "imagenet"), device,
                                              batch_size=args.batch_size)
        _read_back(model, features, args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    main_rss, workers_rss = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF,
                                                                                  resource.RUSAGE_CHILDREN))
    return {"tiles": tiles, "path": path, "seconds": round(seconds, 2), "tiles_per_s": round(tiles / seconds, 1),
            "peak_rss_mb": round(max(main_rss, workers_rss), 1), "main_rss_mb": round(main_rss, 1),
            "workers_rss_mb": round(workers_rss, 1)}


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    args.work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "medvl-extract-bench")
    if args.row:
        print(json.dumps(run_row(args.row[0], int(args.row[1]), args)))
        return 0
    write_tiles(args.work_dir / "tiles", max(args.sizes))
    rows = []
    for tiles in args.sizes:
        for path in args.paths:
            if path == "in_memory" and tiles > args.in_memory_max:
                continue
            command = [sys.executable, "-m", "benchmarks.pathology_extract", "--row", path, str(tiles),
                       "--device", args.device, "--encoder", args.encoder, "--image-tokens", str(args.image_tokens),
                       "--batch-size", str(args.batch_size), "--work-dir", str(args.work_dir)]
            if args.threads is not None:
                command += ["--threads", str(args.threads)]
            if args.num_workers is not None:
                command += ["--num-workers", str(args.num_workers)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{rows[-1]}", file=sys.stderr, flush=True)
    print(markdown_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps({"rows": rows, "device": args.device, "encoder": args.encoder},
                                                indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
