"""Score a seed ensemble: the mean of several trained runs' P(pneumonia), evaluated like one model.

Example:
    python -m pneumonia.ensemble --run-dirs runs/s0 runs/s1 runs/s2 runs/s3 --output-dir runs/ensemble --split test

The decision threshold is chosen on the validation split from the ensemble's own mean probabilities, by the
members' threshold rule; ``acc_at_0.5`` is MedMNIST's protocol on the mean probability. Each member predicts
with the test-time augmentation it was trained with. An ensemble is a different model from its members: report it
apart from the single-model rows, which the same command summarises (``single_<metric>_mean`` and ``_sd`` over the
members, each at its own validation threshold; per member in ``ensemble.json``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import MedvlArgumentParser, base_parser, parse_args
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.metrics.classification import best_threshold
from common.run_guard import RUN_NEEDS, guard_command
from common.rundir import atomic_write_text, result_set
from common.runs import load_run
from common.tables import metrics_with_ci, write_results
from pneumonia.data import load_medmnist
from pneumonia.evaluate import METRICS, scores_at
from pneumonia.model import build_from_record, predict_proba
from pneumonia.shared import add_data_root_arg, add_n_boot_arg, add_split_arg


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dirs", type=Path, nargs="+", required=True,
                        help="trained pneumonia runs whose probabilities are averaged (two or more)")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="where results.json, results.md and predictions/<split>.csv are written")
    add_split_arg(parser, help="the split whose averaged predictions are scored (the threshold comes from val)")
    add_data_root_arg(parser, help="defaults to the data the first run was trained on")
    add_n_boot_arg(parser)
    return parser


SINGLE_METRICS = ("auroc", "acc", "acc_at_0.5")
"""Metrics of each member alone (at its own validation threshold) summarised as mean and sample SD over members."""


def ensemble_probabilities(run_dirs: Sequence[Path], data_root: Path | None, split: str,
                           device: str = "auto") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Per-split mean probabilities of the runs (validation and ``split``), the labels, and a description with each
    member's metrics on ``split`` alone.

    The runs must share the image size, the threshold rule and (unless ``data_root`` is given) the data file.
    """
    if len(run_dirs) < 2:
        raise ConfigError("--run-dirs", f"an ensemble needs two or more runs, got {len(run_dirs)}")
    if len(set(map(Path.resolve, map(Path, run_dirs)))) != len(run_dirs):
        raise ConfigError("--run-dirs", "the same run is named twice")
    torch_device = pick_device(device)
    members = [(loaded.model, loaded.meta) for loaded in (
        load_run(run_dir, "pneumonia", build_from_record, stage="train", device=torch_device) for run_dir in run_dirs)]
    first = members[0][1]
    for run_dir, (_, meta) in zip(run_dirs, members):
        for what, value in (("image size", meta["preprocessing"]["image_size"]),
                            ("threshold rule", meta.get("threshold_rule")),
                            ("data file", None if data_root else meta["data"].get("file"))):
            expected = {"image size": first["preprocessing"]["image_size"], "threshold rule":
                        first.get("threshold_rule"), "data file": None if data_root else first["data"].get("file")}
            if value != expected[what]:
                raise ConfigError("--run-dirs", f"{run_dir} has {what} {value!r}, {run_dirs[0]} has "
                                                f"{expected[what]!r}; an ensemble's members must agree")
    root = data_root or first["data"].get("root")
    if not isinstance(root, str | Path):
        raise ConfigError("--data-root", "not given, and the first run's model.json names no data root")
    splits = tuple(dict.fromkeys(("val", split)))
    data = load_medmnist(root, first["preprocessing"]["image_size"], splits=splits)
    probabilities, labels, singles = {}, {}, []
    for name in splits:
        if len(data.labels[name]) == 0:
            raise DataError(data.path, f"the {name} split is empty")
        each = [predict_proba(model, data.images[name], device=torch_device) for model, _ in members]
        probabilities[name], labels[name] = np.mean(each, axis=0), data.labels[name]
        if name == split:
            singles = [{k: v for k, v in scores_at(labels[name], p, float(meta["thresholds"]["decision"])).items()
                        if k in SINGLE_METRICS} for p, (_, meta) in zip(each, members)]
    description = {"members": [str(Path(r).resolve()) for r in run_dirs], "data": str(data.path),
                   "threshold_rule": first.get("threshold_rule", "youden"),
                   "tta": [meta["kwargs"].get("tta", "none") for _, meta in members], "single_models": singles}
    return probabilities, labels, description


def evaluate_ensemble(run_dirs: Sequence[Path], output_dir: Path, split: str = "test", data_root: Path | None = None,
                      n_boot: int = 1000, device: str = "auto", seed: int = 0) -> dict:
    """Write the ensemble's predictions and metrics on ``split`` into ``output_dir``; returns the results."""
    probabilities, labels, description = ensemble_probabilities(run_dirs, data_root, split, device)
    threshold = float(best_threshold(labels["val"], probabilities["val"], metric=description["threshold_rule"]))
    scores, truth = probabilities[split], labels[split]
    results = metrics_with_ci(lambda a: scores_at(a["label"], a["score"], threshold),
                              {"label": truth, "score": scores}, keys=METRICS, n_boot=n_boot, seed=seed)
    results.update({"threshold": threshold, "n": int(len(truth)), "n_positive": int(truth.sum()), "split": split,
                    "n_members": len(run_dirs)})
    for key in SINGLE_METRICS:  # the members alone: the single-model row beside the ensemble's
        values = [single[key] for single in description["single_models"]]
        results[f"single_{key}_mean"] = float(np.mean(values))
        results[f"single_{key}_sd"] = float(np.std(values, ddof=1))
    frame = pd.DataFrame({"index": np.arange(len(truth)), "label": truth, "prob_pneumonia": scores,
                          "predicted": (scores >= threshold).astype(int)})
    output_dir.mkdir(parents=True, exist_ok=True)
    with result_set(output_dir) as staging:
        atomic_write_text(staging / "predictions" / f"{split}.csv", frame.to_csv(index=False))
        atomic_write_text(staging / "ensemble.json", json.dumps(description, indent=2) + "\n")
        extra = (f"Mean probability of {len(run_dirs)} runs; threshold {threshold:.3f} chosen on validation "
                 f"({description['threshold_rule']}) from the mean; {len(truth)} images, {int(truth.sum())} "
                 "pneumonia.\n")
        write_results(staging, results, f"PneumoniaMNIST ensemble of {len(run_dirs)} runs, {split} split", extra)
    return results


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root",), lock="output_dir", create=True,
                  extra_reads={"--run-dirs": [Path(run) / need for run in args.run_dirs for need in RUN_NEEDS]})
    evaluate_ensemble(args.run_dirs, args.output_dir, args.split, args.data_root, args.n_boot, args.device,
                      args.seed)
    print((args.output_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
