"""Phase 1: a timm ViT with a low-rank projection, trained with BCE + an LRF term on CheXpert's train.csv.

Example (CPU, phantom, tiny ViT; a T4/A6000 run uses the default ``--backbone vit-b16`` with ImageNet weights):
    python -m common.phantoms cxr --format chexpert --out data/chexpert_phantom
    python -m mavl_chexpert.train_image --data-root data/chexpert_phantom --output-dir runs/mavl/image \\
        --backbone vit-tiny
    accelerate launch --num_processes 2 -m mavl_chexpert.train_image --data-root ... --output-dir ...

``train.csv`` is split by patient into train and val (``split.csv``); the best epoch (val macro AUROC) and the
per-class thresholds (max F1 on val, ``--threshold-rule``) are chosen there. ``valid.csv`` is the test set and is
read only by ``python -m mavl_chexpert.evaluate``.

``--holdout-classes Edema`` removes diseases from every phase: their columns leave the table before the split
(no loss, no stratification, no model selection, no head output); the fusion phase inherits them and scores
them from their descriptions alone (zero-shot). A held-out class needs positives in ``train.csv`` (checked, only
counted) so that it can be scored at all.

``--lrf-variant`` picks the low-rank term (the README lists every difference): ``tail`` (default) is the truncated
nuclear norm of the un-augmented training features beyond ``--lrf-rank``, its basis recomputed before every epoch,
scaled so that its weight means the same at any batch size; ``lrfl`` is LRFL's code (per-batch L1 of the tail
diagonal, basis from the augmented loader, the product with Vh as written there;
``configs/mavl_chexpert/train_image.lrfl.yaml`` is its second-stage recipe, run with ``--init-from`` a first-stage
run); ``seed`` is the seed notebook's literal term (the batch's top singular directions); ``none`` is plain BCE.
The basis U (N x k) is moved to the training device once per epoch; a step indexes it there.

Preprocessing (input size, mean/std, interpolation) comes from the backbone's timm ``pretrained_cfg`` and is
recorded in ``model.json``; evaluation reads it from there. ``--backbone`` takes a ``vit`` preset or a local timm
folder (``config.json`` + ``model.safetensors``, timm's hub layout); ``--cache-dir`` is where a preset's timm
weights are cached. ``--lr`` defaults to the seed's 2e-5 when the backbone starts from pretrained weights and to
1e-3 when it trains from scratch (tiny presets, ``--no-pretrained``).
"""

from __future__ import annotations

import argparse
import logging
import math
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
from common.presets import get_preset
from common.run_guard import guard_command
from common.runs import load_run, model_record, save_run_model
from common.splits import split_csv_text
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
from mavl_chexpert.model import (
    LRF_VARIANTS,
    POOLS,
    build_image_model,
    feature_basis,
    local_backbone_dir,
    lrfl_term,
    preprocessing_from_backbone,
    seed_term,
    tail_shares,
    timm_architecture,
)
from mavl_chexpert.shared import (
    add_backbone_arg,
    add_data_args,
    add_dropout_arg,
    add_threshold_rule_arg,
    check_holdout_positives,
    choose_thresholds,
    data_record,
    masked_bce,
    parse_holdout,
    split_metrics,
)

log = logging.getLogger("medvl.mavl_chexpert")

LRF_DEFAULT_WEIGHT = {"tail": 0.006, "lrfl": 0.005, "seed": 1e-3, "none": 0.0}
"""``tail``: the weight on the tail of the features' normalised spectrum (batch-size free; 0.006 keeps the per-step
strength medvl's unscaled 0.005 had at batch 32 on the phantom's 693 images; LRFL's 0.005 at its batch 512 on 75k
NIH images would be 0.0093); ``lrfl``: LRFL's ``tn_loss_factor`` default; ``seed``: its eta."""
SCRATCH_LR, FINETUNE_LR = 1e-3, 2e-5


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    model = parser.add_argument_group("model")
    add_backbone_arg(model)
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from the weights (a preset's ImageNet weights through timm's cache, or the "
                            "folder's); tiny presets start from scratch")
    model.add_argument("--init-from", type=Path, default=None,
                       help="start from this phase-1 run's best weights (LRFL's second stage); its backbone, "
                            "pool, rank and labels must match this run's")
    model.add_argument("--image-size", type=positive_int, default=None,
                       help="input side; default: the backbone's (224 for vit-b16)")
    model.add_argument("--pool", choices=POOLS, default="mean",
                       help="mean of patch tokens, the CLS token (the seed's), or LRFL's mean of the last "
                            "block's patch tokens then a fresh LayerNorm (fc_norm) in place of the final norm")
    model.add_argument("--rank", type=positive_int, default=64, help="width r of the low-rank projection")
    add_dropout_arg(model, default=0.1, help="dropout before the classifier")
    model.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="rotation 10 degrees, resized crop 80-100%%, brightness/contrast 0.1 (no flips)")
    lrf = parser.add_argument_group("LRF")
    lrf.add_argument("--lrf-variant", choices=LRF_VARIANTS, default="tail",
                     help="tail: medvl's truncated nuclear norm; lrfl: LRFL's code; seed: the seed's literal "
                          "term; none: BCE only (README: the differences)")
    lrf.add_argument("--lrf-rank", type=positive_int, default=38,
                     help="singular directions left free (LRFL: 38 for ViT-B on NIH); the rest are penalised")
    lrf.add_argument("--lrf-weight", type=nonnegative_float, default=None,
                     help="weight of the LRF term (default 0.006 for tail, batch-size free; 0.005 for lrfl as "
                          "LRFL's default, which acts per batch; 1e-3 for seed as the seed)")
    add_threshold_rule_arg(parser)
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
        if self.variant == "seed":  # the seed's eta * reg / B
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


class BasisLRFTask(ImageTask):
    """``tail`` and ``lrfl``: the SVD of every training feature, taken before each epoch, drives each batch's term.

    Only the tail columns of the basis are kept, and they are moved to the training device once per epoch (or once
    after a resume): a step indexes rows of U where it lives and moves nothing that grows with N.

    ``tail`` multiplies the batch's signed share by sqrt(N) / B, an unbiased estimate of the tail singular values of
    F / sqrt(N) (the root of the features' second moment), so its weight means the same at any batch size and
    split size, and its gradient per image is of BCE's order. ``lrfl`` is LRFL's per-batch L1, unscaled.
    """

    def __init__(self, *args, basis_images: ChexpertDataset, eval_batch_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.basis_images = basis_images
        self.eval_batch_size = eval_batch_size
        self.u_tail: torch.Tensor | None = None
        self.v_tail: torch.Tensor | None = None
        self.scale = 1.0

    def start_epoch(self, model, epoch: int, device) -> None:
        loader = DataLoader(self.basis_images, batch_size=self.eval_batch_size, shuffle=False)
        features = torch.cat([model.features(batch["image"].to(device)).float().cpu() for batch in loader])
        u, singular, v = feature_basis(features)
        self.set_basis(u, v, len(features), device)
        tail = float(singular[self.rank:].sum())
        log.info("epoch %d: LRF basis of %d training features; tail (beyond rank %d) %.3f of %.3f", epoch + 1,
                 len(features), self.rank, tail, float(singular.sum()))

    def set_basis(self, u: torch.Tensor, v: torch.Tensor, count: int, device) -> None:
        """Keep the tail columns of U (N, k) and of the matrix the batch features multiply, on ``device``."""
        if self.variant == "lrfl":
            if v.shape[0] != v.shape[1]:
                raise ConfigError("--lrf-variant", f"lrfl multiplies by the square Vh as LRFL's code does, which "
                                                   f"needs at least {v.shape[0]} training images, not {count}")
            right = v.T[:, self.rank:]  # LRFL's code: F @ Vh, so column j of Vh (not its row j)
        else:
            right = v[:, self.rank:]
        self.u_tail = u[:, self.rank:].contiguous().to(device)
        self.v_tail = right.contiguous().to(device)
        self.scale = math.sqrt(count)

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {"u_tail": self.u_tail, "v_tail": self.v_tail, "count": torch.tensor(float(len(self.u_tail)))}

    def load_task_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"u_tail", "v_tail", "count"}:
            raise KeyError(f"expected LRF basis tensors u_tail, v_tail and count, found {sorted(tensors)}")
        self.u_tail, self.v_tail = tensors["u_tail"], tensors["v_tail"]
        self.scale = math.sqrt(float(tensors["count"]))

    def lrf_term(self, features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.u_tail.device != features.device:  # a basis restored from a checkpoint: moved once, then kept
            self.u_tail, self.v_tail = self.u_tail.to(features.device), self.v_tail.to(features.device)
        u_batch = self.u_tail[index]
        if self.variant == "lrfl":
            return lrfl_term(u_batch, features, self.v_tail)
        return tail_shares(u_batch, features, self.v_tail).sum() * (self.scale / features.shape[0])


def check_init_run(args: argparse.Namespace, labels: tuple[str, ...], architecture: dict):
    """The first-stage run ``--init-from`` names, loaded, after checking it is the model this run builds."""
    run = load_run(args.init_from, "mavl_chexpert", lambda meta: build_image_model(**meta["kwargs"]), stage="image")
    kwargs = run.meta["kwargs"]
    mine = {"--pool": args.pool, "--rank": args.rank, "--labels": list(labels)}
    theirs = {"--pool": kwargs.get("pool"), "--rank": kwargs.get("rank"), "--labels": run.meta["labels"]}
    for flag, value in mine.items():
        if theirs[flag] != value:
            raise ConfigError(flag, f"{value!r} differs from --init-from {args.init_from}'s {theirs[flag]!r}")
    if kwargs.get("architecture", timm_architecture(kwargs["backbone"])) != architecture:
        raise ConfigError("--backbone", f"{args.backbone} is not the network of --init-from {args.init_from} "
                                        f"({kwargs['backbone']})")
    return run.model


def resolve_lr(args: argparse.Namespace, pretrained: bool) -> float:
    return args.lr if args.lr is not None else (FINETUNE_LR if pretrained else SCRATCH_LR)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "init_from", "cache_dir"), lock="output_dir",
                  create=True)
    require(args, output_dir="where the run is written", data_root="the CheXpert-v1.0-small folder")
    labels = resolve_labels(args.labels)
    trained = parse_holdout(args.holdout_classes, labels)
    seen = tuple(n for n, t in zip(labels, trained) if t)
    folder = local_backbone_dir(args.backbone)
    if folder is None:
        pretrained = bool(args.pretrained) and get_preset(args.backbone, "vit", "--backbone").has_pretrained_weights
    else:
        pretrained = bool(args.pretrained)
    architecture = timm_architecture(args.backbone)
    first_stage = check_init_run(args, seen, architecture) if args.init_from is not None else None
    args.lr = resolve_lr(args, pretrained or first_stage is not None)
    weight = LRF_DEFAULT_WEIGHT[args.lrf_variant] if args.lrf_weight is None else args.lrf_weight
    check_run_setup(config_from_args(args), args.output_dir)

    root = find_root(args.data_root)
    table = load_table(root, "train.csv", labels, args.uncertain, args.views)
    table = sample_patients(table, args.sample_frac, args.seed)
    check_holdout_positives(table, trained)
    # The held-out columns leave the table here: no loss, split stratification or model selection sees them.
    table = table.take_labels(np.flatnonzero(trained))
    torch.manual_seed(args.seed)
    model = build_image_model(args.backbone, len(seen), rank=args.rank, pool=args.pool, dropout=args.dropout,
                              pretrained=pretrained and first_stage is None, cache_dir=args.cache_dir)
    if first_stage is not None:
        model.load_state_dict(first_stage.state_dict())
        log.info("starting from %s (second stage)", args.init_from)
    preprocessing = preprocessing_from_backbone(model.backbone, pretrained or first_stage is not None)
    if args.lrf_variant != "none" and args.lrf_rank >= model.feature_dim:
        raise ConfigError("--lrf-rank", f"{args.lrf_rank} leaves no tail: {args.backbone} features are "
                                        f"{model.feature_dim}-d")
    image_size = args.image_size or model.image_size
    if image_size != model.image_size:
        raise ConfigError("--image-size", f"{args.backbone} takes {model.image_size} px inputs, not {image_size}")
    images, kept = decode_images(table, image_size, args.skip_bad, preprocessing["interpolation"])
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
    settings = {"labels": list(labels), "holdout_classes": [n for n in labels if n not in seen],
                "uncertain": args.uncertain, "views": args.views,
                "sample_frac": args.sample_frac, "val_fraction": args.val_fraction, "skip_bad": args.skip_bad}
    meta = {"pipeline": "mavl_chexpert", "stage": "image", "preset": args.backbone,
            "kwargs": {"backbone": str(args.backbone), "num_classes": len(seen), "rank": args.rank,
                       "pool": args.pool, "dropout": args.dropout, "architecture": architecture},
            "labels": list(seen), "holdout_classes": settings["holdout_classes"],
            "preprocessing": {**preprocessing, "channels": "grey x3",
                              "resize": f"pad to square, {preprocessing['interpolation']}"},
            "data": {"root": str(root.resolve()), **settings}, "monitor": args.monitor,
            "lrf": {"variant": args.lrf_variant, "rank": args.lrf_rank, "weight": weight}}
    common = dict(meta=meta, labels=seen, val_targets=table.targets[val_idx], val_mask=table.mask[val_idx],
                  variant=args.lrf_variant, rank=args.lrf_rank, weight=weight, threshold_rule=args.threshold_rule)
    normalise = {"mean": preprocessing["mean"], "std": preprocessing["std"]}
    train_set = ChexpertDataset(images[train_idx], table.targets[train_idx], table.mask[train_idx], args.augment,
                                **normalise)
    if args.lrf_variant in ("tail", "lrfl") and weight > 0:
        # tail: the un-augmented images; lrfl: the augmented training loader, as LRFL builds its basis.
        basis_images = train_set if args.lrf_variant == "lrfl" else ChexpertDataset(
            images[train_idx], table.targets[train_idx], table.mask[train_idx], **normalise)
        task = BasisLRFTask(**common, basis_images=basis_images,
                            eval_batch_size=args.eval_batch_size or max(64, args.batch_size))
    else:
        task = ImageTask(**common)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run_files = {"config.yaml": config_text(args),
                 "split.csv": split_csv_text(table.rel_paths, table.patients, assignments),
                 "data.json": data_record(root.resolve(), table, assignments, settings)}
    val_set = ChexpertDataset(images[val_idx], table.targets[val_idx], table.mask[val_idx], **normalise)
    result = fit(model, optimizer, train_set, val_set, task, config_from_args(args), args.output_dir,
                 run_files=run_files)
    print(result.summary(args.monitor, args.output_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
