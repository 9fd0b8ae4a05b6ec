"""What this pipeline's commands share (train, evaluate, submit, ablate): the data and encoder flags, cached
features, the tensor dataset. Every flag that more than one command takes is defined here once (``add_*_arg``), so
its name, type, choices and help agree across the commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.cli import positive_int, unit_interval
from common.feature_cache import CachedTensors, default_cache_root
from common.text_encoders import text_presets
from pathology_brats.caption_files import caption_tokens, pad_tokens
from pathology_brats.encoder import (
    DEFAULT_NORMALIZE,
    ENCODERS,
    NORMALIZATIONS,
    load_tile_encoder,
    run_preprocessing,
)
from pathology_brats.extract import DIHEDRAL, encode_tiles, pixel_tiles, view_cache
from pathology_brats.schema import SCHEMAS

ENCODER_MODES = ("frozen", "lora", "full")
TTA_CHOICES = (1, DIHEDRAL)


def default_feature_cache(cache_dir: Path | None) -> Path:
    return default_cache_root(cache_dir, "features")


def add_data_root_arg(parser, help: str = "ROOT/<CLS>/*.jpg (the labelled tiles)",
                      required: bool = False) -> None:
    parser.add_argument("--data-root", type=Path, default=None, required=required, help=help)


def add_labels_csv_arg(parser) -> None:
    parser.add_argument("--labels-csv", type=Path, default=None,
                        help="CSV with 'Input Path, Ground-Truth' (default: the class folders under --data-root)")


def add_captions_arg(parser, help: str) -> None:
    """``--captions``; where its default comes from differs per command, so each says it in ``help``."""
    parser.add_argument("--captions", type=Path, default=None, help=help)


def add_schema_arg(parser) -> None:
    parser.add_argument("--schema", choices=sorted(SCHEMAS), default="2025",
                        help="BraTS-Path edition (the challenge year: its class list, rules and scorer)")


def add_images_arg(parser, help: str, required: bool = False) -> None:
    """``--images``: a folder of unlabelled patches (what each command does with them is its ``help``)."""
    parser.add_argument("--images", type=Path, default=None, required=required, help=help)


def add_submission_arg(parser) -> None:
    parser.add_argument("--submission", type=Path, required=True, help="the SubjectID,Prediction CSV")


def add_skip_bad_arg(parser) -> None:
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) tiles that do not decode")


def add_feature_cache_arg(parser) -> None:
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="folder of cached frozen features (default: <cache-dir>/features or ~/.cache/medvl)")


def add_tta_arg(parser, help: str = "8: average the probabilities over the 8 dihedral views of each tile "
                                    "(4 rotations x flip)") -> None:
    parser.add_argument("--tta", type=int, choices=TTA_CHOICES, default=1, help=help)


def add_n_boot_arg(parser) -> None:
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the 95%% intervals")


def add_encoder_arg(parser) -> None:
    parser.add_argument("--encoder", default="prov-gigapath",
                        help=f"tile encoder preset ({', '.join(ENCODERS)}), a timm model name, or a local folder "
                             "with timm's config.json and model.safetensors")


def add_image_tokens_arg(parser) -> None:
    parser.add_argument("--image-tokens", type=int, default=5,
                        help="class token + pooled patch grid: 1 (the seed), 2, 5, 10 ... (1 + g^2)")


def add_normalize_arg(parser) -> None:
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default=DEFAULT_NORMALIZE,
                        help="config: the encoder's own mean/std (default); imagenet: ImageNet mean/std (what runs "
                             "recorded before per-encoder preprocessing); seed: divide by 255 only")


def add_text_encoder_arg(parser, default: str | None = "biolinkbert-large", help: str | None = None) -> None:
    """``--text-encoder``: the caption encoder (``extract`` defaults to none: it caches captions only when asked)."""
    help = help or f"preset ({', '.join(text_presets())}) or a local Hugging Face directory"
    parser.add_argument("--text-encoder", default=default, help=help)


def add_input_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    add_data_root_arg(group, help="ROOT/<CLS>/*.jpg (and ROOT/val/ for submissions)")
    add_labels_csv_arg(group)
    add_captions_arg(group, help="captions JSONL (default: <data-root>/captions.jsonl)")
    add_schema_arg(group)
    group.add_argument("--val-fraction", type=unit_interval, default=0.15,
                       help="fraction of the tiles held out for validation")
    group.add_argument("--test-fraction", type=unit_interval, default=0.15,
                       help="held out for evaluate (the challenge's own sets are hidden)")
    add_skip_bad_arg(group)
    add_feature_cache_arg(group)
    model = parser.add_argument_group("encoders")
    add_encoder_arg(model)
    model.add_argument("--encoder-mode", choices=ENCODER_MODES, default="frozen",
                       help="frozen: features computed once and cached (minutes on a T4); lora: LoRA adapters on the "
                            "attention qkv/proj layers train with the heads; full: the whole encoder trains")
    model.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank (--encoder-mode lora)")
    model.add_argument("--lora-alpha", type=positive_int, default=16, help="LoRA alpha (--encoder-mode lora)")
    add_image_tokens_arg(model)
    add_normalize_arg(model)
    add_text_encoder_arg(model)


def image_inputs(paths: list[Path], settings: dict, device: torch.device, cache_root: Path,
                 skip_bad: bool, dihedral: int = 0,
                 num_workers: int | None = None) -> tuple[CachedTensors | torch.Tensor, np.ndarray]:
    """Lazy (N, T, D) frozen tile features of ``paths`` (a ``CachedTensors``, encoded and cached where missing),
    or (N, 3, 224, 224) uint8 crops when the encoder trains (``encoder_mode`` lora or full), and the indices kept.

    ``dihedral`` = k picks the k-th dihedral view of every tile (``pathology_brats.extract.dihedral``), each view
    cached on its own: test-time augmentation averages the probabilities of k = 0 .. 7."""
    if settings.get("encoder_mode", "frozen") != "frozen":
        return pixel_tiles(paths, skip_bad, run_preprocessing(settings.get("preprocessing")))
    encoder = load_tile_encoder(settings["encoder"], settings["image_tokens"])
    encoder.preprocessing = run_preprocessing(settings.get("preprocessing"))  # the run's own (old runs: GigaPath's)
    cache = view_cache(encoder, cache_root, settings["normalize"], dihedral)
    return encode_tiles(encoder, paths, cache, device, settings["normalize"], skip_bad=skip_bad,
                        num_workers=num_workers, dihedral_view=dihedral)


def text_inputs(texts: list[str], settings: dict, cache_root: Path, hub_cache: Path | None,
                device: str | torch.device = "cpu") -> tuple[CachedTensors, None]:
    """(lazy ragged (L_i, D) caption token states, None): no global padding or mask any more; a ``TileDataset``
    pads each batch to its longest caption and builds that batch's mask. The text encoder runs on ``device``."""
    return caption_tokens(texts, settings["text_encoder"], cache_root, hub_cache, device=device), None


class TileDataset(Dataset):
    """``{"image" or "pixels", "text", "text_mask", "label"}`` rows (a stream may be absent).

    ``image`` holds frozen features (N, T, D): a tensor or a lazy ``CachedTensors`` read a batch at a time; uint8
    crops (N, 3, H, W) go in as ``pixels`` and, with ``augment``, get histology-valid augmentation: flips, 90-degree
    rotations and a mild colour (stain) jitter. ``text`` is a padded tensor with its ``text_mask``, or a ragged
    ``CachedTensors`` (no mask): then a batch read through ``__getitems__`` (what a batched DataLoader calls) is
    padded to its own longest caption (DataLoader workers call it too, through ``common.device_data.SeededFetch``).
    """

    def __init__(self, labels: np.ndarray, image: torch.Tensor | CachedTensors | None = None,
                 text: torch.Tensor | CachedTensors | None = None, text_mask: torch.Tensor | None = None,
                 augment: bool = False):
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.text, self.text_mask = text, text_mask
        self.pixels = image if image is not None and image.dtype == torch.uint8 else None
        self.image = image if self.pixels is None else None
        self.augment = augment and self.pixels is not None
        if self.augment:
            from torchvision.transforms import v2

            self.jitter = v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)

    def __len__(self) -> int:
        return len(self.labels)

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.augment:
            pixels = torch.rot90(pixels, int(torch.randint(4, ())), dims=(1, 2))
            if torch.rand(()) < 0.5:
                pixels = pixels.flip(2)
            pixels = self.jitter(pixels)
        return pixels

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {"label": self.labels[i]}
        if self.image is not None:
            row["image"] = self.image[i]
        if self.pixels is not None:
            row["pixels"] = self._pixels(self.pixels[i])
        if isinstance(self.text, CachedTensors):
            row["text"] = self.text[i]
            row["text_mask"] = torch.ones(len(row["text"]), dtype=torch.bool)
        elif self.text is not None:
            row["text"], row["text_mask"] = self.text[i], self.text_mask[i]
        return row

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch's rows, the lazy streams read together (shard by shard) and the captions padded to the batch's
        longest, so the default collate stacks them."""
        lazy_image = isinstance(self.image, CachedTensors)
        lazy_text = isinstance(self.text, CachedTensors)
        if not (lazy_image or lazy_text):
            return [self[i] for i in indices]
        image = self.image.rows(list(indices)) if lazy_image else None
        text = mask = None
        if lazy_text:
            text, mask = pad_tokens(self.text.rows(list(indices)))
        rows = []
        for j, i in enumerate(indices):
            row = {"label": self.labels[i]}
            if self.image is not None:
                row["image"] = image[j] if lazy_image else self.image[i]
            if self.pixels is not None:
                row["pixels"] = self._pixels(self.pixels[i])
            if lazy_text:
                row["text"], row["text_mask"] = text[j], mask[j]
            elif self.text is not None:
                row["text"], row["text_mask"] = self.text[i], self.text_mask[i]
            rows.append(row)
        return rows


def forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    streams = {k: batch[k] for k in ("image", "text", "text_mask", "pixels") if k in batch}
    return model(**streams)


__all__ = ["ENCODER_MODES", "TTA_CHOICES", "default_feature_cache", "add_data_root_arg", "add_labels_csv_arg",
           "add_captions_arg", "add_schema_arg", "add_images_arg", "add_submission_arg", "add_skip_bad_arg",
           "add_feature_cache_arg", "add_tta_arg", "add_n_boot_arg", "add_encoder_arg", "add_image_tokens_arg",
           "add_normalize_arg", "add_text_encoder_arg", "add_input_args", "image_inputs",
           "text_inputs", "TileDataset", "forward"]
