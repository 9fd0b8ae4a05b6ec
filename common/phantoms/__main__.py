"""Write phantom data sets in real on-disk formats.

Example:
    python -m common.phantoms cxr --format medmnist --out data/phantom --n 600 --size 28
    python -m common.phantoms cxr --format iu --out data/iu_phantom --n 200
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.errors import ConfigError, cli_entry

FORMATS = ("medmnist", "iu")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m common.phantoms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    cxr = sub.add_parser("cxr", help="chest radiograph phantoms")
    cxr.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    cxr.add_argument("--out", type=Path, required=True)
    cxr.add_argument("--n", type=int, default=None, help="number of images (default depends on the format)")
    cxr.add_argument("--seed", type=int, default=0)
    cxr.add_argument("--size", type=int, default=None, help="image side in pixels")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.format not in FORMATS:
        raise ConfigError("--format", f"unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.format == "medmnist":
        from common.phantoms.cxr import write_medmnist

        path = write_medmnist(args.out, n=args.n or 600, seed=args.seed, size=args.size or 28)
    else:
        from common.phantoms.iu import DEFAULT_N, DEFAULT_SIZE, write_iu

        path = write_iu(args.out, n=args.n or DEFAULT_N, seed=args.seed, size=args.size or DEFAULT_SIZE)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
