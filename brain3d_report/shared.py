"""What this pipeline's commands share: the data flags of ``train`` and ``data`` (and ``cases_from_args``, which
reads them), where a trained run's data and preprocessed volumes are (``generate``, ``explain``, ``baselines``), and
the scoring flags of ``evaluate`` and ``baselines``. A flag more than one command takes is defined here once
(``add_*_arg``), so its name, type and help agree across the commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from brain3d_report.data import (
    DEFAULT_FRACTIONS,
    DEFAULT_SPLIT_SEED,
    DEFAULT_VOLUME_SIZE,
    Cases,
    load_cases,
    parse_volume_size,
)
from common.cli import nonnegative_int, positive_int, require, unit_interval
from common.errors import ConfigError
from common.feature_cache import default_cache_root

BERTSCORE_FLAG = ("auto", "minilm", "roberta-base", "none")


def add_data_root_arg(parser, help: str) -> None:
    """``--data-root``: a training command's data, or where a trained run's data is now (each says which)."""
    parser.add_argument("--data-root", type=Path, default=None, help=help)


def add_volume_cache_arg(parser) -> None:
    parser.add_argument("--volume-cache", type=Path, default=None,
                        help="folder of preprocessed volumes (default: <cache-dir>/volumes or ~/.cache/medvl/volumes)")


def add_split_arg(parser, default: str | None, help: str, choices: tuple[str, ...] | None = None) -> None:
    """``--split``: which cases a command reads (a split strategy for ``train``, a split's name elsewhere)."""
    parser.add_argument("--split", default=default, choices=choices, help=help)


def add_max_new_tokens_arg(parser, default: int | None,
                           help: str = "longest report written, in tokens") -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=default, help=help)


def add_supervoxels_arg(parser) -> None:
    parser.add_argument("--supervoxels", type=positive_int, default=64, help="SLIC supervoxels asked for")


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The data flags shared by the brain3d_report scripts."""
    group = parser.add_argument_group("data")
    add_data_root_arg(group, help="folder of case folders <ID>/<ID>_flair.nii[.gz] or <ID>/<ID>-t2f.nii.gz")
    group.add_argument("--reports", default=None,
                       help="reports: a {case_id: text} JSON, a TextBraTS folder <ID>/<ID>_flair_text.txt, or "
                            "'textbrats' (the packaged 369 reports); default: the text files beside the volumes")
    group.add_argument("--healthy-root", type=Path, default=None,
                       help="folder of healthy controls sub-*.nii[.gz] (default DATA_ROOT/healthy when present)")
    add_split_arg(group, default="stratified",
                  help="stratified (by lesion side, 70/10/20 by default), official (TextBraTS Train/Test.json) "
                       "or a split.csv written by an earlier run")
    group.add_argument("--val-fraction", type=unit_interval, default=DEFAULT_FRACTIONS[1],
                       help="share of cases in val (stratified split)")
    group.add_argument("--test-fraction", type=unit_interval, default=DEFAULT_FRACTIONS[2],
                       help="share of cases in test (stratified split)")
    group.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help="seed of the stratified split")
    group.add_argument("--skip-bad", action="store_true",
                       help="skip and count cases with a missing FLAIR, a bad NIfTI, a missing/empty report or "
                            "(when training) voxels that are NaN, all zero, constant or hold no brain")
    group.add_argument("--volume-size", type=positive_int, nargs=3, default=list(DEFAULT_VOLUME_SIZE),
                       metavar=("D", "H", "W"), help="preprocessed volume size (default 64 128 128, the seed's)")
    return parser


def cases_from_args(args: argparse.Namespace) -> Cases:
    """``load_cases`` with the flags of ``add_data_args``."""
    require(args, data_root="the folder of case folders")
    if args.val_fraction + args.test_fraction >= 1:
        raise ConfigError("--val-fraction", f"val {args.val_fraction} + test {args.test_fraction} leaves no training "
                                            "cases")
    parse_volume_size(args.volume_size)
    fractions = (1 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
    return load_cases(args.data_root, reports=args.reports, healthy_root=args.healthy_root, split=args.split,
                      fractions=fractions, seed=args.split_seed, skip_bad=args.skip_bad)


def add_run_data_args(parser: argparse.ArgumentParser) -> None:
    """Where a run's data is when it has moved since training, and where preprocessed volumes are cached."""
    group = parser.add_argument_group("data (default: what the run was trained on)")
    add_data_root_arg(group, help="the run's data root, if it has moved")
    group.add_argument("--healthy-root", type=Path, default=None,
                       help="healthy controls, if the run used --healthy-root (default DATA_ROOT/healthy)")
    add_volume_cache_arg(group)


def volume_cache_root(args: argparse.Namespace) -> Path:
    return args.volume_cache or default_cache_root(args.cache_dir, "volumes")


def add_scoring_args(parser: argparse.ArgumentParser, n_boot: int, n_boot_corpus: int) -> None:
    """Flags shared with ``brain3d_report.baselines``: bootstrap sizes, BERTScore model, METEOR."""
    group = parser.add_argument_group("scoring")
    group.add_argument("--n-boot", type=nonnegative_int, default=n_boot,
                       help="bootstrap resamples of the per-case metrics (95%% intervals)")
    group.add_argument("--n-boot-corpus", type=nonnegative_int, default=n_boot_corpus,
                       help="bootstrap resamples of corpus BLEU and CIDEr (recomputed per resample)")
    group.add_argument("--n-boot-meteor", type=nonnegative_int, default=0,
                       help="bootstrap resamples of corpus METEOR (a Java METEOR pass each; 0: no interval)")
    group.add_argument("--bertscore", choices=BERTSCORE_FLAG, default="auto",
                       help="auto: roberta-base (the seed's) when cached, else the offline MiniLM; none: skip")
    group.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=True,
                       help="METEOR (needs java; its paraphrase table takes ~15 s of CPU to load)")
    group.add_argument("--meteor-seed", action=argparse.BooleanOptionalAction, default=True,
                       help="meteor_seed: the seed's NLTK METEOR per report (needs NLTK's WordNet data: python -m "
                            "nltk.downloader wordnet; without it the key is left out with a note)")


__all__ = ["BERTSCORE_FLAG", "add_data_root_arg", "add_volume_cache_arg", "add_split_arg", "add_max_new_tokens_arg",
           "add_supervoxels_arg", "add_data_args", "cases_from_args", "add_run_data_args", "volume_cache_root",
           "add_scoring_args"]
