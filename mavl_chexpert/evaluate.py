"""Evaluate a phase-1 (image) or phase-3 (fusion) run: predictions CSV first, then per-disease and overall tables.

Example:
    python -m mavl_chexpert.evaluate --run-dir runs/mavl/fusion --split test
    python -m mavl_chexpert.evaluate --run-dir runs/mavl/fusion --test-csv /data/chexpert/test_labels.csv

``test`` is ``valid.csv`` of the run's data root (or ``--test-csv``); ``val`` is the run's own validation patients.
The per-class thresholds are the ones chosen on validation during training (``best/model.json``).
``--oracle-thresholds`` re-tunes them on the evaluated set itself, as the seed (and several zero-shot papers) did;
those numbers are optimistic by construction, go to ``oracle/`` and are labelled ORACLE. Diseases held out of a
fusion run's training (``--holdout-classes``) are marked zero-shot.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import plots
from common.checkpoint import atomic_write_text, recover_results, result_set
from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import pick_device
from common.errors import DataError, cli_entry
from common.metrics.classification import binary_metrics
from common.run_guard import guard_command
from common.runs import load_run
from common.splits import load_split_csv
from common.tables import ci_cell, markdown_table, metrics_with_ci, write_results
from mavl_chexpert.common_args import choose_thresholds, split_metrics
from mavl_chexpert.data import ChexpertDataset, Table, decode_images, find_root, label_key, load_table
from mavl_chexpert.model import build_fusion_model, build_image_model

log = logging.getLogger("medvl.mavl_chexpert")

SPLITS = ("test", "val")
OVERALL = ("auroc_macro", "auroc_micro", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "hamming_loss",
           "acc_subset")
PER_CLASS = ("auroc", "auprc", "f1", "precision", "recall", "specificity")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a train_image or train_fusion run")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="split scored (the test split is read once per finished run)")
    parser.add_argument("--data-root", type=Path, default=None, help="defaults to the data the run was trained on")
    parser.add_argument("--test-csv", type=Path, default=None,
                        help="CSV with Path + label columns (e.g. the official 500-image test set); default valid.csv")
    parser.add_argument("--oracle-thresholds", action="store_true",
                        help="tune thresholds on the evaluated set (optimistic; written to oracle/, labelled)")
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per inference batch")
    parser.add_argument("--skip-bad", action="store_true", help="skip rows whose image is missing or undecodable")
    return parser


STAGES = ("image", "fusion")


def _build(meta: dict) -> torch.nn.Module:
    """The run's model; a ``stage`` other than the two this package trains is refused (``load_run`` names the file)."""
    if meta["stage"] not in STAGES:
        raise ValueError(f"stage {meta['stage']!r} is not one of {', '.join(STAGES)}")
    if meta["stage"] == "fusion":
        return build_fusion_model(meta["kwargs"])
    return build_image_model(**meta["kwargs"])


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 64,
                  temperature: float = 1.0) -> np.ndarray:
    """(N, C) probabilities of uint8 (N, H, W) images."""
    dataset = ChexpertDataset(images, np.zeros((len(images), 1), np.float32), np.ones((len(images), 1), bool))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    logits = torch.cat([model(batch["image"].to(device)).float().cpu() for batch in loader])
    return torch.sigmoid(logits / temperature).numpy()


def evaluation_table(run_dir: Path, meta: dict, split: str, data_root: Path | None, test_csv: Path | None) -> Table:
    settings = meta["data"]
    root = find_root(data_root or Path(settings["root"]))
    labels = tuple(meta["labels"])
    if split == "test":
        table = load_table(root, test_csv or "valid.csv", labels, settings["uncertain"], settings["views"])
        check_unseen(table, run_dir / "split.csv")
        return table
    table = load_table(root, "train.csv", labels, settings["uncertain"], settings["views"])
    split_frame = load_split_csv(run_dir / "split.csv")
    val = set(split_frame.loc[split_frame["split"] == "val", "id"])
    keep = np.flatnonzero([p in val for p in table.rel_paths])
    if not len(keep):
        raise DataError(run_dir / "split.csv", f"no validation image of it is in {table.csv}")
    return table.take(keep)


def check_unseen(table: Table, split_csv: Path) -> None:
    """A test image of a patient the run trained or selected on is refused, naming the line: its scores would be
    those of a model that has seen that patient (the test set must hold other patients)."""
    if not split_csv.is_file():
        return
    seen = load_split_csv(split_csv)
    by_patient = dict(zip(seen["group"], seen["split"]))
    for patient, line in zip(table.patients, table.rows):
        if patient in by_patient:
            raise DataError(table.csv, f"line {line}: patient {patient} is in the run's {by_patient[patient]} split "
                                       f"({split_csv}); a test set must hold other patients")


def _metric_fn(labels: tuple[str, ...], thresholds: np.ndarray):
    keys = [label_key(n) for n in labels]

    def compute(arrays: dict[str, np.ndarray]) -> dict[str, float]:
        out = split_metrics(arrays["target"], arrays["prob"], arrays["mask"], labels, thresholds)
        for j, key in enumerate(keys):
            rows = arrays["mask"][:, j]
            per = binary_metrics(arrays["target"][rows, j], arrays["prob"][rows, j], thresholds[j])
            for name in PER_CLASS:
                out[f"{name}_{key}"] = per[name]
        return out

    return compute


def evaluate_run(run_dir: Path, split: str = "test", data_root: Path | None = None, test_csv: Path | None = None,
                 oracle: bool = False, n_boot: int = 1000, device: str = "auto", seed: int = 0,
                 batch_size: int = 64, skip_bad: bool = False) -> dict:
    """Predict ``split`` with the run's best model and write predictions, tables and ROC figures as one result set."""
    run_dir = Path(run_dir)
    recover_results(run_dir)
    torch_device = pick_device(device)
    run = load_run(run_dir, "mavl_chexpert", _build, device=torch_device)
    meta = run.meta
    table = evaluation_table(run_dir, meta, split, data_root, test_csv)
    images, kept = decode_images(table, int(meta["preprocessing"]["image_size"]), skip_bad)
    table = table.take(kept)
    labels = tuple(meta["labels"])
    keys = [label_key(n) for n in labels]
    temperature = 0.2 if meta.get("loss") == "contrastive" else 1.0
    probs = predict_proba(run.model, images, torch_device, batch_size, temperature)
    if oracle:
        chosen = choose_thresholds(table.targets, probs, table.mask, labels, meta.get("threshold_rule", "f1"))
    else:
        chosen = meta["thresholds"]
    thresholds = np.array([float(chosen[k]) for k in keys])
    metric_keys = list(OVERALL) + [f"{m}_{k}" for k in keys for m in PER_CLASS]
    results = metrics_with_ci(_metric_fn(labels, thresholds),
                              {"target": table.targets, "prob": probs, "mask": table.mask},
                              keys=metric_keys, n_boot=n_boot, seed=seed)
    holdout = list(meta.get("holdout_classes") or [])
    thresholds_source = "ORACLE: tuned on this evaluated set" if oracle else \
        f"validation ({meta.get('threshold_rule', 'f1')})"
    results.update({f"threshold_{k}": float(t) for k, t in zip(keys, thresholds)})
    results.update({"split": split, "csv": str(table.csv), "n": len(table), "stage": meta["stage"],
                    "thresholds_from": thresholds_source, "holdout_classes": ", ".join(holdout)})
    if holdout:
        unseen = [results[f"auroc_{label_key(n)}"] for n in holdout]
        results["auroc_macro_unseen"] = float(np.nanmean(unseen)) if np.isfinite(unseen).any() else float("nan")
    frame = pd.DataFrame({"path": table.rel_paths, "patient": table.patients})
    for j, key in enumerate(keys):
        frame[f"label_{key}"] = np.where(table.mask[:, j], table.targets[:, j], np.nan)
        frame[f"prob_{key}"] = probs[:, j]
        frame[f"pred_{key}"] = (probs[:, j] >= thresholds[j]).astype(int)
    rows = []
    for j, (name, key) in enumerate(zip(labels, keys)):
        row = {"disease": name + (" (zero-shot)" if name in holdout else ""),
               "positives": int(table.targets[table.mask[:, j], j].sum())}
        for metric in PER_CLASS:
            row[metric] = ci_cell(results, f"{metric}_{key}")
        row["threshold"] = float(thresholds[j])
        rows.append(row)
    title = (f"{'ORACLE thresholds - ' if oracle else ''}MAVL CheXpert {meta['stage']} ({meta['preset']}), "
             f"{split} split ({len(table)} images)")
    extra = (f"Thresholds: {thresholds_source}.\n\n## Per disease (95% bootstrap CI, {n_boot} resamples)\n\n"
             + markdown_table(rows) + "\n" + " ".join(f"![roc {k}](figures/roc_{split}_{k}.png)" for k in keys))
    prefix = Path("oracle") if oracle else Path()
    with result_set(run_dir) as staging:
        atomic_write_text(staging / prefix / "predictions" / f"{split}.csv", frame.to_csv(index=False))
        for j, key in enumerate(keys):
            rows_j = table.mask[:, j]
            y = table.targets[rows_j, j].astype(int)
            if 0 < y.sum() < len(y):
                plots.roc_curve(y, probs[rows_j, j], staging / prefix / "figures" / f"roc_{split}_{key}.png")
        write_results(staging / prefix, results, title, extra)
    return results


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("data_root", "test_csv"), lock="run_dir")
    evaluate_run(args.run_dir, args.split, args.data_root, args.test_csv, args.oracle_thresholds, args.n_boot,
                 args.device, args.seed, args.batch_size, args.skip_bad)
    out = args.run_dir / ("oracle" if args.oracle_thresholds else "") / "results.md"
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
