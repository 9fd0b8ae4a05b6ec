"""ResNet for PneumoniaMNIST: the MedMNIST ResNet-18 adaptation for small images, with a retrieval embedding.

At 28x28 the ImageNet stem (7x7 stride-2 conv + max-pool) would shrink the image to 7x7 before the first
residual stage; MedMNIST's reference replaces it by a 3x3 stride-1 conv with no pooling. Larger inputs keep
the same stem here so that 28 and 224 px runs differ only in resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from common.checkpoint import find_model_dir, load_model_files, require_keys
from common.errors import ConfigError, DataError
from common.presets import get_preset, preset_names
from pneumonia.data import LABELS, SIZES, SPLITS, MedMNISTSplits, load_medmnist, to_tensor

ARCHS = tuple(preset_names("cnn"))
"""``--arch`` choices: the ``cnn`` presets of ``common.presets`` (resnet18, resnet50, resnet-tiny)."""


class PneumoniaNet(nn.Module):
    """timm ResNet with a small-image stem and one logit (sigmoid = P(pneumonia))."""

    def __init__(self, arch: str = "resnet18", in_chans: int = 1):
        super().__init__()
        spec = dict(get_preset(arch, "cnn", "--arch").options)
        name = spec.pop("model_name")
        self.arch = arch
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **spec)
        self.backbone.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.backbone.maxpool = nn.Identity()
        self.head = nn.Linear(self.backbone.num_features, 1)

    @property
    def embedding_dim(self) -> int:
        return self.backbone.num_features

    @property
    def target_layer(self) -> nn.Module:
        """The last residual stage, where Grad-CAM looks."""
        return self.backbone.layer4

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features (512-d for ResNet-18): the classifier head replaced by identity."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x)).squeeze(-1)


def build_model(arch: str = "resnet18") -> PneumoniaNet:
    """Build an untrained network; it is size-agnostic (training records the image size in model.json)."""
    return PneumoniaNet(arch)


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> normalised float (N, 1, H, W), exactly as during training."""
    return to_tensor(images)


def load_trained(run_dir: Path | str, device: str | torch.device = "cpu") -> tuple[PneumoniaNet, dict[str, Any]]:
    """Rebuild the best model of a run from ``best/model.safetensors`` and ``model.json``."""
    directory = find_model_dir(Path(run_dir))
    state, meta = load_model_files(directory)
    meta_path = directory / "model.json"
    if not isinstance(meta, dict) or meta.get("pipeline") != "pneumonia":
        pipeline = meta.get("pipeline") if isinstance(meta, dict) else None
        raise DataError(meta_path, f"not a pneumonia model (pipeline={pipeline!r})")
    require_keys(meta, meta_path, {"arch": str, "image_size": int, "threshold": (int, float)})
    if meta["arch"] not in ARCHS:
        raise DataError(meta_path, f"unknown arch {meta['arch']!r} (known: {', '.join(ARCHS)})")
    if meta["image_size"] not in SIZES:
        raise DataError(meta_path, f"image_size {meta['image_size']} is not one of {SIZES}")
    if not 0 <= meta["threshold"] <= 1:
        raise DataError(meta_path, f"threshold {meta['threshold']} is not a probability")
    labels = meta.setdefault("labels", list(LABELS))
    if not isinstance(labels, list) or len(labels) != 2:
        raise DataError(meta_path, "labels must be a list of two class names")
    model = PneumoniaNet(meta["arch"])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DataError(directory / "model.safetensors", f"weights do not fit arch {meta['arch']!r}") from err
    return model.to(device).eval(), meta


def load_run(run_dir: Path | str, data_root: Path | str | None = None, splits: tuple[str, ...] = SPLITS,
             device: str | torch.device = "cpu") -> tuple[PneumoniaNet, dict[str, Any], MedMNISTSplits]:
    """A run's best model and the data it was trained on (or ``data_root``), the shared start of every tool."""
    model, meta = load_trained(run_dir, device)
    root = data_root or meta.get("data_root")
    if root is None:
        raise ConfigError("--data-root", "not given, and the run's model.json names no data")
    return model, meta, load_medmnist(root, meta["image_size"], splits=splits)


@torch.no_grad()
def predict_proba(model: PneumoniaNet, images: np.ndarray, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """P(pneumonia) for uint8 images (N, H, W)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = preprocess(images[start : start + batch_size]).to(device)
        out.append(torch.sigmoid(model(batch)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def embed_images(model: PneumoniaNet, images: np.ndarray, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """512-d embeddings (float32) for uint8 images (N, H, W)."""
    model.eval()
    out = [model.embed(preprocess(images[s : s + batch_size]).to(device)).float().cpu().numpy()
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.embedding_dim), np.float32)
