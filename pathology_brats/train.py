"""Train the BraTS-Path tile classifier on frozen tile features and caption tokens (or on one of them).

Example (CPU, phantom, tiny encoder):
    python -m common.phantoms histology --out data/histology_phantom
    python -m pathology_brats.train --data-root data/histology_phantom --output-dir runs/brats_path/fused \\
        --encoder gigapath-tiny --text-encoder minilm
    accelerate launch --num_processes 2 -m pathology_brats.train ...

The tiles are split per class into train / val / test (``split.csv``); the best epoch is the one with the highest
validation MCC (the challenge's first metric); ``python -m pathology_brats.evaluate`` reads the test part once.
Tile features come from the frozen encoder once and are cached; caption tokens likewise. The loss weights each
class by its inverse frequency (``--class-weights none`` turns it off).
"""

from __future__ import annotations

import argparse
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
)
from common.engine import add_train_args, check_run_setup, config_from_args, fit
from common.errors import ConfigError, DataError, cli_entry
from common.metrics.gandlf import AVERAGES, gandlf_metrics
from common.run_guard import guard_command
from common.runs import model_record, save_run_model
from common.splits import group_split, split_csv_text
from pathology_brats.caption_files import check_captions, read_captions
from pathology_brats.data import VAL_FOLDER, load_tiles
from pathology_brats.encoder import add_lora, check_image_tokens, encoder_preprocessing, load_tile_encoder
from pathology_brats.model import DIRECTIONS, MODALITIES, EncoderClassifier, TileCaptionClassifier
from pathology_brats.schema import get_schema
from pathology_brats.shared import (
    TileDataset,
    add_input_args,
    default_feature_cache,
    forward,
    image_inputs,
    text_inputs,
)

log = logging.getLogger("medvl.pathology_brats")

CLASS_WEIGHTS = ("balanced", "none")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    model = parser.add_argument_group("fusion model")
    model.add_argument("--modality", choices=MODALITIES, default="fused",
                       help="streams the classifier reads: fused (tile and caption), image or text")
    model.add_argument("--fusion-direction", choices=DIRECTIONS, default="both",
                       help="both (default): the two directions concatenated; text-to-image: the seed's")
    model.add_argument("--width", type=positive_int, default=512, help="width of the fusion transformer")
    model.add_argument("--layers", type=positive_int, default=2,
                       help="cross-attention layers of the fusion transformer")
    model.add_argument("--heads", type=positive_int, default=3, help="classification heads, logits averaged (seed: 1)")
    model.add_argument("--dropout", type=nonnegative_float, default=0.1,
                       help="dropout in the fusion transformer and heads")
    model.add_argument("--class-weights", choices=CLASS_WEIGHTS, default="balanced",
                       help="weight the loss by inverse class frequency (the seed sampled inversely instead)")
    add_train_args(parser, epochs=30, batch_size=32, lr=1e-4, weight_decay=1e-5, monitor="val_mcc", mode="max")
    return parser


class TileTask:
    """Weighted cross-entropy; validation reports the challenge's scores (MCC first)."""

    metric_names = ("mcc", *(f"{m}_{a}" for m in ("f1", "accuracy", "precision", "recall", "specificity")
                              for a in AVERAGES), "auroc_per_class_average", "auroc_per_class_weighted", "loss")

    def __init__(self, meta: dict, weights: torch.Tensor | None, schema):
        self.meta, self.weights, self.schema = meta, weights, schema

    def training_loss(self, model, batch) -> torch.Tensor:
        logits = forward(model, batch).float()
        weights = self.weights.to(logits.device) if self.weights is not None else None
        return F.cross_entropy(logits, batch["label"], weight=weights)

    def validate(self, model, loader, device) -> dict[str, float]:
        logits, labels = [], []
        for batch in loader:
            logits.append(forward(model, batch).float().cpu())
            labels.append(batch["label"].cpu())
        logits, labels = torch.cat(logits), torch.cat(labels)
        metrics = gandlf_metrics(labels.numpy(), logits.argmax(1).numpy(), self.schema.num_scored_classes)
        metrics["loss"] = F.cross_entropy(logits, labels).item()
        return metrics

    def save_best(self, model, metrics, directory: Path) -> None:
        save_run_model(directory, model, model_record(**self.meta, thresholds={}, val_metrics=metrics))


def split_tiles(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                groups: Sequence[str] | None = None) -> np.ndarray:
    """train/val/test per tile, stratified by class; tiles of one group (copies of one file name) stay together."""
    train = 1 - val_fraction - test_fraction
    if train <= 0:
        raise ConfigError("--val-fraction", f"val {val_fraction} + test {test_fraction} leave nothing to train on")
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    return group_split(groups, labels, fractions=(train, val_fraction, test_fraction), seed=seed)


def check_trainable_classes(tiles, schema) -> None:
    """A training set needs at least two classes: one class trains a model that can only ever say that class."""
    present = np.unique(tiles.labels)
    if len(present) < 2:
        only = schema.classes[present[0]] if len(present) else "none"
        raise DataError(tiles.source, f"the tiles hold {len(present)} class ({only}); training needs at least two")


def input_settings(args: argparse.Namespace, data_root: Path, captions: Path | None) -> dict:
    return {"root": str(data_root.resolve()), "labels_csv": str(args.labels_csv.resolve()) if args.labels_csv
            else None, "captions": str(captions.resolve()) if captions else None, "schema": args.schema,
            "encoder": args.encoder, "image_tokens": args.image_tokens, "normalize": args.normalize,
            "preprocessing": encoder_preprocessing(args.encoder).to_json() if args.modality != "text" else None,
            "text_encoder": args.text_encoder, "modality": args.modality,
            "encoder_mode": args.encoder_mode,
            **({"lora_r": args.lora_r, "lora_alpha": args.lora_alpha} if args.encoder_mode == "lora" else {})}


def known_images(all_ids: list[str], data_root: Path) -> list[str]:
    """Every image a caption may name: the labelled tiles and the validation folder's patches."""
    val = Path(data_root) / VAL_FOLDER
    return all_ids + ([f"{VAL_FOLDER}/{p.name}" for p in val.iterdir()] if val.is_dir() else [])


def caption_texts(captions_path: Path, needed: list[str], known: list[str],
                  skip_missing: bool = False) -> dict[str, str]:
    """``{tile id: caption}`` of ``needed`` tiles; a caption of an unknown image is an error, and so is a tile
    without one unless ``skip_missing`` (``--skip-bad``) leaves it out."""
    return check_captions(read_captions(captions_path), known, needed, captions_path, skip_missing)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "labels_csv", "captions", "feature_cache",
                  "cache_dir"), lock="output_dir", create=True)
    require(args, output_dir="where the run is written",
            data_root="the folder of class folders (or the labels CSV's images)")
    check_image_tokens(args.image_tokens)
    device = check_run_setup(config_from_args(args), args.output_dir)
    schema = get_schema(args.schema)
    data_root = Path(args.data_root)
    tiles = load_tiles(data_root, schema, args.labels_csv)
    captions_path = None
    if args.modality != "image":
        captions_path = args.captions or data_root / "captions.jsonl"
        found = caption_texts(captions_path, tiles.ids, known_images(tiles.ids, data_root), args.skip_bad)
        tiles = tiles.take([i for i, tile in enumerate(tiles.ids) if tile in found])
    settings = input_settings(args, data_root, captions_path)
    cache_root = args.feature_cache or default_feature_cache(args.cache_dir)
    image = None
    if args.modality != "text":
        image, kept = image_inputs(tiles.paths, settings, device, cache_root, args.skip_bad)
        tiles = tiles.take(kept)
    check_trainable_classes(tiles, schema)
    text = text_mask = None
    if args.modality != "image":
        text, text_mask = text_inputs([found[tile] for tile in tiles.ids], settings, cache_root, args.cache_dir,
                                      device)
    assignments = split_tiles(tiles.labels, args.val_fraction, args.test_fraction, args.seed, tiles.groups)
    parts = {name: np.flatnonzero(assignments == name) for name in ("train", "val", "test")}
    for name, index in parts.items():
        if len(index) == 0:
            raise DataError(tiles.source, f"the {name} split is empty ({len(tiles)} tiles); use more data")

    def dataset(index: np.ndarray, augment: bool = False) -> TileDataset:
        return TileDataset(tiles.labels[index], image[index] if image is not None else None,
                           text[index] if text is not None else None,
                           text_mask[index] if text_mask is not None else None, augment=augment)

    trains_encoder = settings["encoder_mode"] != "frozen" and image is not None
    encoder = load_tile_encoder(args.encoder, args.image_tokens, pretrained=True) if trains_encoder else None
    if encoder is not None and settings["encoder_mode"] == "lora":
        encoder = add_lora(encoder, args.lora_r, args.lora_alpha)
    image_dim = encoder.dim if encoder is not None else (int(image.shape[-1]) if image is not None else 1)
    kwargs = {"image_dim": image_dim,
              "text_dim": int(text.shape[-1]) if text is not None else 1, "num_classes": len(schema.classes),
              "modality": args.modality, "direction": args.fusion_direction, "width": args.width,
              "layers": args.layers, "heads": args.heads, "dropout": args.dropout}
    torch.manual_seed(args.seed)
    model = TileCaptionClassifier(**kwargs)
    model.fit_standardization(image[parts["train"]] if image is not None and not trains_encoder else None,
                              text[parts["train"]] if text is not None else None,
                              text_mask[parts["train"]] if text_mask is not None else None)
    if encoder is not None:
        model = EncoderClassifier(encoder.train(), model, args.normalize)
    counts = np.bincount(tiles.labels[parts["train"]], minlength=len(schema.classes)).astype(np.float64)
    weights = None
    if args.class_weights == "balanced":
        weights = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0),
                               dtype=torch.float32)
    meta = {"pipeline": "pathology_brats", "stage": "train", "preset": args.encoder, "kwargs": kwargs,
            "labels": list(schema.classes),
            "preprocessing": {**(settings["preprocessing"] or {}), "normalize": args.normalize,
                              "image_tokens": args.image_tokens},
            "data": settings, "monitor": args.monitor, "schema": args.schema}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    run_files = {"config.yaml": config_text(args),
                 "split.csv": split_csv_text(tiles.ids, tiles.groups, assignments),
                 "data.json": json.dumps({"tiles": len(tiles), "counts": tiles.counts(), **settings}, indent=2,
                                         sort_keys=True) + "\n"}
    task = TileTask(meta, weights, schema)
    result = fit(model, optimizer, dataset(parts["train"], augment=True), dataset(parts["val"]), task,
                 config_from_args(args), args.output_dir, run_files=run_files)
    print(result.summary(args.monitor, args.output_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
