"""Train the PneumoniaMNIST classifier; the best epoch and the decision threshold are chosen on validation.

Example:
    python -m pneumonia.train --data-root data/samples/medmnist --output-dir runs/pneumonia/r18 --epochs 10

The test split is never read here: ``python -m pneumonia.evaluate --run-dir RUN`` does that once, afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import MedvlArgumentParser, base_parser, config_text, parse_args, positive_int, require
from common.engine import DeviceBatches, FitResult, add_train_args, check_run_setup, config_from_args, fit
from common.errors import DataError, cli_entry
from common.metrics.classification import best_threshold, binary_metrics
from common.run_guard import guard_command
from common.runs import model_record, save_run_model
from pneumonia.data import LABELS, MEAN, SIZES, STD, PneumoniaDataset, load_medmnist
from pneumonia.model import ARCHS, build_model

THRESHOLD_RULES = ("youden", "f1", "acc")
CPU_BF16 = True
"""``--precision auto`` autocasts this CNN to bf16 on CPUs with AMX-BF16: 1.65 times the fp32 speed at the same
test AUROC (``python -m benchmarks.train_speed``)."""


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None, help="directory with pneumoniamnist[_SIZE].npz")
    parser.add_argument("--image-size", type=int, default=28, choices=SIZES,
                        help="PneumoniaMNIST image side (the npz file of that size is read)")
    parser.add_argument("--arch", default="resnet18", choices=sorted(ARCHS),
                        help="CNN preset (python -m common.presets --kind cnn)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="small random affine jitter on training images (no flips)")
    parser.add_argument("--threshold-rule", default="youden", choices=THRESHOLD_RULES,
                        help="how the decision threshold is picked on validation")
    parser.add_argument("--train-limit", type=positive_int, default=None, help="use only the first N training images")
    # Channels-last convolutions: faster on CPU (oneDNN; benchmarks.train_speed), and the layout of GPU tensor cores.
    add_train_args(parser, epochs=10, batch_size=64, lr=1e-3, weight_decay=1e-4, monitor="val_auroc", mode="max",
                   cpu_bf16=CPU_BF16, channels_last=True)
    return parser


class PneumoniaTask:
    """Binary cross-entropy on one logit; validation keeps its scores so the best model stores its threshold."""

    metric_names = ("auroc", "acc", "precision", "recall", "specificity", "f1", "balanced_acc", "mcc", "loss")

    def __init__(self, meta: dict, val_labels: np.ndarray, threshold_rule: str):
        self.meta, self.val_labels, self.threshold_rule = meta, val_labels, threshold_rule
        self.last_scores: np.ndarray | None = None

    def training_loss(self, model, batch):
        images, labels = batch
        return F.binary_cross_entropy_with_logits(model(images).float(), labels.float())

    def validate(self, model, loader: DeviceBatches, device) -> dict[str, float]:
        logits = torch.cat([model(images).float() for images, _ in loader]).cpu()  # one wait for the device
        labels = torch.as_tensor(self.val_labels, dtype=torch.float32)
        scores = torch.sigmoid(logits).numpy()
        self.last_scores = scores
        metrics = binary_metrics(self.val_labels, scores, threshold=0.5)
        metrics["loss"] = F.binary_cross_entropy_with_logits(logits, labels).item()
        return metrics

    def save_best(self, model, metrics, directory: Path) -> None:
        threshold = best_threshold(self.val_labels, self.last_scores, metric=self.threshold_rule)
        at_threshold = binary_metrics(self.val_labels, self.last_scores, threshold=threshold)
        record = model_record(**self.meta, thresholds={"decision": float(threshold)}, val_metrics=metrics,
                              threshold_rule=self.threshold_rule, val_metrics_at_threshold=at_threshold)
        save_run_model(directory, model, record)


def check_training_data(path: Path, train_labels: np.ndarray, val_labels: np.ndarray) -> None:
    """Refuse data that would train nothing or could never produce the monitored metric."""
    if len(train_labels) == 0:
        raise DataError(path, "the training split is empty")
    if len(val_labels) == 0:
        raise DataError(path, "the validation split is empty; the best epoch and threshold are chosen on it")
    present = np.unique(train_labels)
    if len(present) < 2:
        raise DataError(path, f"the training split holds only '{LABELS[int(present[0])]}' images "
                              f"({len(train_labels)}); a classifier needs both classes to learn from")
    present = np.unique(val_labels)
    if len(present) < 2:
        only = LABELS[int(present[0])]
        raise DataError(path, f"the validation split holds only '{only}' images ({len(val_labels)}); the decision "
                              "threshold and val AUROC are chosen on it and need both classes: put images of both "
                              "classes in val_images/val_labels")


def data_record(path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> str:
    """``data.json``: the file and a digest of each split a run trains on, so ``--resume`` notices changed data."""
    splits = {}
    for split in images:
        digest = hashlib.sha256(np.ascontiguousarray(images[split]).tobytes())
        digest.update(np.ascontiguousarray(labels[split]).tobytes())
        splits[split] = {"n": int(len(labels[split])), "sha256": digest.hexdigest()}
    return json.dumps({"file": path.name, "splits": splits}, indent=2, sort_keys=True) + "\n"


def run(args: argparse.Namespace) -> FitResult:
    """Everything ``main`` does after parsing, but the summary line; returns the loop's result (its timings are
    what ``benchmarks.train_speed`` reads)."""
    require(args, output_dir="where the run is written")
    check_run_setup(config_from_args(args), args.output_dir)
    data = load_medmnist(args.data_root, args.image_size, splits=("train", "val"))
    train_images, train_labels = data.images["train"], data.labels["train"]
    if args.train_limit:
        train_images, train_labels = train_images[: args.train_limit], train_labels[: args.train_limit]
    check_training_data(data.path, train_labels, data.labels["val"])
    logging.getLogger("medvl").info("train %s, val %s", data.counts()["train"], data.counts()["val"])
    torch.manual_seed(args.seed)
    model = build_model(args.arch)
    # One fused kernel for all parameters: the optimizer step of ResNet-18 measured 24 ms instead of 142 ms on CPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    meta = {"pipeline": "pneumonia", "stage": "train", "preset": args.arch, "kwargs": {}, "labels": list(LABELS),
            "preprocessing": {"image_size": args.image_size, "mean": MEAN, "std": STD},
            "data": {"root": str(Path(args.data_root).resolve()), "file": data.path.name,
                     "train_limit": args.train_limit},
            "monitor": args.monitor}
    task = PneumoniaTask(meta, data.labels["val"], args.threshold_rule)
    run_files = {"config.yaml": config_text(args),
                 "data.json": data_record(data.path, {"train": train_images, "val": data.images["val"]},
                                          {"train": train_labels, "val": data.labels["val"]})}
    return fit(model, optimizer, PneumoniaDataset(train_images, train_labels, augment=args.augment),
               PneumoniaDataset(data.images["val"], data.labels["val"]), task,
               config_from_args(args), args.output_dir, run_files=run_files)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root",), lock="output_dir", create=True)
    result = run(args)
    print(result.summary(args.monitor, args.output_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
