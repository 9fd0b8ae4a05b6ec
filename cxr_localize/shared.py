"""What this pipeline's commands share: the data and encoder flags of both training phases and the split they
derive, so both phases read the data alike. A flag more than one command takes is defined here once
(``add_*_arg``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from common.cli import nonnegative_int, positive_float, positive_int, seed_int
from common.splits import split_csv_text
from cxr_localize.data import MASK_DIR, PROJECTIONS, SPLIT_LEVELS, read_tables, split_assignments
from cxr_localize.model import DEFAULT_DECODER_CHANNELS


def image_side(text) -> int:
    """An image side the U-Net can take: its encoder halves the image five times."""
    value = positive_int(text)
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"expected a multiple of 32 (at least 32), got {value}")
    return value


def mask_threshold(text) -> float:
    """A binarisation level for soft masks: above 0 (else every pixel is lesion) and at most 1."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def add_data_root_arg(parser, help: str = "directory in the IU X-ray layout") -> None:
    parser.add_argument("--data-root", type=Path, default=None, help=help)


def add_skip_bad_arg(parser) -> None:
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of stopping")


def add_n_figures_arg(parser, default: int) -> None:
    parser.add_argument("--n-figures", type=nonnegative_int, default=default, help="images drawn in each figure")


def add_data_args(parser: argparse.ArgumentParser, projection: str, masks: bool = False) -> None:
    """The data flags of both phases; ``masks`` adds the ones about reading masks (phase 2)."""
    group = parser.add_argument_group("data")
    add_data_root_arg(group)
    group.add_argument("--image-size", type=image_side, default=128,
                       help="side the images are padded and resized to (a multiple of 32, the U-Net's stride)")
    group.add_argument("--projection", choices=PROJECTIONS, default=projection,
                       help="radiograph views used: Frontal, Lateral or all")
    group.add_argument("--split-level", choices=SPLIT_LEVELS, default="patient",
                       help="patient: all images of a uid in one split; image: the original per-image split")
    group.add_argument("--split-seed", type=seed_int, default=0, help="seed of the split (the same in both phases)")
    add_skip_bad_arg(group)
    group.add_argument("--limit", type=positive_int, default=None, help="use at most this many images per split")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="small shifts and contrast changes (never a flip)")
    if masks:
        group.add_argument(
            "--mask-threshold", type=mask_threshold, default=None, metavar="T",
            help="resize masks whose size differs from their image (bilinear, as the original notebook) and "
                 "masks that are not strictly 0/1 or 0/255, and binarise them at T (a fraction of 255; 0.5 marks "
                 "pixels at least half inside). Default: off, and such masks are an error")


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image encoder")
    group.add_argument("--encoder", default="resnet34", help="segmentation-models-pytorch encoder name")
    group.add_argument("--encoder-weights", default="imagenet", metavar="imagenet|none|FOLDER",
                       help="initial encoder weights: imagenet (the file smp downloads, from the hub or the Hugging "
                            "Face cache, --cache-dir if given), none (random), or a local folder holding "
                            "config.json + model.safetensors in smp's Hub layout or from smp's save_pretrained")
    group.add_argument("--decoder-channels", type=positive_int, nargs=5, default=list(DEFAULT_DECODER_CHANNELS),
                       help="U-Net decoder widths, deepest first (five numbers)")


def split_table(args: argparse.Namespace, with_masks: bool) -> tuple[pd.DataFrame, str]:
    """This phase's ``split.csv`` (id = image file, group = uid, or the file at image level, split) and its text.

    Returned rather than written: the training loop writes it with the run's other files, after validation.
    """
    _, projections = read_tables(args.data_root)
    assignment = split_assignments(projections, args.split_level, args.split_seed)
    if args.projection != "all":
        projections = projections[projections["projection"].astype(str).str.lower() == args.projection.lower()]
    if with_masks:
        projections = projections[[(args.data_root / MASK_DIR / f).is_file() for f in projections["filename"]]]
    groups = projections["uid"] if args.split_level == "patient" else projections["filename"]
    frame = pd.DataFrame({"id": projections["filename"].to_numpy(), "group": groups.to_numpy(),
                          "split": assignment[projections["filename"]].to_numpy()})
    return frame, split_csv_text(frame["id"], frame["group"], frame["split"])
