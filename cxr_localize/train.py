"""Phase 2: train the report-conditioned U-Net (frozen text encoder; fusion, decoder and head learn).

Example:
    python -m cxr_localize.train --data-root data/iu_phantom --encoder-init runs/cxr_localize/pretrain \\
        --text-encoder minilm --output-dir runs/cxr_localize/train

Loss: soft Dice + BCE with ``--pos-weight`` (lesions are a few percent of the pixels). Best checkpoint and early
stop on validation Dice. The split is by patient (uid) and is saved as ``split.csv``; the test split is never read
here (``python -m cxr_localize.evaluate --run-dir RUN`` does that). Images are never flipped unless
``--text-aware-flip``, which swaps left and right in the report with the image.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from common.cli import (
    MedvlArgumentParser,
    base_parser,
    config_text,
    nonnegative_float,
    parse_args,
    require,
    unit_interval,
)
from common.engine import add_train_args, check_run_setup, config_from_args, fit
from common.errors import DataError, cli_entry
from common.images import IMAGENET_MEAN, IMAGENET_STD
from common.metrics.segmentation import per_image_metrics
from common.plots import loss_curves
from common.run_guard import guard_command, path_values
from common.runs import model_record, save_run_model
from common.splits import load_split_csv
from cxr_localize.data import MASK_DIR, TEXT_SOURCES, LocalizationDataset, load_iu, swap_left_right
from cxr_localize.model import (
    FUSIONS,
    TEXT_PRESETS,
    TEXT_WHITENINGS,
    ReportUNet,
    load_encoder_init,
    load_text_encoder,
)
from cxr_localize.shared import add_data_args, add_encoder_args, split_table

log = logging.getLogger("medvl.cxr_localize")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, projection="Frontal", masks=True)
    add_encoder_args(parser)
    group = parser.add_argument_group("report conditioning")
    group.add_argument("--text-encoder", default="clip-vit-b32",
                       help=f"preset ({', '.join(TEXT_PRESETS)}) or a local Hugging Face directory")
    group.add_argument("--text-source", choices=TEXT_SOURCES, default="findings",
                       help="report text the model reads: findings, or findings and impression")
    group.add_argument("--fusion", choices=FUSIONS, default="film",
                       help="film; concat (tile + concat with two coordinate channels + 1x1 conv); or concat-seed, "
                            "the original notebook's concat without coordinate channels (with --text-whitening "
                            "none the bottleneck is the notebook's expression exactly)")
    group.add_argument("--text-whitening", choices=TEXT_WHITENINGS, default="zca",
                       help="standardisation of report embeddings fitted on the training reports (none: raw vectors, "
                            "as the original notebook)")
    group.add_argument("--text-aware-flip", action="store_true",
                       help="flip half the training images horizontally and swap left/right in their reports")
    group = parser.add_argument_group("phase 2")
    group.add_argument("--encoder-init", type=Path, default=None, help="phase-1 run whose encoder starts training")
    group.add_argument("--train-encoder", action=argparse.BooleanOptionalAction, default=False,
                       help="also train the image encoder (default: frozen, as in the original recipe)")
    group.add_argument("--pos-weight", type=nonnegative_float, default=3.0, help="BCE weight of lesion pixels")
    group.add_argument("--dice-weight", type=nonnegative_float, default=1.0,
                       help="weight of the soft Dice term beside the pixel BCE")
    group.add_argument("--threshold", type=unit_interval, default=0.5, help="probability at which a pixel is lesion")
    add_train_args(parser, epochs=30, batch_size=16, lr=3e-3, weight_decay=1e-4, monitor="val_dice", mode="max")
    parser.set_defaults(patience=10)
    return parser


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (probs * target).sum(1)
    return (1 - (2 * inter + smooth) / (probs.sum(1) + target.sum(1) + smooth)).mean()


class LocalizationTask:
    """Dice + weighted BCE; validation Dice/IoU at the model's threshold."""

    metric_names = ("dice", "iou", "loss")

    def __init__(self, meta: dict, pos_weight: float, dice_weight: float, threshold: float):
        self.meta, self.dice_weight, self.threshold = meta, dice_weight, threshold
        self.pos_weight = torch.tensor(pos_weight)

    def training_loss(self, model, batch) -> torch.Tensor:
        logits = model(batch["image"], batch["text"]).float()
        bce = F.binary_cross_entropy_with_logits(logits, batch["mask"], pos_weight=self.pos_weight.to(logits.device))
        return bce + self.dice_weight * soft_dice_loss(logits, batch["mask"])

    def validate(self, model, loader: DataLoader, device) -> dict[str, float]:
        probs, masks, losses = [], [], []
        for batch in loader:
            losses.append(self.training_loss(model, batch).item() * len(batch["image"]))
            probs.append(torch.sigmoid(model(batch["image"], batch["text"]).float())[:, 0].cpu().numpy())
            masks.append(batch["mask"][:, 0].cpu().numpy() > 0.5)
        metrics = per_image_metrics(np.concatenate(probs), np.concatenate(masks), self.threshold)
        return {"dice": float(metrics["dice"].mean()), "iou": float(metrics["iou"].mean()),
                "loss": sum(losses) / sum(len(m) for m in masks)}

    def save_best(self, model, metrics, directory: Path) -> None:
        save_run_model(directory, model, {**self.meta, "val_metrics": metrics})


def check_pretrain_leakage(encoder_init: Path, data_root: Path, split: pd.DataFrame) -> None:
    """Refuse a phase-1 encoder that was trained on images of this run's test patients (same data root only)."""
    config_path, split_path = encoder_init / "config.yaml", encoder_init / "split.csv"
    if not (config_path.is_file() and split_path.is_file()):
        return
    config = yaml.safe_load(config_path.read_text()) or {}
    if Path(str(config.get("data_root", ""))).resolve() != data_root.resolve():
        return
    seen = load_split_csv(split_path)
    if config.get("split_level") == "image":
        seen_uids = set(seen.loc[seen["split"] != "test", "id"].str.extract(r"^(\d+)_")[0].dropna())
    else:
        seen_uids = set(seen.loc[seen["split"] != "test", "group"])
    test_uids = set(split.loc[split["split"] == "test", "group"]) if "group" in split else set()
    leaked = sorted(seen_uids & test_uids)
    if leaked:
        raise DataError(split_path, f"{len(leaked)} test patient(s) of this run were used in pre-training (first: "
                                    f"uid {leaked[0]}); pre-train with the same --split-seed and --split-level")


def check_masks(train, folder: Path) -> None:
    """The training masks need both classes: all empty (or all full) trains a model that can only paint one."""
    inside = int(train.masks.sum())
    if inside == 0 or inside == train.masks.size:
        state = "empty" if inside == 0 else "full (every pixel marked)"
        raise DataError(folder, f"all {len(train)} training masks are {state}; a mask model needs pixels of both "
                                "classes to learn from")


def build_datasets(args, samples, encoder) -> tuple[LocalizationDataset, LocalizationDataset, torch.Tensor]:
    """Datasets over one precomputed text table (train reports, their left/right swaps if flipping, val reports)."""
    train, val = samples.subset("train"), samples.subset("val")
    if len(train) == 0:
        raise DataError(args.data_root, "no training images with masks in this split")
    if len(val) == 0:
        raise DataError(args.data_root, "no validation images with masks in this split; the best epoch is chosen on "
                                        "them (add annotated patients or change --split-seed)")
    check_masks(train, Path(args.data_root) / MASK_DIR)
    swapped = [swap_left_right(t) for t in train.texts] if args.text_aware_flip else []
    table, index = encoder.table(train.texts + swapped + val.texts)
    n = len(train)
    flip = index[n : 2 * n] if args.text_aware_flip else None
    train_set = LocalizationDataset(train.images, train.masks, table, index[:n], args.augment, flip)
    val_index = index[n + len(swapped) :]
    val_set = LocalizationDataset(val.images, val.masks, table, val_index)
    return train_set, val_set, table[np.unique(index[:n])]


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "cache_dir", "encoder_init"), lock="output_dir",
                  create=True, extra_reads=path_values(args, "encoder_weights", "text_encoder"))
    require(args, "output_dir", "data_root")
    run_dir = args.output_dir
    check_run_setup(config_from_args(args), run_dir)
    split, split_text = split_table(args, with_masks=True)
    if args.split_level == "image":
        log.warning("image-level split: images of one patient may sit in train and test")
    if args.encoder_init is not None:
        check_pretrain_leakage(args.encoder_init, args.data_root, split)
    samples = load_iu(args.data_root, image_size=args.image_size, text_source=args.text_source,
                      projection=args.projection, with_masks=True, splits=("train", "val"),
                      split_level=args.split_level, seed=args.split_seed, skip_bad=args.skip_bad, limit=args.limit,
                      mask_threshold=args.mask_threshold)
    encoder = load_text_encoder(args.text_encoder, cache_dir=args.cache_dir)
    train_set, val_set, train_table = build_datasets(args, samples, encoder)
    log.info("train %d, val %d images; %d distinct training reports; text encoder %s (%d-d)", len(train_set),
             len(val_set), len(train_table), args.text_encoder, encoder.dim)
    torch.manual_seed(args.seed)
    weights = None if args.encoder_init is not None else args.encoder_weights
    model = ReportUNet(encoder.dim, args.encoder, weights, args.fusion, args.decoder_channels,
                       freeze_encoder=not args.train_encoder, cache_dir=args.cache_dir)
    init_meta = None
    if args.encoder_init is not None:
        init_meta = load_encoder_init(model.unet.encoder, args.encoder_init, args.encoder)
    elif weights == "none" and not args.train_encoder:
        log.warning("the image encoder is random and frozen; pass --encoder-init or --train-encoder")
    model.set_text_statistics(train_table, args.text_whitening)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    meta = model_record(
        pipeline="cxr_localize", stage="train", preset=args.encoder,
        kwargs={"text_dim": encoder.dim, "fusion": args.fusion, "decoder_channels": list(args.decoder_channels)},
        labels=[], preprocessing={"image_size": args.image_size, "mean": list(IMAGENET_MEAN),
                                  "std": list(IMAGENET_STD), "channels": "grey x3"},
        thresholds={"mask": args.threshold}, monitor=args.monitor,
        data={"root": str(Path(args.data_root).resolve()), "projection": args.projection, "limit": args.limit,
              "split_level": args.split_level, "split_seed": args.split_seed, "skipped": dict(samples.skipped),
              "mask_threshold": args.mask_threshold},
        text_encoder=args.text_encoder, text_source=args.text_source, text_whitening=args.text_whitening,
        encoder_init=None if init_meta is None else str(args.encoder_init))
    task = LocalizationTask(meta, args.pos_weight, args.dice_weight, args.threshold)
    result = fit(model, optimizer, train_set, val_set, task, config_from_args(args), run_dir,
                 run_files={"config.yaml": config_text(args), "split.csv": split_text})
    if result.history:
        loss_curves(result.history, run_dir / "figures" / "loss_curves.png")
    if not result.completed:
        print(f"stopped at step {result.global_step} (--max-steps); continue with --resume")
    else:
        print(f"best {args.monitor} {result.best_value:.4f} at epoch {result.best_epoch}; model in {run_dir / 'best'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
