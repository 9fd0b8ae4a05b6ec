"""What this pipeline's commands share: the data flags of both training phases, the run's data record, masked
BCE, validation metrics and thresholds. A flag more than one command takes is defined here once (``add_*_arg``),
so its name, type and help agree across the commands."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import nonnegative_float, positive_int, unit_interval
from common.errors import ConfigError, DataError
from common.metrics.classification import best_threshold, multilabel_metrics
from common.text_encoders import text_presets
from mavl_chexpert.data import UNCERTAIN_POLICIES, VIEWS, Table, label_key, resolve_labels
from mavl_chexpert.model import BACKBONES
from mavl_chexpert.text import DEFAULT_DESCRIPTIONS

log = logging.getLogger("medvl.mavl_chexpert")

THRESHOLD_RULES = ("f1", "youden")


def add_data_root_arg(parser, help: str = "the CheXpert-v1.0-small folder holding train.csv and valid.csv "
                                          "(or its parent)") -> None:
    parser.add_argument("--data-root", type=Path, default=None, help=help)


def add_labels_arg(parser, default: str = "competition") -> None:
    parser.add_argument("--labels", default=default,
                        help="competition (the 5 CheXpert competition findings), all (14), or comma-separated names")


def add_holdout_classes_arg(parser, default: str | None, help: str) -> None:
    """``--holdout-classes``: ``train_image`` names them; ``train_fusion`` defaults to the image run's (None)."""
    parser.add_argument("--holdout-classes", default=default, help=help)


def add_skip_bad_arg(parser) -> None:
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) rows whose image is missing or does not decode, instead of stopping")


def add_n_boot_arg(parser) -> None:
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the 95%% intervals")


def add_backbone_arg(parser, presets_only: bool = False) -> None:
    """``--backbone``; ``presets_only`` (``ablate``, which names the preset of every image run) refuses a folder."""
    if presets_only:
        parser.add_argument("--backbone", default="vit-b16", choices=BACKBONES,
                            help="image backbone preset of every image run")
    else:
        parser.add_argument("--backbone", default="vit-b16",
                            help=f"timm ViT preset ({', '.join(BACKBONES)}) or a local timm folder (config.json + "
                                 "model.safetensors, as timm.models.save_for_hf writes)")


def add_text_encoder_arg(parser) -> None:
    parser.add_argument("--text-encoder", default="bio-clinicalbert",
                        help=f"preset ({', '.join(text_presets())}) or a local Hugging Face directory")


def add_descriptions_arg(parser) -> None:
    parser.add_argument("--descriptions", type=Path, default=DEFAULT_DESCRIPTIONS,
                        help="JSON {disease: {definition, aspects: {name: sentence}}}")


def add_dropout_arg(parser, default: float, help: str) -> None:
    """``--dropout``: each phase's model drops out at its own place, so the default and the help are its own."""
    parser.add_argument("--dropout", type=nonnegative_float, default=default, help=help)


def add_threshold_rule_arg(parser) -> None:
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="f1",
                        help="per-class decision thresholds chosen on validation")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    add_data_root_arg(group)
    add_labels_arg(group)
    group.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="per-class",
                       help="uncertain (-1) labels: ones (the seed), zeros, ignore (masked out of loss and metrics) "
                            "or per-class (ones for Atelectasis and Edema, zeros otherwise; CheXpert's best)")
    group.add_argument("--views", choices=VIEWS, default="frontal", help="frontal images only, or all views")
    group.add_argument("--sample-frac", type=unit_interval, default=1.0,
                       help="train on this fraction of train.csv's patients (the seed: 0.3)")
    group.add_argument("--val-fraction", type=unit_interval, default=0.15,
                       help="share of train.csv's patients held out for validation (best epoch, thresholds)")
    add_holdout_classes_arg(group, default="",
                            help="comma-separated labels left out of every phase (their labels reach no loss and no "
                                 "model selection); the fusion scores them from their descriptions alone (zero-shot)")
    add_skip_bad_arg(group)


def parse_holdout(spec: str, labels: tuple[str, ...]) -> np.ndarray:
    """Boolean mask of the trained (seen) labels; an unknown name, one outside ``labels`` or all of them is refused."""
    if not spec.strip():
        return np.ones(len(labels), dtype=bool)
    try:
        held = resolve_labels(spec)
    except ConfigError as err:
        raise ConfigError("--holdout-classes", err.message) from err
    outside = [n for n in held if n not in labels]
    if outside:
        raise ConfigError("--holdout-classes", f"{', '.join(outside)} not among the labels ({', '.join(labels)})")
    trained = np.array([n not in held for n in labels])
    if not trained.any():
        raise ConfigError("--holdout-classes", "holds out every class; at least one must be trained")
    return trained


def check_holdout_positives(table: Table, trained: np.ndarray, flag: str = "--holdout-classes") -> None:
    """A held-out class needs positive and negative images in ``table``: otherwise there is nothing to recognise and
    its AUROC is undefined (only counts are read; the labels reach no loss)."""
    for j, name in enumerate(table.labels):
        if trained[j]:
            continue
        known = table.targets[table.mask[:, j], j]
        positives = int(known.sum())
        if positives == 0 or positives == len(known):
            raise DataError(table.csv, f"held-out class {name} ({flag}) has {positives} positive and "
                                       f"{len(known) - positives} negative rows here; it cannot be scored")


def hide_holdout(table: Table, trained: np.ndarray) -> Table:
    """The table with the held-out columns unobserved (targets 0, mask False): no loss or metric can read them."""
    from dataclasses import replace

    return replace(table, targets=np.where(trained[None, :], table.targets, 0.0).astype(np.float32),
                   mask=table.mask & trained[None, :])


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               classes: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE over observed cells (and, with ``classes``, only those label columns)."""
    weights = mask.float()
    if classes is not None:
        weights = weights * classes.float().unsqueeze(0)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (loss * weights).sum() / weights.sum().clamp_min(1.0)


def data_record(root: Path, table: Table, assignments: np.ndarray, settings: dict) -> str:
    """``data.json``: the CSV, its digest and the split sizes, so ``--resume`` notices changed data."""
    digest = hashlib.sha256(Path(table.csv).read_bytes()).hexdigest()
    counts = {name: int((assignments == name).sum()) for name in ("train", "val")}
    return json.dumps({"root": str(root), "csv": table.csv.name, "sha256": digest, "images": counts,
                       "settings": settings}, indent=2, sort_keys=True) + "\n"


def choose_thresholds(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray, labels: tuple[str, ...],
                      rule: str) -> dict[str, float]:
    """Per-class decision thresholds on validation; a class without both outcomes there keeps 0.5 (warned)."""
    out = {}
    for j, name in enumerate(labels):
        rows = mask[:, j]
        y = targets[rows, j].astype(int)
        if y.size == 0 or y.min() == y.max():
            log.warning("validation has no %s for %s; its threshold stays 0.5",
                        "positives" if y.size == 0 or y.max() == 0 else "negatives", name)
            out[label_key(name)] = 0.5
        else:
            out[label_key(name)] = best_threshold(y, probs[rows, j], metric=rule)
    return out


def split_metrics(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray, labels: tuple[str, ...],
                  thresholds) -> dict[str, float]:
    return multilabel_metrics(targets, probs, thresholds, [label_key(n) for n in labels], mask=mask)


__all__ = ["THRESHOLD_RULES", "add_data_root_arg", "add_labels_arg", "add_holdout_classes_arg", "add_skip_bad_arg",
           "add_n_boot_arg", "add_backbone_arg", "add_text_encoder_arg", "add_descriptions_arg", "add_dropout_arg",
           "add_threshold_rule_arg", "add_data_args", "parse_holdout", "check_holdout_positives", "hide_holdout",
           "masked_bce", "data_record", "choose_thresholds", "split_metrics"]
