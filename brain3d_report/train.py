"""Train the 3D brain MRI report model in three stages, each a run of the one training loop.

Example (CPU, phantom, the offline twins; each stage's schedule is in its config file):
    python -m common.phantoms brain --out data/brain_phantom
    python -m brain3d_report.train --config configs/brain3d_report/twin.contrastive.yaml \\
        --data-root data/brain_phantom --output-dir runs/brain/r1
    python -m brain3d_report.train --config configs/brain3d_report/twin.warmup.yaml \\
        --data-root data/brain_phantom --init runs/brain/r1 --output-dir runs/brain/r2
    python -m brain3d_report.train --config configs/brain3d_report/twin.lora.yaml \\
        --data-root data/brain_phantom --init runs/brain/r2 --output-dir runs/brain/r3

Every setting is a flag with one default (the seed's where it has one; the schedule's are the seed's contrastive
stage), whatever the models and the stage are; a run records them in ``model.json``. A stage's schedule is a recipe:
the twins' in ``configs/brain3d_report/twin.<stage>.yaml``, the seed's (MedSigLIP and MedGemma) in
``configs/brain3d_report/medgemma.<stage>.yaml``; pass one with ``--config``.

1. ``contrastive``: symmetric InfoNCE between the pooled visual tokens and the frozen text embedding of each report
   (``--text-embedding lm``: the mean of the LM's last hidden states, as the seed; or a text-encoder preset), with a
   learnable temperature. A FIFO queue of past text embeddings (``--queue-size``) adds negatives, so the loss is not
   identically zero at batch size 1, where the seed's stage learned nothing; reports equal to the sample's own
   (templated healthy controls) are masked out of its negatives.
2. ``warmup``: the projector (and compressor) learn to caption with the LM frozen; loss on the report tokens only.
3. ``lora``: LoRA adapters (peft, r 4, alpha 8, on q/k/v/o) plus the projector, early stopping on validation loss.

Stages 2 and 3 start from the best model of ``--init`` and keep its split (``split.csv``) and model settings. A run
saves what it trained: the frozen LM is rebuilt from its source when the run is loaded, so a stage-3 checkpoint holds
the vision encoder, compressor, projector and adapters, not the 4-billion-parameter LM.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from brain3d_report.data import (
    HEALTHY_TEMPLATES,
    MIRRORED,
    PERCENTILES,
    Cases,
    LeftRightMirror,
    MirroredPairs,
    mirror_report,
    mirror_volumes,
    save_split,
    split_volumes,
)
from brain3d_report.model import (
    COMPRESSORS,
    INFLATIONS,
    INPUT_RANGES,
    LM_KINDS,
    LM_PRESETS,
    POS_EMBS,
    STAGES,
    VISION_PRESETS,
    VISION_TRAINABLES,
    Brain3DReportModel,
    build_model,
    check_volume_fits,
    model_from_config,
    trainable_parameters,
)
from brain3d_report.shared import add_data_args, add_volume_cache_arg, cases_from_args
from common.cli import (
    MedvlArgumentParser,
    base_parser,
    config_text,
    nonnegative_float,
    nonnegative_int,
    parse_args,
    positive_float,
    positive_int,
    require,
)
from common.device_data import TensorData
from common.engine import add_train_args, check_run_setup, config_from_args, fit
from common.errors import ConfigError, DataError, cli_entry
from common.feature_cache import default_cache_root
from common.metrics.clinical import keyword_spans
from common.presets import get_preset
from common.run_guard import guard_command, path_values
from common.runs import load_run, model_record, read_run_record, save_run_model
from common.text_encoders import text_presets

log = logging.getLogger("medvl.brain3d_report")

PIPELINE = "brain3d_report"
PROMPT = "Generate a radiology report for this brain MRI FLAIR scan. \n"
"""The seed's prompt (no chat template), kept so that numbers compare with its paper."""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FLIP_MODES = ("both", "random", "pairs", "off")
SEED_PATCH_LR_SCALE = 0.2
"""``--train-vision seed``: the seed's stage 1 trains its 3D patch embedding at 0.2 x the learning rate."""


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True, quantization=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, default=None, help="contrastive, warmup or lora")
    parser.add_argument("--init", type=Path, default=None,
                        help="run whose best model this stage starts from (warmup: a contrastive run; lora: a warmup "
                             "run); its split and model settings are kept")
    add_data_args(parser)
    add_volume_cache_arg(parser)
    model = parser.add_argument_group("model (a new contrastive run; later stages take them from --init)")
    model.add_argument("--vision", default="medsiglip-448", help=f"vision tower: {', '.join(VISION_PRESETS)}")
    model.add_argument("--lm", default="medgemma-4b", help=f"language model: {', '.join(LM_PRESETS)}")
    model.add_argument("--depth-patch", type=positive_int, default=2,
                       help="slices per 3D patch (the 2D patch inflated over this depth)")
    model.add_argument("--inflation", choices=INFLATIONS, default="centre",
                       help="2D patch weights into 3D: centre (the middle slice holds them, others zero) or mean "
                            "(spread evenly over the depth)")
    model.add_argument("--pos-emb", choices=POS_EMBS, default="pretrained+depth",
                       help="position embedding: the 2D one plus a learned depth term, or the seed's")
    model.add_argument("--compressor", choices=COMPRESSORS, default="perceiver",
                       help="how the volume's tokens become the LM's visual tokens: a Perceiver or pooling")
    model.add_argument("--perceiver-layers", type=positive_int, default=2,
                       help="cross-attention layers of the Perceiver")
    model.add_argument("--latents", type=positive_int, default=32,
                       help="visual tokens handed to the LM (the Perceiver's latents)")
    model.add_argument("--input-range", choices=INPUT_RANGES, default="processor",
                       help="processor: normalise the [0, 1] volumes as the vision tower's 2D image processor does "
                            "(SigLIP, MedSigLIP: mean 0.5, std 0.5, i.e. [-1, 1]); unit: feed [0, 1] (the seed's)")
    stage = parser.add_argument_group("stages")
    stage.add_argument("--text-embedding", default="lm",
                       help=f"contrastive targets: lm (the seed's: the mean of the LM's last hidden states) or a text "
                            f"encoder preset ({', '.join(text_presets())}); a random LM twin's states mean nothing, "
                            "so the twin's config uses minilm")
    stage.add_argument("--text-whiten", type=nonnegative_int, default=0,
                       help="PCA-whiten the centred report embeddings onto this many components fitted on the training "
                            "reports (0, the default: centring only)")
    stage.add_argument("--keyword-weight", type=positive_float, default=1.0,
                       help="warmup and lora: weight of the clinical words' tokens (side, lobe, findings, negation) "
                            "in the caption loss; 1, the default, is the seed's plain cross-entropy")
    stage.add_argument("--flip-augment", choices=FLIP_MODES, default="off",
                       help="left-right mirroring of the training cases, 'left' and 'right' swapped in the report: "
                            "both (every epoch sees each case as written and mirrored), random (each case mirrored "
                            "with probability 0.5 per epoch), pairs (each batch of B cases also holds their B "
                            "mirrored copies: in the contrastive stage a case's own mirror image is one of its "
                            "negatives), off (the default, the seed's: no augmentation)")
    stage.add_argument("--queue-size", type=int, default=64,
                       help="past text embeddings kept as extra negatives (0: in-batch negatives only)")
    stage.add_argument("--train-vision", choices=VISION_TRAINABLES, default="all",
                       help="contrastive: train the whole vision encoder (all), only its tubelet and position "
                            "embeddings (embeddings), or the seed's choice (seed: only the tubelet embedding, at "
                            f"{SEED_PATCH_LR_SCALE} x --lr, beside the contrastive heads at --lr)")
    stage.add_argument("--lr-projector", type=positive_float, default=None,
                       help="warmup and lora: learning rate of the projector (default --lr; the seed's lora stage "
                            "used 2e-4 here and 5e-5 for the adapters)")
    stage.add_argument("--lr-lora", type=positive_float, default=None,
                       help="lora: learning rate of the LoRA adapters (default --lr)")
    stage.add_argument("--max-text-len", type=positive_int, default=128, help="report tokens kept (the seed's 128)")
    stage.add_argument("--lora-r", type=positive_int, default=4, help="rank of the LoRA adapters (stage 3)")
    stage.add_argument("--lora-alpha", type=positive_int, default=8,
                       help="LoRA scaling numerator (the update is scaled by alpha / r)")
    stage.add_argument("--lora-dropout", type=nonnegative_float, default=0.05,
                       help="dropout on the LoRA adapters' input")
    stage.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                       help="recompute activations in the backward pass: the vision encoder's layers in the "
                            "contrastive stage (the only one that trains it), the LM's in the others (auto: on "
                            "CUDA, off on CPU)")
    # The schedule's defaults are the seed's contrastive stage (batch 4 instead of its 1, which leaves InfoNCE without
    # negatives); the warm-up's and LoRA's are recipes: configs/brain3d_report/<models>.<stage>.yaml.
    add_train_args(parser, epochs=8, batch_size=4, lr=5e-4, weight_decay=0.01, monitor="val_loss", mode="min")
    return parser


def init_vision(args: argparse.Namespace) -> tuple[str, int]:
    """(vision tower, depth patch) of the run being built: the flags for a new contrastive run, the ``--init`` run's
    ``model.json`` for the later stages (the flags when it cannot be read: loading the run later names the
    problem)."""
    if args.init is not None:
        try:
            config = read_run_record(Path(args.init), PIPELINE)[0]["kwargs"]["model"]
            return str(config["vision"]), int(config["depth_patch"])
        except (ValueError, KeyError, TypeError, DataError):
            pass
    return args.vision, args.depth_patch


def use_gradient_checkpointing(choice: str, device: torch.device) -> bool:
    """``--gradient-checkpointing``: on, off, or auto (on CUDA, where memory is what limits the batch)."""
    return choice == "on" or (choice == "auto" and torch.device(device).type == "cuda")


def apply_gradient_checkpointing(model: Brain3DReportModel, stage: str, choice: str, device: torch.device) -> bool:
    """Turn on gradient checkpointing where the stage backpropagates through many activations: the vision encoder's
    layers in the contrastive stage (thousands of tokens per volume: about 176 MiB saved per layer per volume at
    64 x 126 x 126 for the so400m tower), the LM's layers in the warm-up and LoRA stages (the encoder is frozen
    there and encoded once). Returns whether it is on."""
    if not use_gradient_checkpointing(choice, device):
        return False
    if stage == "contrastive":
        model.vision.gradient_checkpointing = True
    else:
        model.gradient_checkpointing_enable()
    return True


def optimizer_groups(trainable: dict[str, torch.nn.Parameter], args: argparse.Namespace) -> list[dict]:
    """AdamW parameter groups with the learning rates the flags ask for: ``--lr-projector`` for the projector,
    ``--lr-lora`` for the LoRA adapters (each --lr when not given), and with ``--train-vision seed`` the tubelet
    embedding at ``SEED_PATCH_LR_SCALE`` x --lr, as the seed's stage 1. Every other parameter gets --lr."""
    def rate(name: str) -> float:
        if name.startswith("projector.") and getattr(args, "lr_projector", None) is not None:
            return float(args.lr_projector)
        if "lora_" in name and getattr(args, "lr_lora", None) is not None:
            return float(args.lr_lora)
        if getattr(args, "train_vision", "all") == "seed" and name.startswith("vision.patch_embed."):
            return float(args.lr) * SEED_PATCH_LR_SCALE
        return float(args.lr)

    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in trainable.items():
        groups.setdefault(rate(name), []).append(param)
    return [{"params": params, "lr": lr} for lr, params in groups.items()]


def held_out_reports(cases: Cases) -> list[str]:
    """The run's validation and test reports: text no language pre-training of its LM may hold."""
    return [c.report for name in ("val", "test") for c in cases.split(name)]


def check_pretraining_corpus(model_config: dict, cases: Cases) -> None:
    """Refuse a run whose LM was language-pre-trained (when its preset was built) on text holding one of the run's
    validation or test reports: its numbers would not be held out. The preset declares its corpus
    (``options["pretraining_corpus"]``) and the build leaves the run's held-out reports out of it; this checks that
    the LM's record (``lm_pretrain``) is of that corpus. Healthy templates, the same for every control, stay."""
    lm, record = model_config["lm"], model_config.get("lm_pretrain")
    corpus = get_preset(lm, LM_KINDS, "--lm").options.get("pretraining_corpus") if lm in LM_PRESETS else None
    if corpus is None or not record or "corpus_sha256" not in record:
        return
    from brain3d_report.lm_twin import corpus_digest, corpus_overlap

    held_out = held_out_reports(cases)
    left_out = set(held_out) - set(HEALTHY_TEMPLATES)
    used = [text for text in corpus() if text not in left_out]
    if corpus_overlap(held_out, used) or record["corpus_sha256"] != corpus_digest(used):
        raise DataError("--lm", f"{lm} was language-pre-trained on a corpus that is not its own less this run's "
                                f"{len(held_out)} validation and test reports; start from a contrastive run of this "
                                "split")


def text_key(text: str) -> int:
    """A stable 63-bit id of a report (equal reports share it): masks a sample's own report out of its negatives."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class VolumeSet(Dataset):
    """Preprocessed volumes (or their frozen encodings) held in memory with per-case tensors (text embedding or token
    ids) by index."""

    def __init__(self, volumes: torch.Tensor, **fields: torch.Tensor):
        self.volumes, self.fields = volumes, fields

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"volume": self.volumes[i], **{k: v[i] for k, v in self.fields.items()}}


def stage_dataset(inputs: torch.Tensor, fields: dict[str, torch.Tensor], flip: str = "off",
                  mirrored: torch.Tensor | None = None) -> Dataset:
    """A split's model inputs (volumes, or their frozen encodings) with each case's text fields (text embedding and
    key, or report tokens).

    With ``flip`` ``both`` or ``random``, ``mirrored`` holds the N mirrored inputs and every field 2N rows, the N
    mirrored reports after the N reports as written. ``both``: 2N samples, each case as written and mirrored.
    ``random``: N samples, each case mirrored with probability 0.5 each epoch (``LeftRightMirror``, through the
    training loop's batch augmentation). ``pairs``: N samples, each batch followed by its mirrored copies
    (``MirroredPairs``: batches of twice the size).
    """
    if flip == "off":
        return VolumeSet(inputs, **fields)
    n = len(inputs)
    if mirrored is None or len(mirrored) != n:
        raise ValueError(f"a mirrored split needs the {n} mirrored inputs")
    for name, value in fields.items():
        if len(value) != 2 * n:
            raise ValueError(f"{name}: {len(value)} rows for {n} cases; a mirrored split needs {2 * n}")
    if flip == "both":
        return VolumeSet(torch.cat([inputs, mirrored]), **fields)
    halves = {"volume": (inputs, mirrored), **{k: (v[:n], v[n:]) for k, v in fields.items()}}
    augment = MirroredPairs() if flip == "pairs" else LeftRightMirror(list(halves))
    return TensorData({**{k: v[0] for k, v in halves.items()}, **{MIRRORED + k: v[1] for k, v in halves.items()}},
                      batch_augment=augment)


@torch.no_grad()
def encode_frozen(model: Brain3DReportModel, volumes: torch.Tensor, device: torch.device,
                  batch_size: int = 4) -> torch.Tensor:
    """(N, latents, D_vision) compressed tokens of ``volumes``, on the CPU: the input of stages 2 and 3, whose
    vision encoder and compressor do not train. Encoding each volume once instead of at every step made the warm-up's
    20 epochs on CPU 2.5 times faster (254 -> 102 s; the encoder took 0.030 of the 0.044 s per sample). Kept in
    memory, not in ``common.feature_cache``: the encoder is this run's stage-1 model, so its features are too."""
    frozen = [*model.vision.parameters(), *model.compressor.parameters()]
    if any(p.requires_grad for p in frozen):
        raise ValueError("encode_frozen needs a frozen vision encoder and compressor")
    was_training = model.training
    model.eval()
    out = torch.cat([model.encode(volumes[i : i + batch_size].to(device)).cpu()
                     for i in range(0, len(volumes), batch_size)])
    model.train(was_training)
    return out


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor,
             queue: torch.Tensor | None = None, queue_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised (B, D) image and text embeddings; ``queue`` (Q, D) adds text negatives.

    Image -> text is a (B + Q)-way choice, text -> image a B-way one (past texts have no image here). Candidates
    whose report equals the sample's own (same key) are masked out, except the sample's own pair.
    """
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    candidates, candidate_keys = text, keys
    if queue is not None and len(queue):
        candidates = torch.cat([text, F.normalize(queue.float(), dim=-1)])
        candidate_keys = torch.cat([keys, queue_keys])
    logits = scale * image @ candidates.T
    same = keys[:, None] == candidate_keys[None, :]
    own = torch.zeros_like(same)
    own[:, : len(keys)] = torch.eye(len(keys), dtype=torch.bool, device=same.device)
    logits = logits.masked_fill(same & ~own, float("-inf"))
    target = torch.arange(len(image), device=image.device)
    loss = F.cross_entropy(logits, target)
    if len(image) > 1:
        back = (scale * text @ image.T).masked_fill((keys[:, None] == keys[None, :]) & ~own[:, : len(keys)],
                                                    float("-inf"))
        loss = (loss + F.cross_entropy(back, target)) / 2
    return loss


class ContrastiveTask:
    """Stage 1: InfoNCE with a queue of past text embeddings (saved with every checkpoint, so resume is exact)."""

    metric_names = ("loss", "recall_at_1", "alignment_margin")

    def __init__(self, meta: dict, queue_size: int, text_dim: int, momentum: float = 0.9):
        self.meta, self.queue_size, self.momentum = meta, queue_size, momentum
        self.queue = torch.zeros(0, text_dim)
        self.queue_keys = torch.zeros(0, dtype=torch.long)

    def training_loss(self, model: Brain3DReportModel, batch) -> torch.Tensor:
        core = getattr(model, "module", model)  # the model itself under DDP, for its buffers
        texts = batch["text"]
        if len(self.queue):
            texts = torch.cat([texts, self.queue.to(texts.device, texts.dtype)])
        pooled, projected, scale = model(batch["volume"], text=texts)
        with torch.no_grad():  # EMA of the pooled vectors; the first batch sets it
            batch_mean = pooled.detach().float().mean(0).to(core.image_center.dtype)
            fresh = not bool(core.image_center.any())
            core.image_center.copy_(batch_mean if fresh else
                                    self.momentum * core.image_center + (1 - self.momentum) * batch_mean)
        image = pooled - core.image_center.to(pooled.dtype)
        size = len(batch["text"])
        queue = projected[size:] if len(self.queue) else None
        loss = info_nce(image, projected[:size], scale, batch["key"], queue, self.queue_keys.to(batch["key"].device))
        if self.queue_size:
            with torch.no_grad():
                self.queue = torch.cat([batch["text"].detach().float().cpu(), self.queue])[: self.queue_size]
                self.queue_keys = torch.cat([batch["key"].cpu(), self.queue_keys])[: self.queue_size]
        return loss

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {"queue": self.queue.contiguous(), "queue_keys": self.queue_keys.contiguous()}

    def load_task_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.queue, self.queue_keys = tensors["queue"], tensors["queue_keys"]

    @torch.no_grad()
    def validate(self, model: Brain3DReportModel, loader, device) -> dict[str, float]:
        images, texts, keys = [], [], []
        core = getattr(model, "module", model)
        for batch in loader:
            pooled, projected, scale = model(batch["volume"], text=batch["text"])
            images.append((pooled - core.image_center).float())
            texts.append(projected.float())
            keys.append(batch["key"])
        image, text, key = torch.cat(images), torch.cat(texts), torch.cat(keys)
        loss = info_nce(image, text, scale, key).item()
        sims = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        hit = (key[sims.argmax(1)] == key).float().mean().item()
        # Mean similarity of each volume to its own report minus to the others: > 0 once the two spaces align.
        off = (sims.sum() - sims.diag().sum()) / max(1, sims.numel() - len(sims))
        return {"loss": loss, "recall_at_1": hit, "alignment_margin": (sims.diag().mean() - off).item()}

    def save_best(self, model, metrics, directory: Path) -> None:
        save_run_model(directory, model, model_record(**self.meta, thresholds={}, val_metrics=metrics))


class CaptionTask:
    """Stages 2 and 3: next-token loss on the report tokens after [32 visual tokens; prompt], the tokens of the
    report's clinical words (``batch["keyword"]``) weighted ``keyword_weight`` times. Validation reports the plain
    loss (the seed's, monitored by default) and ``keyword_loss``, the mean over the clinical words' tokens alone."""

    metric_names = ("loss", "keyword_loss")

    def __init__(self, meta: dict, prompt_ids: torch.Tensor, keyword_weight: float = 1.0):
        self.meta, self.prompt_ids, self.keyword_weight = meta, prompt_ids, float(keyword_weight)

    def _prompt(self, batch) -> torch.Tensor:
        return self.prompt_ids.to(batch["target"].device).expand(len(batch["target"]), -1)

    def training_loss(self, model, batch) -> torch.Tensor:
        weight = None
        if self.keyword_weight != 1.0:
            weight = 1.0 + (self.keyword_weight - 1.0) * batch["keyword"].float()
        return model(batch["volume"], prompt_ids=self._prompt(batch), target_ids=batch["target"],
                     target_mask=batch["target_mask"], target_weight=weight)

    @torch.no_grad()
    def validate(self, model, loader, device) -> dict[str, float]:
        total, count, keyword_total, keyword_count = 0.0, 0.0, 0.0, 0.0
        for batch in loader:
            losses = model.caption_token_losses(batch["volume"], self._prompt(batch), batch["target"],
                                                batch["target_mask"])
            mask, keyword = batch["target_mask"].to(losses.dtype), batch["keyword"].to(losses.dtype)
            total += float((losses * mask).sum())
            count += float(mask.sum())
            keyword_total += float((losses * keyword).sum())
            keyword_count += float(keyword.sum())
        # NaN, not 0, when no token was marked (a tokenizer without offsets): a missing value, not a perfect one.
        keyword_loss = keyword_total / keyword_count if keyword_count else float("nan")
        return {"loss": total / max(count, 1), "keyword_loss": keyword_loss}

    def save_best(self, model, metrics, directory: Path) -> None:
        save_run_model(directory, model, model_record(**self.meta, thresholds={}, val_metrics=metrics))


def report_tokens(tokenizer, reports: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, L) report ids ending in EOS (kept when a report is cut at ``max_len``) and their mask."""
    rows = []
    for text in reports:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_len - 1]
        rows.append([*ids, tokenizer.eos_token_id])
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def prompt_tokens(tokenizer) -> torch.Tensor:
    """(1, P) prompt ids: BOS + the seed's prompt."""
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return torch.tensor([bos + ids], dtype=torch.long)


@torch.no_grad()
def text_embeddings(model: Brain3DReportModel, reports: list[str], choice: str, max_len: int,
                    device: torch.device, cache_dir: Path | None) -> torch.Tensor:
    """(N, Dt) frozen embeddings of each report: the LM's mean hidden state, or a text encoder's pooled output."""
    if choice == "lm":
        ids, mask = report_tokens(model.tokenizer, reports, max_len)
        lm_device = model.lm.get_input_embeddings().weight.device
        out = [model.text_embedding(ids[i : i + 8].to(lm_device), mask[i : i + 8].to(lm_device)).float().cpu()
               for i in range(0, len(ids), 8)]
        return torch.cat(out)
    from common.text_encoders import load_text_encoder

    encoder = load_text_encoder(choice, cache_dir=cache_dir, device=device)
    return encoder.encode(reports).float().cpu()


def keyword_token_mask(tokenizer, reports: list[str], max_len: int) -> torch.Tensor:
    """(N, L) booleans aligned with ``report_tokens``: True on the tokens that overlap a clinical word of the report
    (``common.metrics.clinical.keyword_spans``); False on the others, on EOS and on padding."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("--keyword-weight", "needs a fast tokenizer (token offsets); pass 1")
    rows = []
    for text in reports:
        spans = keyword_spans(text)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        rows.append([any(start < span_end and end > span_start for span_start, span_end in spans)
                     for start, end in offsets[: max_len - 1]] + [False])
    mask = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.bool)
    for i, row in enumerate(rows):
        mask[i, : len(row)] = torch.tensor(row)
    return mask


def text_dim_for(choice: str, cache_dir: Path | None) -> int | None:
    if choice == "lm":
        return None
    if choice not in text_presets():
        raise ConfigError("--text-embedding", f"choose lm or one of {', '.join(text_presets())}, not {choice!r}")
    from common.text_encoders import load_text_encoder

    return int(load_text_encoder(choice, cache_dir=cache_dir).dim)


def add_lora(model: Brain3DReportModel, rank: int, alpha: int, dropout: float, seed: int = 0) -> Brain3DReportModel:
    """LoRA adapters (peft) on the LM's attention q/k/v/o projections; the base weights stay frozen. The adapters'
    random initialisation draws from ``seed``, not from whatever the process drew before (two runs of the same
    command in one process, or a run and its ``--resume``, start from the same adapters)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS),
                        bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.lm = inject_adapter_in_model(config, model.lm)
    return model


def build_run_model(meta: dict, device: str | torch.device = "cpu", cache_dir: Path | None = None
                    ) -> Brain3DReportModel:
    """Rebuild a run's model from ``model.json`` (with its LoRA adapters when the run had them)."""
    model = model_from_config(meta["kwargs"]["model"], device=device, cache_dir=cache_dir)
    lora = meta["kwargs"].get("lora")
    if lora:
        add_lora(model, lora["r"], lora["alpha"], lora["dropout"])
    return model


def model_builder(device: str | torch.device = "cpu", cache_dir: Path | None = None
                  ) -> Callable[[dict], Brain3DReportModel]:
    """``build_run_model`` on ``device`` with ``cache_dir``: the builder handed to ``common.runs.load_run`` (the LM
    rebuilt from its source, then the run's weights loaded into it)."""
    return functools.partial(build_run_model, device=device, cache_dir=cache_dir)


def _cases(args: argparse.Namespace) -> Cases:
    if args.init is not None:
        split_csv = Path(args.init) / "split.csv"
        if not split_csv.is_file():
            raise DataError(split_csv, "the --init run has no split.csv (is it a brain3d_report run?)")
        args.split = str(split_csv)
    return cases_from_args(args)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "healthy_root", "volume_cache", "cache_dir",
                  "init"), lock="output_dir", create=True, extra_reads=path_values(args, "split", "reports"))
    require(args, stage="contrastive, warmup or lora", output_dir="where the run is written",
            data_root="the folder of case folders")
    if args.stage != "contrastive":
        require(args, init=f"the run the {args.stage} stage starts from")
    check_volume_fits(args.volume_size, *init_vision(args), cache_dir=args.cache_dir)  # before any model loads
    if args.queue_size < 0:
        raise ConfigError("--queue-size", f"must be 0 or more, not {args.queue_size}")
    config = config_from_args(args)
    device = check_run_setup(config, args.output_dir)
    cache_root = args.volume_cache or default_cache_root(args.cache_dir, "volumes")
    cases = _cases(args)  # headers, reports and the split: refused before a model is built

    if args.init is None:
        if args.stage != "contrastive":
            raise ConfigError("--init", f"the {args.stage} stage starts from an earlier run")
        text_choice = args.text_embedding
        text_dim = text_dim_for(text_choice, args.cache_dir)
        model = build_model(args.vision, args.lm, depth_patch=args.depth_patch, inflation=args.inflation,
                            pos_emb=args.pos_emb, compressor=args.compressor, perceiver_layers=args.perceiver_layers,
                            latents=args.latents, text_dim=text_dim, text_whiten=args.text_whiten,
                            input_range=args.input_range, lm_exclude=held_out_reports(cases),
                            quantization=args.quantization, seed=args.seed,
                            device=device, precision=args.precision, cache_dir=args.cache_dir)
        lora = None
    else:
        loaded = load_run(args.init, PIPELINE, model_builder(device, args.cache_dir), device=device)
        model, init_meta = loaded.model, loaded.meta
        lora = init_meta["kwargs"].get("lora")
        text_choice = init_meta["kwargs"].get("text_embedding", "lm")
    model.vision.token_grid(args.volume_size)
    check_pretraining_corpus(model.model_config, cases)
    keyword_weight = args.keyword_weight
    inputs = split_volumes(cases, ("train", "val"), args.volume_size, cache_root, args.skip_bad)
    parts = {name: cases.split(name) for name in ("train", "val")}
    for name, part in parts.items():
        if not part:
            raise DataError(cases.source, f"the {name} split is empty ({len(cases)} cases, {len(cases.skipped)} "
                                          "skipped); use more data")
    if args.stage == "lora" and lora is None:
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
        add_lora(model, **{"rank": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"]}, seed=args.seed)
    trainable = trainable_parameters(model, args.stage, args.train_vision)
    apply_gradient_checkpointing(model, args.stage, args.gradient_checkpointing, device)
    log.info("stage %s: %d trainable parameters", args.stage, sum(p.numel() for p in trainable.values()))

    flip = args.flip_augment
    mirrored = mirror_volumes(inputs["train"]) if flip != "off" else None
    if args.stage != "contrastive":  # the encoder is frozen from here on: each volume is encoded once
        inputs = {name: encode_frozen(model, volumes, device) for name, volumes in inputs.items()}
        mirrored = encode_frozen(model, mirrored, device) if mirrored is not None else None
    if args.stage == "warmup" and args.init is not None:
        model.fit_token_whitening(inputs["train"])
    reports = {name: [c.report for c in part] for name, part in parts.items()}
    # With --flip-augment the training split's mirrored reports follow its own (2N texts, N volumes).
    texts = {name: reports[name] + ([mirror_report(t) for t in reports[name]] if flip != "off" and name == "train"
                                    else [])
             for name in parts}
    meta = {"pipeline": PIPELINE, "stage": args.stage, "preset": model.model_config["vision"],
            "kwargs": {"model": model.model_config, "lora": lora, "text_embedding": text_choice,
                       "flip_augment": flip, "keyword_weight": keyword_weight},
            "labels": [], "preprocessing": {"volume_size": list(args.volume_size), "percentiles": list(PERCENTILES),
                                            "orientation": "RAS", "prompt": PROMPT,
                                            "max_text_len": args.max_text_len},
            "data": {"root": str(Path(args.data_root).resolve()), "reports": args.reports, "split": args.split,
                     "healthy_root": str(Path(args.healthy_root).resolve()) if args.healthy_root else None,
                     "init": str(Path(args.init).resolve()) if args.init else None},
            "monitor": args.monitor}
    if args.stage == "contrastive":
        embedded = {name: text_embeddings(model, texts[name], text_choice, args.max_text_len, device,
                                          args.cache_dir) for name in parts}
        fields = {name: {"text": embedded[name], "key": torch.tensor([text_key(t) for t in texts[name]])}
                  for name in parts}
        if args.init is None:
            model.fit_text_centering(embedded["train"])
        task = ContrastiveTask(meta, args.queue_size, int(embedded["train"].shape[1]))
    else:
        ids = {name: report_tokens(model.tokenizer, texts[name], args.max_text_len) for name in parts}
        keyword = {name: keyword_token_mask(model.tokenizer, texts[name], args.max_text_len)
                   if getattr(model.tokenizer, "is_fast", False) or keyword_weight != 1.0
                   else torch.zeros_like(ids[name][1], dtype=torch.bool) for name in parts}
        fields = {name: {"target": ids[name][0], "target_mask": ids[name][1], "keyword": keyword[name]}
                  for name in parts}
        task = CaptionTask(meta, prompt_tokens(model.tokenizer), keyword_weight)
    datasets = {name: stage_dataset(inputs[name], fields[name], flip, mirrored) if name == "train"
                else stage_dataset(inputs[name], fields[name]) for name in parts}
    optimizer = torch.optim.AdamW(optimizer_groups(trainable, args), lr=args.lr, weight_decay=args.weight_decay)
    split_text = save_split_text(cases)
    run_files = {"config.yaml": config_text(args), "split.csv": split_text,
                 "data.json": json.dumps({"counts": cases.counts(), "skipped": cases.skipped}, indent=2,
                                         sort_keys=True) + "\n"}
    result = fit(model, optimizer, datasets["train"], datasets["val"], task, config, args.output_dir,
                 run_files=run_files)
    print(result.summary(args.monitor, args.output_dir))
    return 0


def save_split_text(cases: Cases) -> str:
    """The run's ``split.csv`` text (written by the loop with the other run files, atomically)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return save_split(cases, Path(tmp) / "split.csv").read_text()


__all__ = ["STAGES", "PROMPT", "info_nce", "ContrastiveTask", "CaptionTask", "report_tokens", "prompt_tokens",
           "text_embeddings", "add_lora", "build_run_model", "model_builder", "text_key", "keyword_token_mask",
           "check_pretraining_corpus", "FLIP_MODES"]


if __name__ == "__main__":
    raise SystemExit(main())
