"""Write phantom data sets in real on-disk formats.

Example:
    python -m common.phantoms cxr --format medmnist --out data/phantom --n 600 --size 28
    python -m common.phantoms cxr --format iu --out data/iu_phantom --n 200
    python -m common.phantoms cxr --format chexpert --out data/chexpert_phantom --n 500
    python -m common.phantoms histology --out data/histology_phantom --n 80 --schema 2025
    python -m common.phantoms brain --out data/brain_phantom --n 120 --size 64 64 48
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.cli import MedvlArgumentParser, nonnegative_int, parse_args, positive_int, seed_int
from common.errors import ConfigError, cli_entry

FORMATS = ("medmnist", "iu", "chexpert")
MEDMNIST_SIZES = (28, 64, 128, 224)
MIN_IU_SIZE = 32
"""Below this side a lesion (3.5-5.5% of the side) is under one pixel and the lung zones blur together."""
MIN_IU_PATIENTS = 10
"""Fewer patients cannot fill a 70/10/20 patient split with at least one patient in each part."""
MIN_CHEXPERT_SIZE = 48
"""Below this side the atelectasis band and the effusion meniscus are under a pixel."""
MIN_CHEXPERT_PATIENTS = 10
MIN_HISTOLOGY_SIZE = 48
"""Below this side a nucleus is under a pixel and the vessel rings close up."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(prog="python -m common.phantoms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True, parser_class=MedvlArgumentParser)
    cxr = sub.add_parser("cxr", help="chest radiograph phantoms")
    cxr.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    cxr.add_argument("--out", type=Path, required=True, help="directory the phantom data set is written into")
    cxr.add_argument("--n", type=positive_int, default=None,
                     help="number of images (medmnist) or training patients (iu, chexpert); default depends on the "
                          "format")
    cxr.add_argument("--seed", type=seed_int, default=0,
                     help="seed of the generator (the same seed writes the same files)")
    cxr.add_argument("--size", type=positive_int, default=None,
                     help=f"image side in pixels (medmnist: one of {MEDMNIST_SIZES}; iu: at least {MIN_IU_SIZE}; "
                          f"chexpert: at least {MIN_CHEXPERT_SIZE})")
    histology = sub.add_parser("histology", help="BraTS-Path H&E tiles, labels CSV and captions")
    histology.add_argument("--out", type=Path, required=True, help="directory the phantom data set is written into")
    histology.add_argument("--n", type=positive_int, default=None, help="tiles per class (default 80)")
    histology.add_argument("--seed", type=seed_int, default=0,
                           help="seed of the generator (the same seed writes the same files)")
    histology.add_argument("--size", type=positive_int, default=None, help="tile side in pixels (default 128)")
    histology.add_argument("--schema", choices=("2024", "2025", "2026"), default="2025",
                           help="BraTS-Path edition whose class list the tiles use")
    brain = sub.add_parser("brain", help="BraTS 2020 FLAIR volumes with TextBraTS reports, healthy controls, truth")
    brain.add_argument("--out", type=Path, required=True, help="directory the phantom data set is written into")
    brain.add_argument("--n", type=positive_int, default=None, help="tumour cases (default 120)")
    brain.add_argument("--healthy", type=nonnegative_int, default=None,
                       help="healthy controls written to OUT/healthy (default: a fifth of --n, at least 1)")
    brain.add_argument("--seed", type=seed_int, default=0,
                       help="seed of the generator (the same seed writes the same files)")
    brain.add_argument("--size", type=positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                       help="voxels left-right, back-front, down-up (default 64 64 48) over a fixed 240 x 240 x 180 "
                            "mm field of view")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError("--out", f"{args.out} is a file, not a directory")
    if args.kind == "brain":
        from common.phantoms import brain

        size = tuple(args.size or brain.DEFAULT_SIZE)
        if min(size) < brain.MIN_SIZE:
            raise ConfigError("--size", f"{size[0]} {size[1]} {size[2]} voxels cannot draw a tumour's core and edema; "
                                        f"use at least {brain.MIN_SIZE} a side")
        if max(size) > brain.MAX_SIZE:
            raise ConfigError("--size", f"{max(size)} voxels is more than the phantom's {brain.MAX_SIZE} a side")
        if args.n is not None and args.n < brain.MIN_N:
            raise ConfigError("--n", f"{args.n} tumour cases cannot fill a side-stratified train/val/test split; use "
                                     f"at least {brain.MIN_N}")
        path = brain.write_brain(args.out, n=args.n or brain.DEFAULT_N, seed=args.seed, size=size,
                                 n_healthy=args.healthy)
        print(f"wrote {path}")
        return 0
    if args.kind == "histology":
        from common.phantoms import histology

        if args.size is not None and args.size < MIN_HISTOLOGY_SIZE:
            raise ConfigError("--size", f"{args.size} px is too small for the textures; use at least "
                                        f"{MIN_HISTOLOGY_SIZE}")
        path = histology.write_histology(args.out, n=args.n or histology.DEFAULT_N, seed=args.seed,
                                         size=args.size or histology.DEFAULT_SIZE, schema=args.schema)
        print(f"wrote {path}")
        return 0
    if args.format not in FORMATS:
        raise ConfigError("--format", f"unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.format == "medmnist" and args.size is not None and args.size not in MEDMNIST_SIZES:
        raise ConfigError("--size", f"PneumoniaMNIST comes in sizes {MEDMNIST_SIZES}, not {args.size}")
    if args.format == "iu" and args.size is not None and args.size < MIN_IU_SIZE:
        raise ConfigError("--size", f"{args.size} px is too small to draw lesions in lung zones; use at least "
                                    f"{MIN_IU_SIZE}")
    if args.format == "iu" and args.n is not None and args.n < MIN_IU_PATIENTS:
        raise ConfigError("--n", f"{args.n} patients cannot fill train/val/test; use at least {MIN_IU_PATIENTS}")
    if args.format == "chexpert" and args.size is not None and args.size < MIN_CHEXPERT_SIZE:
        raise ConfigError("--size", f"{args.size} px is too small to draw the findings; use at least "
                                    f"{MIN_CHEXPERT_SIZE}")
    if args.format == "chexpert" and args.n is not None and args.n < MIN_CHEXPERT_PATIENTS:
        raise ConfigError("--n", f"{args.n} patients cannot fill a train/val split with every finding; use at least "
                                 f"{MIN_CHEXPERT_PATIENTS}")
    if args.format == "medmnist":
        from common.phantoms.cxr import write_medmnist

        path = write_medmnist(args.out, n=args.n or 600, seed=args.seed, size=args.size or 28)
    elif args.format == "chexpert":
        from common.phantoms import chexpert

        path = chexpert.write_chexpert(args.out, n=args.n or chexpert.DEFAULT_N, seed=args.seed,
                                       size=args.size or chexpert.DEFAULT_SIZE)
    else:
        from common.phantoms.iu import DEFAULT_N, DEFAULT_SIZE, write_iu

        path = write_iu(args.out, n=args.n or DEFAULT_N, seed=args.seed, size=args.size or DEFAULT_SIZE)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
