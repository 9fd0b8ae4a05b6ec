"""Evaluate a BraTS-Path run on its held-out test tiles: the challenge's scores with 95% CIs, per class, confusion.

Example:
    python -m pathology_brats.evaluate --run-dir runs/brats_path/fused

``results.json`` holds the scorer's keys of the run's schema year (2024/2025: ``mcc, f1_global, accuracy_global,
specificity_global, recall_global``; 2026: ``mcc, f1_per_class_average, accuracy_global,
specificity_per_class_weighted, recall_per_class_average, auroc_per_class_weighted`` and
``auroc_per_class_weighted_exact``), computed by the same scorer as ``python -m pathology_brats.score`` (the
organisers' GaNDLF steps: torchmetrics on hard predictions, the penalty label counted as a class), with bootstrap
CIs. It scores exactly the tiles ``split.csv`` assigns to the split, predicted by the same code as ``submit``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from common import plots
from common.cli import MedvlArgumentParser, base_parser, parse_args
from common.device import pick_device
from common.errors import DataError, cli_entry
from common.metrics.classification import binary_metrics
from common.run_guard import guard_command
from common.rundir import atomic_write_text, recover_results, result_set
from common.runs import load_run
from common.splits import load_split_csv
from common.tables import markdown_table, metrics_with_ci, write_results
from pathology_brats.challenge_metrics import SCORER_KEYS, challenge_scores
from pathology_brats.data import Tiles, load_tiles
from pathology_brats.inference import tile_probabilities
from pathology_brats.model import build_run_model
from pathology_brats.schema import get_schema
from pathology_brats.shared import add_feature_cache_arg, add_n_boot_arg, add_tta_arg, default_feature_cache
from pathology_brats.train import caption_texts, known_images


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="run directory written by pathology_brats.train")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="split scored (the test split is read once per finished run)")
    add_tta_arg(parser)
    add_feature_cache_arg(parser)
    add_n_boot_arg(parser)
    return parser


def split_tiles_of(tiles: Tiles, split_csv: Path, split: str) -> Tiles:
    """Exactly the tiles ``split.csv`` assigns to ``split``, in its order; a row whose tile is not in the data is an
    error. Runs written before tiles were identified by their path under the data root keyed rows by file name."""
    frame = load_split_csv(split_csv)
    wanted = frame.loc[frame["split"] == split, "id"].tolist()
    if not wanted:
        raise DataError(split_csv, f"no {split} rows")
    index = {tile: i for i, tile in enumerate(tiles.ids)}
    if not any(w in index for w in wanted) and all("/" not in w for w in wanted):
        index = {name: i for i, name in enumerate(tiles.groups)}
    absent = [w for w in wanted if w not in index]
    if absent:
        raise DataError(split_csv, f"{len(absent)} {split} row(s) name tiles not in the data, e.g. {absent[0]!r}")
    return tiles.take([index[w] for w in wanted])


def evaluate_run(run_dir: Path, split: str = "test", n_boot: int = 1000, device: str = "auto", seed: int = 0,
                 cache_dir: Path | None = None, feature_cache: Path | None = None, tta: int = 1) -> dict:
    run_dir = Path(run_dir)
    recover_results(run_dir)
    torch_device = pick_device(device)
    run = load_run(run_dir, "pathology_brats", build_run_model, device=torch_device)
    meta = run.meta
    schema = get_schema(meta["schema"])
    settings = meta["data"]
    tiles = load_tiles(Path(settings["root"]), schema, Path(settings["labels_csv"]) if settings["labels_csv"] else None)
    known = known_images(tiles.ids, Path(settings["root"]))
    tiles = split_tiles_of(tiles, run_dir / "split.csv", split)
    texts = None
    if settings["modality"] != "image":
        found = caption_texts(Path(settings["captions"]), tiles.ids, known)
        texts = [found[tile] for tile in tiles.ids]
    cache_root = feature_cache or default_feature_cache(cache_dir)
    probs, _ = tile_probabilities(run, tiles.paths, texts, torch_device, cache_root, cache_dir, tta=tta)
    predicted = probs.argmax(1)
    keys = SCORER_KEYS[schema.year]
    results = metrics_with_ci(lambda a: challenge_scores(a["y"], a["p"], schema), {"y": tiles.labels, "p": predicted},
                              keys=keys, n_boot=n_boot, seed=seed)
    results.update({"split": split, "n": len(tiles), "schema": schema.year, "modality": settings["modality"],
                    "tta": tta})
    rows = []
    for c, code in enumerate(schema.classes):
        one = binary_metrics((tiles.labels == c).astype(int), probs[:, c], threshold=0.5)
        chosen = predicted == c
        truth = tiles.labels == c
        rows.append({"class": code, "n": int(truth.sum()),
                     "recall": float((chosen & truth).sum() / max(truth.sum(), 1)),
                     "precision": float((chosen & truth).sum() / max(chosen.sum(), 1)),
                     "auroc (probabilities)": one["auroc"]})
    frame = pd.DataFrame({"image": tiles.ids, "label": tiles.labels, "prediction": predicted,
                          **{f"prob_{code}": probs[:, c] for c, code in enumerate(schema.classes)}})
    views = f", {tta} dihedral views" if tta > 1 else ""
    title = (f"BraTS-Path {schema.year} ({settings['modality']}, {meta['preset']}), {split} split "
             f"({len(tiles)} tiles{views})")
    extra = ("Scores as the challenge's GaNDLF scorer computes them (hard predictions, penalty label counted).\n\n"
             "## Per class\n\n" + markdown_table(rows) + f"\n![confusion](figures/confusion_{split}.png)\n")
    with result_set(run_dir) as staging:
        atomic_write_text(staging / "predictions" / f"{split}.csv", frame.to_csv(index=False))
        plots.confusion_matrix(tiles.labels, predicted, list(schema.classes),
                               staging / "figures" / f"confusion_{split}.png")
        write_results(staging, results, title, extra)
    return results


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("feature_cache", "cache_dir"), lock="run_dir")
    evaluate_run(args.run_dir, args.split, args.n_boot, args.device, args.seed, args.cache_dir, args.feature_cache,
                 args.tta)
    print((args.run_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
