"""Write a BraTS-Path submission: one ``SubjectID,Prediction`` row per image of a folder.

Example:
    python -m pathology_brats.submit --run-dir runs/brats_path/fused --images data/histology_phantom/val \\
        --out submission.csv

Every readable image file of ``--images`` gets a row (sorted by name) with a class code of the schema. An image that
does not decode gets no row: the organisers' validator accepts only the schema's class codes, and their scorer gives
every missing row the penalty label anyway. Such images are listed with the reason in ``<out>.skipped.csv``
(``file,reason``) and counted in the log. Predictions come from the same code as ``evaluate``'s
(``pathology_brats.inference``), so a tile gets the same class from both. Captions come from ``--captions`` (default:
the run's captions file; any folder's images, matched by their path's tail); an image without one gets an empty
caption (counted). Before anything is written the rows are checked with the organisers' rules
(``pathology_brats.validate``); the CSV is written atomically: an earlier submission is replaced whole or not at all.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from common.cli import MedvlArgumentParser, base_parser, parse_args
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.run_guard import guard_command
from common.rundir import atomic_write_text
from common.runs import load_run
from pathology_brats.caption_files import match_captions, read_captions
from pathology_brats.data import unlabeled_images
from pathology_brats.encoder import read_rgb
from pathology_brats.inference import tile_probabilities
from pathology_brats.model import build_run_model
from pathology_brats.schema import get_schema
from pathology_brats.shared import (
    add_captions_arg,
    add_feature_cache_arg,
    add_images_arg,
    add_tta_arg,
    default_feature_cache,
)
from pathology_brats.validate import submission_violations

log = logging.getLogger("medvl.pathology_brats")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(device=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="run directory written by pathology_brats.train")
    add_images_arg(parser, help="folder of patches (e.g. BraTSPath_Val*.jpg)", required=True)
    parser.add_argument("--out", type=Path, required=True, help="the submission CSV to write")
    add_captions_arg(parser, help="captions JSONL (default: the run's)")
    add_tta_arg(parser)
    add_feature_cache_arg(parser)
    return parser


def skipped_path(out: Path) -> Path:
    """Where the unreadable images of a submission are listed: ``<out>.skipped.csv``."""
    return out.with_name(out.name + ".skipped.csv")


def submission(run_dir: Path, images: Path, out: Path, captions: Path | None = None, device: str = "auto",
               cache_dir: Path | None = None, feature_cache: Path | None = None, tta: int = 1) -> pd.DataFrame:
    out, run_dir = Path(out), Path(run_dir)
    if out.is_dir():
        raise ConfigError("--out", f"{out} is a directory; name the CSV file to write")
    paths = unlabeled_images(images)
    torch_device = pick_device(device)
    run = load_run(run_dir, "pathology_brats", build_run_model, device=torch_device)
    schema = get_schema(run.meta["schema"])
    texts = None
    if run.meta["data"]["modality"] != "image":
        source = captions or Path(run.meta["data"]["captions"])
        ids = [f"{images.name}/{p.name}" for p in paths]
        found = match_captions(read_captions(source), ids, source)
        lacking = sum(tile not in found for tile in ids)
        if lacking:
            log.warning("%d of %d images have no caption in %s; they get an empty one", lacking, len(paths), source)
        texts = [found.get(tile, "") for tile in ids]
    probs, kept = tile_probabilities(run, paths, texts, torch_device,
                                     feature_cache or default_feature_cache(cache_dir), cache_dir, skip_bad=True,
                                     tta=tta)
    skipped = [(p.name, unreadable_reason(p)) for i, p in enumerate(paths) if i not in set(kept.tolist())]
    if not len(kept):
        raise DataError(images, f"none of its {len(paths)} image(s) could be read (e.g. {skipped[0][0]}: "
                                f"{skipped[0][1]})")
    frame = pd.DataFrame({"SubjectID": [paths[i].name for i in kept], "Prediction": probs.argmax(1)})
    violations = submission_violations(frame, schema, images)
    if violations:
        raise DataError(out, f"the submission breaks the {schema.year} rules: {violations[0]}")
    if skipped:
        log.warning("%d unreadable image(s) left out (the scorer gives them the penalty label %d); listed in %s",
                    len(skipped), schema.penalty, skipped_path(out))
    atomic_write_text(skipped_path(out), pd.DataFrame(skipped, columns=["file", "reason"]).to_csv(index=False))
    atomic_write_text(out, frame.to_csv(index=False))
    return frame


def unreadable_reason(path: Path) -> str:
    """Why an image was left out: the decoder's one-line complaint."""
    try:
        read_rgb(path)
    except DataError as err:
        return err.message
    return "left out by the encoder"


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("out",), reads=("run_dir", "images", "captions", "feature_cache", "cache_dir"))
    frame = submission(args.run_dir, args.images, args.out, args.captions, args.device, args.cache_dir,
                       args.feature_cache, args.tta)
    print(f"wrote {args.out}: {len(frame)} rows (unreadable images: {skipped_path(args.out)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
