"""Phase 3: match phase-1 image embeddings against each disease's aspect sentences (MAVL-style similarity fusion).

Example (CPU, after ``mavl_chexpert.train_image``):
    python -m mavl_chexpert.train_fusion --data-root data/chexpert_phantom --image-run runs/mavl/image \\
        --output-dir runs/mavl/fusion --text-encoder minilm

The fusion run uses the image run's labels, uncertainty policy, views and patient split (``split.csv`` is copied,
so no phase-1 training image validates phase 3). The phase-1 model is frozen by default, so its embeddings of the
training and validation images are computed once and phase 3 trains on them in seconds; ``--finetune-backbone``
trains through the ViT instead. The logit of disease c is ``exp(t) * agg_a cos(img, aspect_ca) + b`` with a
learnable temperature t and bias b (``--similarity seed``: the raw cosine, as the seed). ``--loss contrastive``
is the seed's variant: softmax over diseases at temperature 0.2 with one positive label drawn per image.
``--fusion mavl`` is MAVL's own fusion instead: each aspect sentence cross-attends over phase 1's patch tokens
(one temperature per aspect) and a head shared by all diseases reads the concatenated aspect outputs
(``model.AspectAttentionFusion``); ``--aspect-combine all`` scores each aspect sentence with one shared detector
instead and a disease as the mean log-probability that every aspect it states is shown, which is what lets an
unseen combination of seen aspects be recognised (README: zero-shot).

Held-out diseases come from the image run (``train_image --holdout-classes``): phase 1 never trained on them,
and here their columns are unobserved (no loss, no model selection, no threshold); their scores come from their
descriptions alone, so ``evaluate`` reports them as unseen. ``--holdout-classes`` may repeat the image run's
set; naming another set is refused (a disease phase 1 trained on cannot be zero-shot).
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
from torch.utils.data import DataLoader, Dataset

from common.cli import MedvlArgumentParser, base_parser, config_text, parse_args, require
from common.engine import add_train_args, check_run_setup, config_from_args, fit
from common.errors import ConfigError, DataError, cli_entry
from common.run_guard import guard_command
from common.runs import load_run, model_record, save_run_model
from common.splits import load_split_csv, split_csv_text
from common.text_encoders import weights_pooling
from mavl_chexpert.data import (
    Preprocessing,
    check_trainable,
    find_root,
    label_key,
    load_table,
)
from mavl_chexpert.model import (
    AGGREGATIONS,
    ASPECT_COMBINES,
    FUSIONS,
    SIMILARITIES,
    AspectAttentionFusion,
    FusionModel,
    build_image_model,
)
from mavl_chexpert.shared import (
    add_data_root_arg,
    add_descriptions_arg,
    add_dropout_arg,
    add_holdout_classes_arg,
    add_skip_bad_arg,
    add_text_encoder_arg,
    add_threshold_rule_arg,
    choose_thresholds,
    data_record,
    hide_holdout,
    masked_bce,
    parse_holdout,
    split_metrics,
)
from mavl_chexpert.text import (
    add_text_pooling_arg,
    descriptions_hash,
    embed_descriptions,
    load_descriptions,
    write_cache,
)

log = logging.getLogger("medvl.mavl_chexpert")

LOSSES = ("bce", "contrastive")
CONTRASTIVE_TEMPERATURE = 0.2


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root_arg(parser, help="the CheXpert-v1.0-small folder (default: the image run's)")
    parser.add_argument("--image-run", type=Path, default=None, help="run directory of mavl_chexpert.train_image")
    add_skip_bad_arg(parser)
    text = parser.add_argument_group("text")
    add_text_encoder_arg(text)
    add_descriptions_arg(text)
    add_text_pooling_arg(text)
    model = parser.add_argument_group("fusion")
    model.add_argument("--aggregation", choices=AGGREGATIONS, default="mean",
                       help="combine a disease's aspect similarities by their mean or by attention")
    model.add_argument("--similarity", choices=SIMILARITIES, default="scaled",
                       help="scaled: learnable temperature and bias; seed: the raw cosine")
    model.add_argument("--loss", choices=LOSSES, default="bce",
                       help="bce: per-class binary cross-entropy; contrastive: image-description contrastive loss")
    add_dropout_arg(model, default=0.3, help="dropout on the fused features")
    model.add_argument("--finetune-backbone", action="store_true", help="train the phase-1 model too")
    add_holdout_classes_arg(model, default=None,
                            help="the image run's held-out diseases (default: the same); they reach no loss and are "
                                 "scored from their descriptions alone")
    model.add_argument("--fusion", choices=FUSIONS, default="similarity",
                       help="similarity: cosine of the r-d image embedding with each aspect sentence; mavl: aspect "
                            "queries cross-attend over the patch tokens, one shared head per disease")
    model.add_argument("--aspect-combine", choices=ASPECT_COMBINES, default="concat",
                       help="--fusion mavl: concat (MAVL's head over a disease's concatenated aspect outputs) or "
                            "all (one detector per aspect sentence, shared; the disease's logit is the mean "
                            "log-probability that each aspect it states is shown: unseen combinations of seen "
                            "aspects are scored through their parts) or shared (all over the sentences that "
                            "describe more than one disease: one disease's own sentence cannot transfer)")
    add_threshold_rule_arg(parser)
    add_train_args(parser, epochs=60, batch_size=64, lr=5e-4, weight_decay=1e-4, monitor="val_auroc_macro",
                   mode="max")
    return parser


class EmbeddingDataset(Dataset):
    """Frozen phase-1 embeddings with targets and masks (what phase 3 trains on when the backbone is frozen)."""

    def __init__(self, embeddings: torch.Tensor, targets: np.ndarray, mask: np.ndarray, key: str = "embedding"):
        self.embeddings, self.targets, self.mask = embeddings, torch.from_numpy(targets), torch.from_numpy(mask)
        self.key = key

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.key: self.embeddings[i].float(), "target": self.targets[i], "mask": self.mask[i]}


def _logits(model, batch) -> torch.Tensor:
    if "embedding" in batch:
        return model(embedding=batch["embedding"])
    if "tokens" in batch:
        return model(tokens=batch["tokens"])
    return model(batch["image"])


class FusionTask:
    """BCE (or the seed's contrastive loss) over the trained diseases; selection on their val macro AUROC."""

    def __init__(self, meta: dict, labels: tuple[str, ...], trained: np.ndarray, val_targets: np.ndarray,
                 val_mask: np.ndarray, loss: str, threshold_rule: str):
        self.meta, self.labels, self.loss, self.threshold_rule = meta, labels, loss, threshold_rule
        self.trained = torch.from_numpy(trained)
        self.val_targets, self.val_mask = val_targets, val_mask
        self.seen = [n for n, t in zip(labels, trained) if t]
        self.metric_names = ("auroc_macro", "f1_macro", "loss", *(f"auroc_{label_key(n)}" for n in self.seen))
        self.last_probs: np.ndarray | None = None

    def training_loss(self, model, batch) -> torch.Tensor:
        logits = _logits(model, batch)
        trained = self.trained.to(logits.device)
        if self.loss == "bce":
            return masked_bce(logits, batch["target"], batch["mask"], trained)
        positives = batch["target"].bool() & batch["mask"] & trained.unsqueeze(0)
        has_positive = positives.any(1)
        if not has_positive.any():
            return logits.sum() * 0.0
        weights = positives[has_positive].float()
        choice = torch.multinomial(weights.cpu(), 1).squeeze(1).to(logits.device)
        scaled = logits[has_positive].float().masked_fill(~trained.unsqueeze(0), float("-inf"))
        return F.cross_entropy(scaled / CONTRASTIVE_TEMPERATURE, choice)

    def validate(self, model, loader, device) -> dict[str, float]:
        logits = torch.cat([_logits(model, batch).float().cpu() for batch in loader])
        probs = torch.sigmoid(logits / (CONTRASTIVE_TEMPERATURE if self.loss == "contrastive" else 1.0)).numpy()
        self.last_probs = probs
        seen = self.trained.numpy()
        metrics = split_metrics(self.val_targets[:, seen], probs[:, seen], self.val_mask[:, seen],
                                tuple(self.seen), 0.5)
        metrics["loss"] = masked_bce(logits, torch.from_numpy(self.val_targets), torch.from_numpy(self.val_mask),
                                     self.trained).item()
        return metrics

    def save_best(self, model, metrics, directory: Path) -> None:
        seen = self.trained.numpy()
        thresholds = choose_thresholds(self.val_targets[:, seen], self.last_probs[:, seen], self.val_mask[:, seen],
                                       tuple(self.seen), self.threshold_rule)
        # A held-out disease has no validation labels to tune on: 0.5, and only its AUROC is reported.
        thresholds.update({label_key(n): 0.5 for n, t in zip(self.labels, seen) if not t})
        record = model_record(**self.meta, thresholds=thresholds, val_metrics=metrics,
                              threshold_rule=self.threshold_rule)
        save_run_model(directory, model, record)


@torch.no_grad()
def embed_images(image_model, images: np.ndarray, device: torch.device, batch_size: int = 128,
                 preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """Phase-1 embeddings (eval mode, no augmentation) of uint8 images, on the CPU, normalised as phase 1 was."""
    image_model.eval().to(device)
    dataset = (preprocessing or Preprocessing(int(images.shape[-1]))).dataset(images)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return torch.cat([image_model.embed(batch["image"].to(device)).float().cpu() for batch in loader])


@torch.no_grad()
def patch_tokens(image_model, images: np.ndarray, device: torch.device, batch_size: int = 128,
                 preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """Phase-1 patch tokens (eval mode, no augmentation) of uint8 images, on the CPU in half precision."""
    image_model.eval().to(device)
    dataset = (preprocessing or Preprocessing(int(images.shape[-1]))).dataset(images)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return torch.cat([image_model.patch_tokens(batch["image"].to(device)).half().cpu() for batch in loader])


def resolve_holdout(spec: str | None, labels: tuple[str, ...], image_holdout: list[str]) -> np.ndarray:
    """The trained mask: the image run's held-out diseases, which ``spec`` (when given) must name exactly."""
    image_trained = np.array([n not in image_holdout for n in labels])
    if spec is None:
        return image_trained
    trained = parse_holdout(spec, labels)
    seen_by_phase1 = [n for n, t, t1 in zip(labels, trained, image_trained) if not t and t1]
    if seen_by_phase1:
        raise ConfigError("--holdout-classes", f"{', '.join(seen_by_phase1)} trained phase 1 (--image-run), so it "
                                               "cannot be zero-shot here; hold it out in train_image too")
    missing = [n for n, t, t1 in zip(labels, trained, image_trained) if t and not t1]
    if missing:
        raise ConfigError("--holdout-classes", f"the image run held out {', '.join(missing)}; the fusion must "
                                               "hold it out as well (leave the flag out to inherit)")
    return trained


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "image_run", "cache_dir", "descriptions"),
                  lock="output_dir", create=True)
    require(args, output_dir="where the run is written", image_run="the run directory of mavl_chexpert.train_image")
    if args.aspect_combine != "concat" and args.fusion != "mavl":
        raise ConfigError("--aspect-combine", f"{args.aspect_combine} combines MAVL's aspect outputs; it needs "
                                              f"--fusion mavl, not {args.fusion}")
    device = check_run_setup(config_from_args(args), args.output_dir)
    image_run = load_run(args.image_run, "mavl_chexpert", lambda m: build_image_model(**m["kwargs"]), stage="image")
    meta_in = image_run.meta
    settings = dict(meta_in["data"])
    labels = tuple(settings.get("labels") or meta_in["labels"])
    trained = resolve_holdout(args.holdout_classes, labels, list(meta_in.get("holdout_classes") or []))
    root = find_root(args.data_root or Path(settings["root"]))
    sentences = load_descriptions(args.descriptions, labels)
    split = load_split_csv(Path(args.image_run) / "split.csv")
    table = load_table(root, "train.csv", labels, settings["uncertain"], settings["views"])
    where = dict(zip(split["id"], split["split"]))
    in_split = np.array([p in where for p in table.rel_paths])
    if not in_split.any():
        raise DataError(Path(args.image_run) / "split.csv", f"names none of the images of {table.csv}")
    table = hide_holdout(table.take(np.flatnonzero(in_split)), trained)
    assignments = np.array([where[p] for p in table.rel_paths])
    preprocessing = Preprocessing.from_record(meta_in["preprocessing"])
    images, kept = preprocessing.decode(table, args.skip_bad)
    table, assignments = table.take(kept), assignments[kept]
    train_idx, val_idx = np.flatnonzero(assignments == "train"), np.flatnonzero(assignments == "val")
    check_trainable(table.take(train_idx), settings["uncertain"], "train-split ", trained)

    aspects, aspect_mask, reused = embed_descriptions(sentences, args.text_encoder,
                                                      args.output_dir if args.resume else None, args.cache_dir,
                                                      write=False, pooling=args.text_pooling)
    torch.manual_seed(args.seed)
    if args.fusion == "mavl":
        model = AspectAttentionFusion(image_run.model, aspects, aspect_mask, dropout=args.dropout,
                                      freeze_image=not args.finetune_backbone, combine=args.aspect_combine)
    else:
        model = FusionModel(image_run.model, aspects, aspect_mask, aggregation=args.aggregation,
                            similarity=args.similarity, dropout=args.dropout, freeze_image=not args.finetune_backbone)
    if args.finetune_backbone:
        train_set = preprocessing.dataset(images[train_idx], table.targets[train_idx], table.mask[train_idx],
                                          augment=True)
        val_set = preprocessing.dataset(images[val_idx], table.targets[val_idx], table.mask[val_idx])
    else:
        key = "tokens" if args.fusion == "mavl" else "embedding"
        cache = patch_tokens if args.fusion == "mavl" else embed_images
        cached = cache(image_run.model, images, device, preprocessing=preprocessing)
        train_set = EmbeddingDataset(cached[train_idx], table.targets[train_idx], table.mask[train_idx], key)
        val_set = EmbeddingDataset(cached[val_idx], table.targets[val_idx], table.mask[val_idx], key)
    text_record = {"encoder": args.text_encoder, "descriptions_sha256": descriptions_hash(sentences),
                   "pooling": weights_pooling(args.text_encoder, args.text_pooling),
                   "sentences": {label_key(k): len(v) for k, v in sentences.items()}}
    holdout = [n for n, t in zip(labels, trained) if not t]
    meta = {"pipeline": "mavl_chexpert", "stage": "fusion", "preset": meta_in["preset"],
            "kwargs": {"image": meta_in["kwargs"], "aspects_shape": list(aspects.shape), "fusion": args.fusion,
                       "aspect_combine": args.aspect_combine,
                       "aggregation": args.aggregation, "similarity": args.similarity, "dropout": args.dropout,
                       "freeze_image": not args.finetune_backbone},
            "labels": list(labels), "preprocessing": meta_in["preprocessing"],
            "data": {**settings, "root": str(root.resolve())}, "monitor": args.monitor,
            "image_run": str(Path(args.image_run).resolve()), "text": text_record, "holdout_classes": holdout,
            "loss": args.loss, "lrf": meta_in.get("lrf")}
    task = FusionTask(meta, labels, trained, table.targets[val_idx], table.mask[val_idx], args.loss,
                      args.threshold_rule)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    run_files = {"config.yaml": config_text(args),
                 "split.csv": split_csv_text(table.rel_paths, table.patients, assignments),
                 "data.json": data_record(root.resolve(), table, assignments, settings),
                 "text.json": json.dumps(text_record, indent=2, sort_keys=True) + "\n"}
    result = fit(model, optimizer, train_set, val_set, task, config_from_args(args), args.output_dir,
                 run_files=run_files)
    if not reused:
        write_cache(args.output_dir, aspects, aspect_mask, args.text_encoder, sentences, args.text_pooling)
    print(result.summary(args.monitor, args.output_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
