"""Evaluate a trained PneumoniaMNIST run on one split: predictions CSV first, then the metric table and figures.

Example:
    python -m pneumonia.evaluate --run-dir runs/pneumonia/r18 --split test

Uses the decision threshold chosen on validation during training (``best/model.json``), never one tuned here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common import plots
from common.cli import MedvlArgumentParser, base_parser, nonnegative_int, parse_args
from common.device import pick_device
from common.errors import DataError, cli_entry
from common.metrics.classification import binary_metrics
from common.run_guard import guard_command
from common.rundir import atomic_write_text, read_jsonl, result_set
from common.tables import metrics_with_ci, write_results
from pneumonia.model import load_run_and_data, predict_proba
from pneumonia.shared import add_n_boot_arg, add_run_args, add_split_arg

METRICS = ("auroc", "auprc", "acc", "acc_at_0.5", "precision", "recall", "specificity", "f1", "balanced_acc", "mcc")
"""``acc`` is at the run's validation threshold (ours); ``acc_at_0.5`` is MedMNIST's protocol (``score > 0.5``, as
its ``Evaluator`` computes it), the number its published tables report."""


def scores_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """The binary metrics at ``threshold`` plus MedMNIST's accuracy at a fixed 0.5 (strictly above)."""
    return {**binary_metrics(labels, scores, threshold), "acc_at_0.5": float(np.mean((scores > 0.5) == labels))}
"""Keys of ``common.metrics.classification.binary_metrics`` reported with bootstrap intervals."""


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    add_split_arg(parser, help="split scored (the test split is read once per finished run)")
    add_n_boot_arg(parser)
    parser.add_argument("--gallery", type=nonnegative_int, default=10, help="how many confident failures to show")
    return parser


def evaluate_run(run_dir: Path, split: str = "test", data_root: Path | None = None, n_boot: int = 1000,
                 gallery: int = 10, device: str = "auto", seed: int = 0) -> dict:
    """Predict ``split`` with the run's best model and write predictions, results and figures into the run dir.

    The files are written as one result set (``common.rundir.result_set``): a failure or a kill leaves the
    previous evaluation's files as they were, or the new set complete.
    """
    run_dir = Path(run_dir)
    device = pick_device(device)
    model, meta, data = load_run_and_data(run_dir, data_root, (split,), device)
    images, labels = data.images[split], data.labels[split]
    if len(labels) == 0:
        raise DataError(data.path, f"the {split} split is empty; nothing to evaluate")
    scores = predict_proba(model, images, device=device)  # with the test-time views the run was trained with
    threshold = float(meta["thresholds"]["decision"])
    predicted = (scores >= threshold).astype(int)
    frame = pd.DataFrame({"index": np.arange(len(labels)), "label": labels, "prob_pneumonia": scores,
                          "predicted": predicted})
    results = metrics_with_ci(lambda a: scores_at(a["label"], a["score"], threshold),
                              {"label": labels, "score": scores}, keys=METRICS, n_boot=n_boot, seed=seed)
    results.update({"threshold": threshold, "n": int(len(labels)), "n_positive": int(labels.sum()), "split": split,
                    "best_epoch_metric": meta.get("monitor")})
    history_path = run_dir / "metrics.jsonl"
    history = read_jsonl(history_path) if history_path.is_file() else []
    with result_set(run_dir) as staging:
        atomic_write_text(staging / "predictions" / f"{split}.csv", frame.to_csv(index=False))
        figures = staging / "figures"
        plots.confusion_matrix(labels, predicted, meta["labels"], figures / f"confusion_{split}.png")
        plots.roc_curve(labels, scores, figures / f"roc_{split}.png")
        if history:
            plots.loss_curves(history, figures / "loss_curves.png")
        wrong = np.flatnonzero(predicted != labels)
        if len(wrong) and gallery:
            confidence = np.abs(scores[wrong] - threshold)
            worst = wrong[np.argsort(-confidence)[:gallery]]
            plots.image_gallery([images[i] / 255.0 for i in worst],
                                [f"#{i} true {meta['labels'][labels[i]]}\np={scores[i]:.2f}" for i in worst],
                                figures / f"failures_{split}.png")
        extra = (f"Threshold {threshold:.3f} chosen on validation ({meta.get('threshold_rule', '?')}); "
                 f"{len(labels)} images, {int(labels.sum())} pneumonia.\n\n"
                 f"![confusion](figures/confusion_{split}.png) ![roc](figures/roc_{split}.png)\n")
        title = f"PneumoniaMNIST {meta['preset']} ({meta['preprocessing']['image_size']} px), {split} split"
        write_results(staging, results, title, extra)
    return results


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("data_root",), lock="run_dir")
    evaluate_run(args.run_dir, args.split, args.data_root, args.n_boot, args.gallery, args.device, args.seed)
    print((args.run_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
