"""ResNet for PneumoniaMNIST: the MedMNIST ResNet-18 adaptation for small images, with a retrieval embedding.

At 28x28 the ImageNet stem (7x7 stride-2 conv + max-pool) would shrink the image to 7x7 before the first
residual stage; MedMNIST's reference replaces it by a 3x3 stride-1 conv with no pooling. Larger inputs keep
the same stem here so that 28 and 224 px runs differ only in resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError
from common.presets import build_timm, get_preset, preset_names
from common.runs import load_run
from pneumonia.data import MEAN, SIZES, SPLITS, STD, MedMNISTSplits, load_medmnist, to_tensor

ARCHS = tuple(preset_names("cnn"))
"""``--arch`` choices: the ``cnn`` presets of ``common.presets`` (resnet18, resnet50, resnet-tiny)."""


class PneumoniaNet(nn.Module):
    """timm ResNet with a small-image stem and one logit (sigmoid = P(pneumonia)).

    ``width`` is the channel count of the first residual stage (each later stage doubles it; ResNet's is 64): at
    28 px the first stage runs at full resolution, so halving the width quarters most of the compute.
    ``drop_rate`` is dropout before the classifier, ``drop_path_rate`` the stochastic depth of the last block.
    ``tta`` is how ``probabilities`` (and so every tool's P(pneumonia)) averages over test-time views
    (``TTA_MODES``); ``forward`` always sees the one image it is given.
    """

    def __init__(self, arch: str = "resnet18", in_chans: int = 1, width: int = 64, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, tta: str = "none"):
        super().__init__()
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, not {tta!r}")
        self.tta = tta
        self.arch = arch
        self.backbone = build_timm(get_preset(arch, "cnn", "--arch").options, num_classes=0, in_chans=in_chans,
                                   channels=tuple(width * 2**i for i in range(4)), drop_rate=drop_rate,
                                   drop_path_rate=drop_path_rate)
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

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """P(pneumonia) of normalised images (N, 1, H, W): the mean sigmoid over the ``tta`` views."""
        views = tta_views(x, self.tta)
        return torch.stack([torch.sigmoid(self(view).float()) for view in views]).mean(0)


TTA_MODES = ("none", "shift")
"""Test-time augmentation: ``shift`` averages the image and its four one-pixel shifts (up, down, left, right).
No flips: a mirrored radiograph puts the heart on the wrong side, which training never shows either."""


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views ``mode`` averages over; pixels shifted in from outside are black, as in training's augmentation."""
    if mode == "none":
        return [images]
    black = (0.0 - MEAN) / STD
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), value=black)
    height, width = images.shape[-2:]
    # Content moved by (dy, dx) = crop of the padded image starting at (1 - dy, 1 - dx).
    return [images] + [padded[..., 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width].contiguous(
        memory_format=torch.channels_last if images.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]


def build_model(arch: str = "resnet18", **kwargs: Any) -> PneumoniaNet:
    """Build an untrained network; it is size-agnostic (training records the image size in model.json)."""
    return PneumoniaNet(arch, **kwargs)


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> normalised float (N, 1, H, W), exactly as during training."""
    return to_tensor(images)


def build_from_record(meta: dict[str, Any]) -> PneumoniaNet:
    """The untrained network ``model.json`` describes, after checking the keys the pneumonia tools read."""
    size = meta["preprocessing"].get("image_size")
    if size not in SIZES:
        raise ValueError(f"preprocessing.image_size {size!r} is not one of {SIZES}")
    if "decision" not in meta["thresholds"]:
        raise KeyError("thresholds.decision")
    if len(meta["labels"]) != 2:
        raise ValueError("labels must name the two classes")
    return PneumoniaNet(meta["preset"], **meta["kwargs"])


def load_run_and_data(run_dir: Path | str, data_root: Path | str | None = None, splits: tuple[str, ...] = SPLITS,
                      device: str | torch.device = "cpu") -> tuple[PneumoniaNet, dict[str, Any], MedMNISTSplits]:
    """A run's best model (``common.runs.load_run``) and the data it was trained on (or ``data_root``), the shared
    start of the tools that read a split."""
    loaded = load_run(run_dir, "pneumonia", build_from_record, stage="train", device=device)
    model, meta = loaded.model, loaded.meta
    root = data_root or meta["data"].get("root")
    if not isinstance(root, str | Path):
        raise ConfigError("--data-root", "not given, and the run's model.json names no data root")
    return model, meta, load_medmnist(root, meta["preprocessing"]["image_size"], splits=splits)


@torch.no_grad()
def predict_proba(model: PneumoniaNet, images: np.ndarray, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """P(pneumonia) for uint8 images (N, H, W), averaged over the model's test-time views (``tta``)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = preprocess(images[start : start + batch_size]).to(device)
        out.append(model.probabilities(batch).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def embed_images(model: PneumoniaNet, images: np.ndarray, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """512-d embeddings (float32) for uint8 images (N, H, W)."""
    model.eval()
    out = [model.embed(preprocess(images[s : s + batch_size]).to(device)).float().cpu().numpy()
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.embedding_dim), np.float32)
