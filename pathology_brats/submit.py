"""Write a BraTS-Path submission: one ``SubjectID,Prediction`` row per image of a folder.

Example:
    python -m pathology_brats.submit --run-dir runs/brats_path/fused --images data/histology_phantom/val \\
        --out submission.csv

Every image file of ``--images`` gets a row (sorted by name); predictions are the schema's integer labels. An image
that does not decode gets the schema's penalty label (what the organisers would score for it anyway), and the count
is logged. Captions come from ``--captions`` (default: the run's captions file); an image without one gets an
empty caption (counted). The CSV is written atomically: an earlier submission is replaced whole or not at all.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.checkpoint import atomic_write_text
from common.cli import MedvlArgumentParser, base_parser, parse_args
from common.device import pick_device
from common.errors import ConfigError, cli_entry
from common.runs import load_run
from pathology_brats.captions import read_captions
from pathology_brats.data import unlabeled_images
from pathology_brats.evaluate import predict, run_inputs
from pathology_brats.inputs import TileDataset, default_feature_cache
from pathology_brats.model import build_run_model
from pathology_brats.schema import get_schema

log = logging.getLogger("medvl.pathology_brats")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(device=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of patches (e.g. BraTSPath_Val*.jpg)")
    parser.add_argument("--out", type=Path, required=True, help="the submission CSV to write")
    parser.add_argument("--captions", type=Path, default=None, help="captions JSONL (default: the run's)")
    parser.add_argument("--feature-cache", type=Path, default=None)
    return parser


def submission(run_dir: Path, images: Path, out: Path, captions: Path | None = None, device: str = "auto",
               cache_dir: Path | None = None, feature_cache: Path | None = None) -> pd.DataFrame:
    if out.is_dir():
        raise ConfigError("--out", f"{out} is a directory; name the CSV file to write")
    paths = unlabeled_images(images)
    torch_device = pick_device(device)
    run = load_run(run_dir, "pathology_brats", build_run_model, device=torch_device)
    schema = get_schema(run.meta["schema"])
    texts = None
    if run.meta["data"]["modality"] != "image":
        source = captions or Path(run.meta["data"]["captions"])
        texts = read_captions(source)
        lacking = sum(p.name not in texts for p in paths)
        if lacking:
            log.warning("%d of %d images have no caption in %s; they get an empty one", lacking, len(paths), source)
    ids = [p.name for p in paths]
    streams, kept = run_inputs(run.meta, paths, ids, torch_device, feature_cache or default_feature_cache(cache_dir),
                               cache_dir, captions=texts if texts is not None else {}, skip_bad=True)
    predictions = np.full(len(paths), schema.penalty, dtype=np.int64)
    if len(kept):
        probs = predict(run.model, TileDataset(np.zeros(len(kept)), streams.get("image"), streams.get("text"),
                                               streams.get("text_mask")))
        predictions[kept] = probs.argmax(1)
    unreadable = len(paths) - len(kept)
    if unreadable:
        log.warning("%d unreadable image(s) get the penalty label %d", unreadable, schema.penalty)
    frame = pd.DataFrame({"SubjectID": ids, "Prediction": predictions})
    atomic_write_text(out, frame.to_csv(index=False))
    return frame


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    frame = submission(args.run_dir, args.images, args.out, args.captions, args.device, args.cache_dir,
                       args.feature_cache)
    print(f"wrote {args.out}: {len(frame)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
