"""Phase 1: a timm ViT with a low-rank projection, trained with BCE + an LRF term on CheXpert's train.csv.

Example (CPU, phantom, tiny ViT; a T4/A6000 run uses the default ``--backbone vit-b16`` with ImageNet weights):
    python -m common.phantoms cxr --format chexpert --out data/chexpert_phantom
    python -m mavl_chexpert.train_image --data-root data/chexpert_phantom --output-dir runs/mavl/image \\
        --backbone vit-tiny
    accelerate launch --num_processes 2 -m mavl_chexpert.train_image --data-root ... --output-dir ...

``train.csv`` is split by patient into train and val (``split.csv``); the best epoch (val macro AUROC) and the
per-class thresholds (max F1 on val, ``--threshold-rule``) are chosen there. ``valid.csv`` is the test set and is
read only by ``python -m mavl_chexpert.evaluate``.

``--lrf-variant tail`` (default) is LRFL's truncated nuclear norm of the training features beyond ``--lrf-rank``,
with the basis of the whole training split recomputed at the start of every epoch; ``seed`` is the seed notebook's
term (the batch's top singular values); ``none`` is plain BCE. ``--lr`` defaults to the seed's 2e-5 when the
backbone starts from pretrained weights and to 1e-3 when it trains from scratch (tiny presets, ``--no-pretrained``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.cli import (
    MedvlArgumentParser,
    base_parser,
    config_text,
    nonnegative_float,
    parse_args,
    positive_int,
    require,
)
from common.engine import add_train_args, check_run_setup, config_from_args, fit
from common.errors import ConfigError, DataError, cli_entry
from common.images import IMAGENET_MEAN, IMAGENET_STD
from common.presets import get_preset
from common.run_guard import guard_command
from common.runs import model_record, save_run_model
from common.splits import split_csv_text
from mavl_chexpert.common_args import (
    THRESHOLD_RULES,
    add_data_args,
    choose_thresholds,
    data_record,
    masked_bce,
    split_metrics,
)
from mavl_chexpert.data import (
    ChexpertDataset,
    check_trainable,
    decode_images,
    find_root,
    label_key,
    load_table,
    resolve_labels,
    sample_patients,
    split_patients,
)
from mavl_chexpert.model import BACKBONES, LRF_VARIANTS, POOLS, build_image_model, feature_basis, seed_term, tail_term

log = logging.getLogger("medvl.mavl_chexpert")

LRF_DEFAULT_WEIGHT = {"tail": 0.005, "seed": 1e-3, "none": 0.0}
"""LRFL's ``tn_loss_factor`` default for ``tail``; the seed's eta for ``seed``."""
SCRATCH_LR, FINETUNE_LR = 1e-3, 2e-5


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="vit-b16", choices=BACKBONES, help="timm ViT preset")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from timm's ImageNet weights (real presets only; tiny presets start from scratch)")
    model.add_argument("--image-size", type=positive_int, default=None,
                       help="input side; default: the backbone's (224 for vit-b16)")
    model.add_argument("--pool", choices=POOLS, default="mean",
                       help="mean of patch tokens (LRFL's features) or the CLS token (the seed's)")
    model.add_argument("--rank", type=positive_int, default=64, help="width r of the low-rank projection")
    model.add_argument("--dropout", type=nonnegative_float, default=0.1, help="dropout before the classifier")
    model.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="rotation 10 degrees, resized crop 80-100%%, brightness/contrast 0.1 (no flips)")
    lrf = parser.add_argument_group("LRF")
    lrf.add_argument("--lrf-variant", choices=LRF_VARIANTS, default="tail",
                     help="low-rank feature penalty: tail (LRFL's, on the singular values past --lrf-rank), seed (the "
                          "seed's), or none")
    lrf.add_argument("--lrf-rank", type=positive_int, default=38,
                     help="singular directions left free (LRFL: 38 for ViT-B on NIH); the rest are penalised")
    lrf.add_argument("--lrf-weight", type=nonnegative_float, default=None,
                     help="weight of the LRF term (default 0.005 for tail as LRFL, 1e-3 for seed as the seed)")
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="f1",
                        help="per-class decision thresholds chosen on validation")
    add_train_args(parser, epochs=30, batch_size=32, lr=None, weight_decay=0.05, monitor="val_auroc_macro",
                   mode="max")
    return parser


class ImageTask:
    """Masked BCE (+ the seed's LRF term); validation keeps its probabilities for the per-class thresholds."""

    def __init__(self, meta: dict, labels: tuple[str, ...], val_targets: np.ndarray, val_mask: np.ndarray,
                 variant: str, rank: int, weight: float, threshold_rule: str):
        self.meta, self.labels = meta, labels
        self.val_targets, self.val_mask = val_targets, val_mask
        self.variant, self.rank, self.weight, self.threshold_rule = variant, rank, weight, threshold_rule
        self.metric_names = ("auroc_macro", "f1_macro", "loss", *(f"auroc_{label_key(n)}" for n in labels))
        self.last_probs: np.ndarray | None = None

    def lrf_term(self, features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.variant == "seed":
            return seed_term(features, self.rank) / features.shape[0]
        return features.sum() * 0.0

    def training_loss(self, model, batch) -> torch.Tensor:
        logits, features = model(batch["image"], return_features=True)
        loss = masked_bce(logits, batch["target"], batch["mask"])
        if self.weight > 0 and self.variant != "none":
            loss = loss + self.weight * self.lrf_term(features, batch["index"])
        return loss

    def validate(self, model, loader, device) -> dict[str, float]:
        logits = torch.cat([model(batch["image"]).float().cpu() for batch in loader])
        probs = torch.sigmoid(logits).numpy()
        self.last_probs = probs
        metrics = split_metrics(self.val_targets, probs, self.val_mask, self.labels, 0.5)
        metrics["loss"] = masked_bce(logits, torch.from_numpy(self.val_targets),
                                     torch.from_numpy(self.val_mask)).item()
        return metrics

    def save_best(self, model, metrics, directory: Path) -> None:
        thresholds = choose_thresholds(self.val_targets, self.last_probs, self.val_mask, self.labels,
                                       self.threshold_rule)
        at_thresholds = split_metrics(self.val_targets, self.last_probs, self.val_mask, self.labels,
                                      [thresholds[label_key(n)] for n in self.labels])
        record = model_record(**self.meta, thresholds=thresholds, val_metrics=metrics,
                              threshold_rule=self.threshold_rule, val_metrics_at_thresholds=at_thresholds)
        save_run_model(directory, model, record)


class TailLRFTask(ImageTask):
    """LRFL's truncated nuclear norm: the basis of all training features is refreshed before every epoch."""

    def __init__(self, *args, train_images: np.ndarray, eval_batch_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain_train = ChexpertDataset(train_images, np.zeros((len(train_images), 1), np.float32),
                                           np.ones((len(train_images), 1), bool))
        self.eval_batch_size = eval_batch_size
        self.u: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def start_epoch(self, model, epoch: int, device) -> None:
        loader = DataLoader(self.plain_train, batch_size=self.eval_batch_size, shuffle=False)
        features = torch.cat([model.features(batch["image"].to(device)).float().cpu() for batch in loader])
        self.u, singular, self.v = feature_basis(features)
        tail = float(singular[self.rank:].sum())
        log.info("epoch %d: LRF basis of %d training features; tail (beyond rank %d) %.3f of %.3f", epoch + 1,
                 len(features), self.rank, tail, float(singular.sum()))

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "v": self.v}

    def load_task_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"u", "v"}:
            raise KeyError(f"expected LRF basis tensors u and v, found {sorted(tensors)}")
        self.u, self.v = tensors["u"], tensors["v"]

    def lrf_term(self, features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        u_batch = self.u.to(features.device)[index]
        return tail_term(u_batch, features, self.v.to(features.device), self.rank)


def resolve_lr(args: argparse.Namespace, pretrained: bool) -> float:
    return args.lr if args.lr is not None else (FINETUNE_LR if pretrained else SCRATCH_LR)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root",), lock="output_dir", create=True)
    require(args, output_dir="where the run is written", data_root="the CheXpert-v1.0-small folder")
    labels = resolve_labels(args.labels)
    preset = get_preset(args.backbone, "vit", "--backbone")
    pretrained = bool(args.pretrained) and preset.has_pretrained_weights
    args.lr = resolve_lr(args, pretrained)
    weight = LRF_DEFAULT_WEIGHT[args.lrf_variant] if args.lrf_weight is None else args.lrf_weight
    check_run_setup(config_from_args(args), args.output_dir)

    root = find_root(args.data_root)
    table = load_table(root, "train.csv", labels, args.uncertain, args.views)
    table = sample_patients(table, args.sample_frac, args.seed)
    torch.manual_seed(args.seed)
    model = build_image_model(args.backbone, len(labels), rank=args.rank, pool=args.pool, dropout=args.dropout,
                              pretrained=pretrained)
    if args.lrf_variant != "none" and args.lrf_rank >= model.feature_dim:
        raise ConfigError("--lrf-rank", f"{args.lrf_rank} leaves no tail: {args.backbone} features are "
                                        f"{model.feature_dim}-d")
    image_size = args.image_size or model.image_size
    if image_size != model.image_size:
        raise ConfigError("--image-size", f"{args.backbone} takes {model.image_size} px inputs, not {image_size}")
    images, kept = decode_images(table, image_size, args.skip_bad)
    table = table.take(kept)
    check_trainable(table, args.uncertain)
    assignments = split_patients(table, args.val_fraction, args.seed)
    train_idx, val_idx = np.flatnonzero(assignments == "train"), np.flatnonzero(assignments == "val")
    if len(train_idx) == 0 or len(val_idx) == 0:
        patients = len(np.unique(table.patients))
        if args.sample_frac < 1:  # the sample, not the file, is what left too few patients
            raise ConfigError("--sample-frac", f"{args.sample_frac:g} keeps {patients} patients of {table.csv}, "
                                               "too few for a train and a val split; raise it")
        raise DataError(table.csv, f"{patients} patients leave an empty train or val split; "
                                   "use more data or change --val-fraction")
    check_trainable(table.take(train_idx), args.uncertain, "train-split ")
    log.info("train %d images, val %d images (%d patients)", len(train_idx), len(val_idx),
             len(np.unique(table.patients)))
    settings = {"labels": list(labels), "uncertain": args.uncertain, "views": args.views,
                "sample_frac": args.sample_frac, "val_fraction": args.val_fraction, "skip_bad": args.skip_bad}
    meta = {"pipeline": "mavl_chexpert", "stage": "image", "preset": args.backbone,
            "kwargs": {"backbone": args.backbone, "num_classes": len(labels), "rank": args.rank, "pool": args.pool,
                       "dropout": args.dropout},
            "labels": list(labels),
            "preprocessing": {"image_size": image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                              "channels": "grey x3", "resize": "pad to square, bilinear"},
            "data": {"root": str(root.resolve()), **settings}, "monitor": args.monitor,
            "lrf": {"variant": args.lrf_variant, "rank": args.lrf_rank, "weight": weight}}
    common = dict(meta=meta, labels=labels, val_targets=table.targets[val_idx], val_mask=table.mask[val_idx],
                  variant=args.lrf_variant, rank=args.lrf_rank, weight=weight, threshold_rule=args.threshold_rule)
    if args.lrf_variant == "tail" and weight > 0:
        task = TailLRFTask(**common, train_images=images[train_idx],
                           eval_batch_size=args.eval_batch_size or max(64, args.batch_size))
    else:
        task = ImageTask(**common)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run_files = {"config.yaml": config_text(args),
                 "split.csv": split_csv_text(table.rel_paths, table.patients, assignments),
                 "data.json": data_record(root.resolve(), table, assignments, settings)}
    train_set = ChexpertDataset(images[train_idx], table.targets[train_idx], table.mask[train_idx], args.augment)
    val_set = ChexpertDataset(images[val_idx], table.targets[val_idx], table.mask[val_idx])
    result = fit(model, optimizer, train_set, val_set, task, config_from_args(args), args.output_dir,
                 run_files=run_files)
    print(result.summary(args.monitor, args.output_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
