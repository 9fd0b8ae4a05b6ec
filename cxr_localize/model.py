"""Report-conditioned U-Net: a ResNet U-Net whose bottleneck is modulated by a frozen text embedding.

    python -c "from cxr_localize.model import ReportUNet; print(ReportUNet(text_dim=64, encoder_weights=None))"

The image path is segmentation-models-pytorch's U-Net (ResNet34 encoder, 1x1 conv head; sigmoid at inference).
The report is embedded once by a frozen text encoder (CLIP's pooled output, or mean-pooled BERT states) and
enters at the bottleneck, either tiled, concatenated and mixed by a 1x1 conv (``concat``) or as a per-channel
scale and shift (``film``); both see two coordinate channels beside the bottleneck features, so that a report
can name a place. ``concat-seed`` is the original notebook's fusion exactly (tile, concatenate, 1x1 conv; no
coordinate channels), for reproducing it. Text vectors are centred on the training reports' mean and whitened
(buffers saved with the model), because report embeddings of one encoder share a large common component and
differ along a few weak directions: in a sentence encoder "left" and "right" versions of a report are nearly the
same vector. Encoder weights: ``imagenet`` (smp's Hub file, from ``--cache-dir`` if given), ``none``, or a local
folder in smp's layout (``read_encoder_folder``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors
from segmentation_models_pytorch.base import SegmentationHead

from common.errors import ConfigError, DataError
from common.hf import refuse_pickled_weights
from common.runs import load_run, read_run_record
from common.text_encoders import TextEncoder, load_text_encoder, text_presets

log = logging.getLogger("medvl.cxr_localize")

TEXT_PRESETS = text_presets()
"""``--text-encoder`` presets: the ``text-encoder`` kind of ``common.presets``; a local HF directory works too."""
FUSIONS = ("film", "concat", "concat-seed")
TEXT_WHITENINGS = ("zca", "scale", "none")
ENCODER_WEIGHTS = ("imagenet", "none")
"""Keywords of ``--encoder-weights``; any other value is a local folder (``read_encoder_folder``)."""
DEFAULT_DECODER_CHANNELS = (128, 64, 32, 16, 16)


def coordinate_channels(features: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w) maps of x (image left to right) and y (top to bottom), each from -1 to 1."""
    batch, _, height, width = features.shape
    ys = torch.linspace(-1, 1, height, device=features.device, dtype=features.dtype)
    xs = torch.linspace(-1, 1, width, device=features.device, dtype=features.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(batch, -1, -1, -1)


class FiLMFusion(nn.Module):
    """Per-channel scale and shift from the text, over the bottleneck features and two coordinate channels.

    Scaling the coordinate channels by the text gives a report-dependent spatial ramp ("left" lights up one
    side), which plain FiLM cannot express: it only reweights features that must already know where they are.
    A 1x1 conv maps back to the bottleneck width. Starts as the identity so training begins from the image path.
    """

    def __init__(self, text_dim: int, channels: int):
        super().__init__()
        width = channels + 2
        self.proj = nn.Sequential(nn.Linear(text_dim, width), nn.ReLU(inplace=True), nn.Linear(width, 2 * width))
        nn.init.zeros_(self.proj[-1].weight)
        nn.init.zeros_(self.proj[-1].bias)
        self.out = nn.Conv2d(width, channels, kernel_size=1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.weight[:, :channels, 0, 0].copy_(torch.eye(channels))
            self.out.bias.zero_()

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        z = torch.cat([features, coordinate_channels(features)], dim=1)
        gamma, beta = self.proj(text).to(z.dtype)[..., None, None].chunk(2, dim=1)
        return self.out(z * (1 + gamma) + beta)


class ConcatFusion(nn.Module):
    """The original design: tile the text over the bottleneck, concatenate (with the two coordinate channels),
    and mix back to the bottleneck width with a 1x1 conv."""

    def __init__(self, text_dim: int, channels: int):
        super().__init__()
        self.mix = nn.Conv2d(channels + 2 + text_dim, channels, kernel_size=1)

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        tiled = text.to(features.dtype)[..., None, None].expand(-1, -1, *features.shape[-2:])
        return self.mix(torch.cat([features, coordinate_channels(features), tiled], dim=1))


class SeedConcatFusion(nn.Module):
    """The original notebook's fusion: the text tiled over the bottleneck, concatenated after the features, and a
    1x1 conv back to the bottleneck width. No coordinate channels: a place named in the report can only be matched
    to what the image features themselves know about position."""

    def __init__(self, text_dim: int, channels: int):
        super().__init__()
        self.mix = nn.Conv2d(channels + text_dim, channels, kernel_size=1)

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        tiled = text.to(features.dtype)[..., None, None].expand(-1, -1, *features.shape[-2:])
        return self.mix(torch.cat([features, tiled], dim=1))


FUSION_MODULES = {"film": FiLMFusion, "concat": ConcatFusion, "concat-seed": SeedConcatFusion}


class ReportUNet(nn.Module):
    """U-Net whose bottleneck is fused with a (frozen, precomputed) report embedding; returns mask logits."""

    def __init__(self, text_dim: int, encoder: str = "resnet34", encoder_weights: str | Path | None = None,
                 fusion: str = "film", decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
                 freeze_encoder: bool = True, cache_dir: Path | None = None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError("--fusion", f"unknown fusion {fusion!r}; choose {', '.join(FUSIONS)}")
        self.unet = build_unet(encoder, encoder_weights, classes=1, decoder_channels=decoder_channels,
                               cache_dir=cache_dir)
        self.unet.segmentation_head = SegmentationHead(decoder_channels[-1], 1, kernel_size=1)
        bottleneck = self.unet.encoder.out_channels[-1]
        self.fusion = FUSION_MODULES[fusion](text_dim, bottleneck)
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("text_transform", torch.eye(text_dim))
        self.freeze_encoder = freeze_encoder
        self.unet.encoder.requires_grad_(not freeze_encoder)

    @torch.no_grad()
    def set_text_statistics(self, embeddings: torch.Tensor, whitening: str = "zca", shrink: float = 0.1) -> None:
        """Fit the text standardisation on the training reports' embeddings (one row per distinct report).

        ``zca``: centre, then whiten with eigenvalues shrunk by ``shrink`` times their mean, so that rare
        contrasts such as left/right get about the weight of common ones without blowing up noise directions.
        ``scale``: centre and scale to unit RMS only. Both give whitened training vectors of unit RMS norm.
        ``none``: the encoder's vectors as they are (the original notebook fed CLIP's pooled output unchanged).
        """
        if whitening not in TEXT_WHITENINGS:
            raise ConfigError("--text-whitening", f"choose one of {', '.join(TEXT_WHITENINGS)}")
        if whitening == "none":
            self.text_mean.zero_()
            self.text_transform.copy_(torch.eye(self.text_transform.shape[0]))
            return
        x = embeddings.double()
        mean = x.mean(0)
        centred = x - mean
        dim = x.shape[1]
        if whitening == "zca" and len(x) > 1:
            eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / len(x))
            eigvals = eigvals.clamp_min(0)
            transform = eigvecs @ torch.diag((eigvals + shrink * eigvals.mean() + 1e-12).rsqrt()) @ eigvecs.T
        else:
            transform = torch.eye(dim, dtype=torch.float64)
        rms = (centred @ transform).pow(2).sum(1).mean().sqrt()
        self.text_mean.copy_(mean.float())
        self.text_transform.copy_((transform / (rms if rms > 1e-12 else 1.0)).float())

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        features = list(self.unet.encoder(image))
        text = (text.float() - self.text_mean) @ self.text_transform
        features[-1] = self.fusion(features[-1], text)
        return self.unet.segmentation_head(self.unet.decoder(features))

    def train(self, mode: bool = True) -> ReportUNet:
        super().train(mode)
        if self.freeze_encoder:
            self.unet.encoder.eval()
        return self


def build_unet(encoder: str, weights: str | Path | None, classes: int, decoder_channels: Sequence[int],
               cache_dir: Path | None = None) -> smp.Unet:
    """smp U-Net on 3-channel input (grey repeated), its encoder from ``weights``.

    ``weights``: ``none``/None (random), ``imagenet`` (the file smp itself downloads, looked up in ``cache_dir``
    when given, else in the default Hugging Face cache; offline and not cached is one line), or a local folder
    (see ``read_encoder_folder``).
    """
    weights = None if weights in (None, "none") else weights
    if weights is not None and str(weights) not in ENCODER_WEIGHTS:
        state, source = read_encoder_folder(Path(weights), encoder)
    elif weights is not None and (hub := _hub_settings(encoder, str(weights))) is not None:
        state, source = _hub_encoder_state(encoder, str(weights), hub, cache_dir)
    else:
        state, source = None, None
    try:
        unet = smp.Unet(encoder, encoder_weights=weights if state is None else None, in_channels=3, classes=classes,
                        decoder_channels=tuple(decoder_channels))
    except OSError as err:
        raise ConfigError("--encoder-weights", f"{weights} weights for {encoder} cannot be downloaded here "
                                               f"({type(err).__name__}); pass --encoder-weights none or a local "
                                               "folder, or start from a phase-1 run with --encoder-init RUN") from err
    except KeyError as err:
        raise ConfigError("--encoder", f"unknown encoder or weights ({err})") from err
    if state is not None:
        try:
            unet.encoder.load_state_dict(state)
        except RuntimeError as err:
            raise DataError(source, f"weights do not fit a {encoder} encoder ({' '.join(str(err).split())[:160]})"
                            ) from err
    return unet


ENCODER_FILE = "model.safetensors"


def read_encoder_folder(folder: Path, encoder: str) -> tuple[dict[str, torch.Tensor], Path]:
    """An smp encoder's state dict from a local folder, and the file it came from.

    Two layouts, both ``config.json`` + ``model.safetensors``: the Hub repository smp downloads for ``imagenet``
    (``smp-hub/<encoder>.imagenet``: the encoder's own state dict), or a whole smp model written by its
    ``save_pretrained`` (config with ``_model_class`` and ``encoder_name``; the ``encoder.`` weights are taken).
    Anything else (no safetensors file, pickles only, another library's checkpoint) is one DataError.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(folder, "encoder weights folder does not exist (expected imagenet, none or a folder)")
    weights = folder / ENCODER_FILE
    if not weights.is_file():
        refuse_pickled_weights(folder)
        raise DataError(folder, f"no {ENCODER_FILE}: not an smp encoder folder (smp's Hub layout or a model saved "
                                "with smp's save_pretrained)")
    config = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(folder / "config.json", f"is not JSON ({err})") from err
        if not isinstance(config, dict):
            raise DataError(folder / "config.json", "is not a JSON object")
    try:
        state = load_safetensors(str(weights), device="cpu")
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise DataError(weights, f"not a readable safetensors file ({' '.join(str(err).split())[:120]})") from err
    if "_model_class" in config:
        named = config.get("encoder_name")
        if named != encoder:
            raise DataError(folder / "config.json", f"holds a {named} encoder, not {encoder} (--encoder)")
        state = {key.removeprefix("encoder."): value for key, value in state.items() if key.startswith("encoder.")}
        if not state:
            raise DataError(weights, "an smp model without encoder.* weights")
    return state, weights


def _hub_settings(encoder: str, weights: str) -> dict | None:
    """smp's Hub repository and revision for ``encoder``'s ``weights`` (None for encoders smp loads otherwise)."""
    from segmentation_models_pytorch.encoders import encoders

    return encoders.get(encoder, {}).get("pretrained_settings", {}).get(weights)


def _hub_encoder_state(encoder: str, weights: str, settings: dict, cache_dir: Path | None
                       ) -> tuple[dict[str, torch.Tensor], Path]:
    """The encoder file smp would download (same repository and pinned revision), from ``cache_dir`` or the hub."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(settings["repo_id"], filename=ENCODER_FILE, revision=settings["revision"],
                                    cache_dir=None if cache_dir is None else str(cache_dir)))
    except (OSError, ValueError) as err:
        where = f"in --cache-dir {cache_dir}" if cache_dir is not None else "in the Hugging Face cache"
        raise ConfigError("--encoder-weights", f"{weights} weights for {encoder} ({settings['repo_id']}) are not "
                                               f"{where} and cannot be downloaded here ({type(err).__name__}); "
                                               "pass --encoder-weights none or a local folder, or start from a "
                                               "phase-1 run with --encoder-init RUN") from err
    return load_safetensors(str(path), device="cpu"), path


def load_encoder_init(model_encoder: nn.Module, run_dir: Path, encoder: str) -> dict:
    """Copy a phase-1 encoder (``cxr_localize.pretrain`` run) into ``model_encoder``; returns its metadata."""
    meta, _ = read_run_record(Path(run_dir), "cxr_localize", stage="pretrain")
    if meta["preset"] != encoder:
        raise ConfigError("--encoder", f"phase-1 run has a {meta['preset']} encoder, not {encoder}")
    training = model_encoder.training
    loaded = load_run(Path(run_dir), "cxr_localize", lambda _meta: model_encoder, stage="pretrain")
    model_encoder.train(training)  # the loader hands models back in eval mode; this one goes on training
    return loaded.meta


UNET_RECORD = {"text_encoder": str, "text_source": str, "text_whitening": str}
"""Keys beyond the common schema that a phase-2 ``model.json`` holds (read by ``cxr_localize.evaluate``)."""


def build_from_record(meta: dict) -> ReportUNet:
    """The untrained ReportUNet a phase-2 ``model.json`` describes, after checking what the tools read from it."""
    kwargs = meta["kwargs"]
    size = meta["preprocessing"].get("image_size")
    if not isinstance(size, int) or size < 32 or size % 32:
        raise ValueError(f"preprocessing.image_size {size!r} is not a multiple of 32")
    if "mask" not in meta["thresholds"]:
        raise KeyError("thresholds.mask")
    for key, kind in UNET_RECORD.items():
        if not isinstance(meta.get(key), kind):
            raise KeyError(key)
    for key in ("projection", "split_level", "split_seed"):
        if key not in meta["data"]:
            raise KeyError(f"data.{key}")
    channels = kwargs.get("decoder_channels")
    if not isinstance(channels, list) or len(channels) != 5 or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError("kwargs.decoder_channels must be five positive integers")
    text_dim = kwargs.get("text_dim")
    if not isinstance(text_dim, int) or text_dim < 1:
        raise ValueError(f"kwargs.text_dim {text_dim!r} must be a positive integer")
    return ReportUNet(text_dim, meta["preset"], None, kwargs.get("fusion", "film"), channels)


__all__ = ["TEXT_PRESETS", "FUSIONS", "TextEncoder", "load_text_encoder", "FiLMFusion", "ConcatFusion",
           "SeedConcatFusion", "ReportUNet", "build_unet", "read_encoder_folder", "load_encoder_init",
           "build_from_record", "DEFAULT_DECODER_CHANNELS"]
