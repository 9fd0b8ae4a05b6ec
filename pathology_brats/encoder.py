"""Tile encoder: Prov-GigaPath (or its tiny twin, or any timm name), its preprocessing, cached frozen features.

    python -c "from pathology_brats.encoder import load_tile_encoder; print(load_tile_encoder('gigapath-tiny'))"

``prov-gigapath`` is timm's ``hf_hub:prov-gigapath/prov-gigapath`` (ViT-g/16, 1536-d; gated: accept its terms on
the hub and log in, or point ``--encoder`` at a local timm checkpoint folder). Preprocessing is the one its model card
gives: resize 256 (bicubic), centre crop 224, ImageNet mean/std; ``--normalize seed`` reproduces the seed, which
divided by 255 and never normalised. An image becomes ``--image-tokens`` tokens: the class token, plus the patch
grid average-pooled to a g x g grid when N = 1 + g^2 (the seed used the class token alone, N = 1).

Frozen features are cached (``common.feature_cache``) by file content and by encoder, preprocessing and token
layout, so heads train on a T4 in minutes and a rerun after a kill encodes only what is missing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from common.errors import ConfigError, DataError
from common.feature_cache import FeatureCache
from common.images import IMAGENET_MEAN, IMAGENET_STD
from common.presets import get_preset, preset_names

log = logging.getLogger("medvl.pathology_brats")

ENCODERS = tuple(preset_names("tile-encoder"))
NORMALIZATIONS = ("imagenet", "seed")
RESIZE, CROP = 256, 224


@dataclass(frozen=True)
class TilePreprocessing:
    """How a tile becomes the encoder's input: shorter side resized to ``resize`` (``interpolation``), centre crop
    ``crop``, then ``(x / 255 - mean) / std``. Recorded in ``model.json`` so train, evaluate and submit agree."""

    resize: int = RESIZE
    crop: int = CROP
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict) -> TilePreprocessing:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in
                      cls.__dataclass_fields__})


PROV_GIGAPATH_PREPROCESSING = TilePreprocessing()


def check_image_tokens(count: int) -> int:
    """Pooled grid side g for N = 1 + g^2 image tokens (0 for the class token alone)."""
    side = math.isqrt(max(count - 1, 0))
    if count < 1 or side * side != count - 1:
        raise ConfigError("--image-tokens", f"{count} is not 1 + g^2 (1, 2, 5, 10, 17 ...): the class token plus a "
                                            "g x g grid of pooled patch tokens")
    return side


class TileEncoder(nn.Module):
    """A timm ViT that turns (B, 3, 224, 224) tiles into (B, N, D) tokens: class token + pooled patch grid."""

    def __init__(self, backbone: nn.Module, name: str, image_tokens: int = 5, pretrained: bool = False,
                 preprocessing: TilePreprocessing = PROV_GIGAPATH_PREPROCESSING):
        super().__init__()
        self.backbone, self.name, self.image_tokens = backbone, name, image_tokens
        self.preprocessing = preprocessing
        self.pretrained = pretrained
        """True when the weights came from a source (hub, timm cache) that can rebuild them: then frozen backbone
        weights need not be saved with a run."""
        self.grid = check_image_tokens(image_tokens)
        self.dim = int(backbone.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        out = [tokens[:, :1]]
        if self.grid:
            patches = tokens[:, prefix:]
            side = math.isqrt(patches.shape[1])
            grid = patches.transpose(1, 2).reshape(len(patches), self.dim, side, side)
            pooled = F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
            out.append(pooled)
        return torch.cat(out, 1)


def load_tile_encoder(name: str, image_tokens: int = 5, pretrained: bool = True) -> TileEncoder:
    """Build a ``tile-encoder`` preset (the real one with its hub weights) or any timm model name."""
    import timm

    if name in ENCODERS:
        preset = get_preset(name, "tile-encoder", "--encoder")
        options = dict(preset.options)
        model_name = options.pop("hub", None) or options.pop("model_name")
        options.pop("model_name", None)
        use_weights = pretrained and preset.source != "tiny"
        if model_name.startswith("hf_hub:"):
            options = {}
    else:
        model_name, options, use_weights = name, {}, pretrained
    try:
        backbone = timm.create_model(model_name, pretrained=use_weights, num_classes=0, **options)
    except (OSError, RuntimeError, ValueError) as err:
        first = " ".join(str(err).split())[:160]
        if name in ENCODERS or "Unknown model" not in str(err):
            raise ConfigError("--encoder", f"{name} ({model_name}) cannot be loaded here ({first}); it needs the hub "
                                           "or a local cache (Prov-GigaPath is gated); offline: gigapath-tiny") from err
        raise ConfigError("--encoder", f"unknown encoder {name!r}; presets: {', '.join(ENCODERS)}, or a timm "
                                       "model name") from err
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "embed_dim"):
        raise ConfigError("--encoder", f"{name} is not a ViT with a class token")
    return TileEncoder(backbone.eval(), name, image_tokens, pretrained=use_weights)


LORA_TARGETS = r".*blocks\.\d+\.attn\.(qkv|proj)"
"""The attention input (qkv) and output (proj) projections of every ViT block (not the patch embedding's proj)."""


def add_lora(encoder: TileEncoder, rank: int, alpha: int, dropout: float = 0.0) -> TileEncoder:
    """Freeze the encoder and add LoRA adapters (peft) to its attention projections; only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model

    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    encoder.backbone = inject_adapter_in_model(config, encoder.backbone)
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return encoder


def crop_pixels(image: Image.Image, preprocessing: TilePreprocessing = PROV_GIGAPATH_PREPROCESSING) -> torch.Tensor:
    """Resize the shorter side to ``preprocessing.resize`` and centre-crop ``preprocessing.crop``: uint8 (3, S, S)."""
    resize, crop = preprocessing.resize, preprocessing.crop
    resample = Image.Resampling[preprocessing.interpolation.upper()]
    width, height = image.size
    scale = resize / min(width, height)
    image = image.resize((max(crop, round(width * scale)), max(crop, round(height * scale))), resample)
    left, top = (image.size[0] - crop) // 2, (image.size[1] - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_pixels(pixels: torch.Tensor, normalize: str = "imagenet",
                     preprocessing: TilePreprocessing = PROV_GIGAPATH_PREPROCESSING) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float: the encoder's mean/std, or the seed's bare /255."""
    if normalize not in NORMALIZATIONS:
        raise ConfigError("--normalize", f"choose one of {', '.join(NORMALIZATIONS)}, not {normalize!r}")
    x = pixels.float() / 255.0
    if normalize == "imagenet":
        mean = torch.tensor(preprocessing.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(preprocessing.std, device=x.device).view(3, 1, 1)
        x = (x - mean) / std
    return x


def preprocess(image: Image.Image, normalize: str = "imagenet",
               preprocessing: TilePreprocessing = PROV_GIGAPATH_PREPROCESSING) -> torch.Tensor:
    """The encoder's input: resize, centre crop, then the encoder's mean/std (or the seed's /255)."""
    return normalize_pixels(crop_pixels(image, preprocessing), normalize, preprocessing)


def read_rgb(path: Path) -> Image.Image:
    """An image file as RGB; a missing or undecodable file is one DataError naming it."""
    if not Path(path).is_file():
        raise DataError(path, "image file not found")
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(path, f"image does not decode ({err})") from err


def cache_for(encoder: TileEncoder, root: Path, normalize: str) -> FeatureCache:
    namespace = f"{encoder.name.replace('/', '_').replace(':', '_')}-{normalize}-t{encoder.image_tokens}"
    return FeatureCache(root, namespace, {"encoder": encoder.name, "normalize": normalize, "dim": str(encoder.dim),
                                          "image_tokens": str(encoder.image_tokens)})


__all__ = ["ENCODERS", "NORMALIZATIONS", "TileEncoder", "load_tile_encoder", "add_lora", "LORA_TARGETS",
           "preprocess", "crop_pixels", "normalize_pixels", "read_rgb", "cache_for",
           "check_image_tokens"]

