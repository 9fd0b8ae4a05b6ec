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

from common.cli import (
    MedvlArgumentParser,
    base_parser,
    config_text,
    nonnegative_float,
    parse_args,
    positive_int,
    require,
    unit_interval,
)
from common.engine import DeviceBatches, FitResult, add_train_args, check_run_setup, config_from_args, fit
from common.errors import DataError, cli_entry
from common.metrics.classification import best_threshold, binary_metrics
from common.run_guard import guard_command
from common.runs import model_record, save_run_model
from pneumonia.data import LABELS, MEAN, SIZES, STD, PneumoniaDataset, load_medmnist
from pneumonia.model import ARCHS, TTA_MODES, build_model
from pneumonia.shared import add_data_root_arg

THRESHOLD_RULES = ("youden", "f1", "acc")
CLASS_WEIGHTS = ("none", "balanced")
CPU_BF16 = True
"""``--precision auto`` autocasts this CNN to bf16 on CPUs with AMX-BF16: 1.65 times the fp32 speed at the same
test AUROC (``python -m benchmarks.train_speed``)."""


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root_arg(parser, help="directory with pneumoniamnist[_SIZE].npz")
    parser.add_argument("--image-size", type=int, default=28, choices=SIZES,
                        help="PneumoniaMNIST image side (the npz file of that size is read)")
    parser.add_argument("--arch", default="resnet18", choices=sorted(ARCHS),
                        help="CNN preset (python -m common.presets --kind cnn)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="small random affine jitter on training images (no flips)")
    parser.add_argument("--threshold-rule", default="youden", choices=THRESHOLD_RULES,
                        help="how the decision threshold is picked on validation")
    parser.add_argument("--train-limit", type=positive_int, default=None, help="use only the first N training images")
    group = parser.add_argument_group("recipe")
    group.add_argument("--width", type=positive_int, default=64,
                       help="channels of the first residual stage, doubled at each later stage (ResNet's 64)")
    group.add_argument("--dropout", type=unit_interval, default=0.0, help="dropout before the classifier")
    group.add_argument("--drop-path", type=unit_interval, default=0.0,
                       help="stochastic depth: probability of skipping the last residual block (earlier blocks less)")
    group.add_argument("--mixup-alpha", type=nonnegative_float, default=0.0,
                       help="mix each training batch with a shuffled copy, weight ~ Beta(alpha, alpha); 0 is off")
    group.add_argument("--cutmix-alpha", type=nonnegative_float, default=0.0,
                       help="paste a box of a shuffled copy, area ~ Beta(alpha, alpha); 0 is off (with mixup on "
                            "too, each batch uses one of the two at random)")
    group.add_argument("--label-smoothing", type=unit_interval, default=0.0,
                       help="train towards y * (1 - e) + e / 2 instead of 0/1")
    group.add_argument("--class-weight", choices=CLASS_WEIGHTS, default="none",
                       help="'balanced' weighs each class's loss by N / (2 N_class), so the model's 0.5 is the "
                            "decision at equal class priors rather than at the training split's 74%% pneumonia")
    group.add_argument("--tta", choices=TTA_MODES, default="none",
                       help="test-time augmentation of validation and of every later prediction (recorded in "
                            "model.json): 'shift' averages the image and its four one-pixel shifts")
    # Channels-last convolutions: faster on CPU (oneDNN; benchmarks.train_speed), and the layout of GPU tensor cores.
    add_train_args(parser, epochs=10, batch_size=64, lr=1e-3, weight_decay=1e-4, monitor="val_auroc", mode="max",
                   cpu_bf16=CPU_BF16, channels_last=True)
    return parser


def _beta(alpha: float) -> float:
    """One draw of Beta(alpha, alpha) from torch's global generator (part of every checkpoint)."""
    gamma = torch._standard_gamma(torch.full((2,), float(alpha)))
    return float(gamma[0] / gamma.sum())


def mix_batch(images: torch.Tensor, targets: torch.Tensor, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with a shuffled copy of itself.

    Returns the mixed images, the targets mixed with the same weight and that weight ``lam`` (the share of each
    image's own content: for CutMix the exact share of pixels outside the pasted box). With both alphas set, a fair
    coin picks one per batch; with neither, the batch comes back unchanged with ``lam`` 1.
    """
    modes = [m for m, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not modes:
        return images, targets, 1.0
    mode = modes[int(torch.randint(len(modes), ()))] if len(modes) > 1 else modes[0]
    order = torch.randperm(len(images)).to(images.device)
    if mode == "mixup":
        lam = _beta(mixup_alpha)
        mixed = images * lam + images[order] * (1 - lam)
    else:
        height, width = images.shape[-2:]
        cut = (1 - _beta(cutmix_alpha)) ** 0.5
        box_h, box_w = round(height * cut), round(width * cut)
        top = int(torch.randint(height - box_h + 1, ()))
        left = int(torch.randint(width - box_w + 1, ()))
        mixed = images.clone()
        mixed[..., top : top + box_h, left : left + box_w] = images[order][..., top : top + box_h, left : left + box_w]
        lam = 1 - box_h * box_w / (height * width)
    return mixed, targets * lam + targets[order] * (1 - lam), lam


def class_weights(labels: np.ndarray, rule: str) -> tuple[float, float]:
    """(weight of a normal image, weight of a pneumonia image) in the loss; ``balanced`` gives each class half."""
    if rule == "none":
        return 1.0, 1.0
    positives = float(np.mean(labels))
    return 0.5 / (1 - positives), 0.5 / positives


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, negative_weight: float,
                 positive_weight: float) -> torch.Tensor:
    """-mean(w+ y log p + w- (1 - y) log(1 - p)): the class weights also apply to soft (mixed, smoothed) targets."""
    pos_weight = torch.tensor(positive_weight / negative_weight, device=logits.device)
    return negative_weight * F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)


class PneumoniaTask:
    """Binary cross-entropy on one logit; validation keeps its scores so the best model stores its threshold."""

    metric_names = ("auroc", "acc", "precision", "recall", "specificity", "f1", "balanced_acc", "mcc", "loss")

    def __init__(self, meta: dict, val_labels: np.ndarray, threshold_rule: str, *, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, label_smoothing: float = 0.0, weights: tuple[float, float] = (1.0, 1.0)):
        self.meta, self.val_labels, self.threshold_rule = meta, val_labels, threshold_rule
        self.mixup_alpha, self.cutmix_alpha, self.label_smoothing = mixup_alpha, cutmix_alpha, label_smoothing
        self.weights = weights
        self.last_scores: np.ndarray | None = None

    def training_loss(self, model, batch):
        images, labels = batch
        images, targets, _ = mix_batch(images, labels.float(), self.mixup_alpha, self.cutmix_alpha)
        targets = targets * (1 - self.label_smoothing) + self.label_smoothing / 2
        return weighted_bce(model(images).float(), targets, *self.weights)

    def validate(self, model, loader: DeviceBatches, device) -> dict[str, float]:
        scores = torch.cat([model.probabilities(images) for images, _ in loader]).cpu()  # one wait for the device
        labels = torch.as_tensor(self.val_labels, dtype=torch.float32)
        self.last_scores = scores.numpy()
        metrics = binary_metrics(self.val_labels, self.last_scores, threshold=0.5)
        metrics["loss"] = F.binary_cross_entropy(scores.clamp(1e-7, 1 - 1e-7), labels).item()
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
    kwargs = {"width": args.width, "drop_rate": args.dropout, "drop_path_rate": args.drop_path, "tta": args.tta}
    model = build_model(args.arch, **kwargs)
    # One fused kernel for all parameters: the optimizer step of ResNet-18 measured 24 ms instead of 142 ms on CPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    meta = {"pipeline": "pneumonia", "stage": "train", "preset": args.arch, "kwargs": kwargs, "labels": list(LABELS),
            "preprocessing": {"image_size": args.image_size, "mean": MEAN, "std": STD},
            "data": {"root": str(Path(args.data_root).resolve()), "file": data.path.name,
                     "train_limit": args.train_limit},
            "monitor": args.monitor}
    task = PneumoniaTask(meta, data.labels["val"], args.threshold_rule, mixup_alpha=args.mixup_alpha,
                         cutmix_alpha=args.cutmix_alpha, label_smoothing=args.label_smoothing,
                         weights=class_weights(train_labels, args.class_weight))
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
