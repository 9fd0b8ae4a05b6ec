"""Tile encoders (Prov-GigaPath, UNI, Virchow2, H-optimus-0, Phikon-v2, their tiny twins, any timm name or a
local checkpoint folder), each with its own preprocessing, and cached frozen features.

    python -c "from pathology_brats.encoder import load_tile_encoder; print(load_tile_encoder('gigapath-tiny'))"

Presets live in ``common.presets`` (kind ``tile-encoder``) with their architecture and the preprocessing of their
own config (timm ``pretrained_cfg``: input size, ``crop_pct``, mean/std, interpolation; Phikon-v2: its Hugging
Face image processor), so both are known offline. A raw timm name takes timm's ``pretrained_cfg``; a local folder
(``--encoder /path``) holds timm's ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``) and
``model.safetensors`` or ``pytorch_model.bin``, or a transformers Dinov2 checkpoint (``save_pretrained``).
``--normalize config`` (default) uses the encoder's own mean/std, ``imagenet`` the ImageNet ones (what runs before
the per-encoder preprocessing recorded), ``seed`` the seed's bare /255.

An image becomes ``--image-tokens`` tokens: the class token, plus the patch grid average-pooled to a g x g grid when
N = 1 + g^2 (register tokens, ``num_prefix_tokens``, are left out of the grid). Virchow2's embedding is the class
token concatenated with the mean patch token, so its tokens are 2 x 1280-d: [class, mean of the region's patches]
with the whole image as region 0 (N = 1 is exactly its published embedding).

Random-weight encoders (tiny twins, ``pretrained=False``) are built from a fixed seed, independent of the global RNG;
every encoder carries a SHA-256 fingerprint of its weights, which names its feature cache, so features of other
weights are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common.errors import ConfigError, DataError
from common.feature_cache import FeatureCache
from common.images import IMAGENET_MEAN, IMAGENET_STD
from common.images import read_rgb as read_image_rgb
from common.presets import build_tile_backbone, get_preset, preset_names, timm_arguments

log = logging.getLogger("medvl.pathology_brats")

ENCODERS = tuple(preset_names("tile-encoder"))
NORMALIZATIONS = ("config", "imagenet", "seed")
DEFAULT_NORMALIZE = "config"
RESIZE, CROP = 256, 224
TOKEN_MODES = ("cls", "cls+mean")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


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

    @classmethod
    def from_timm(cls, cfg: dict) -> TilePreprocessing:
        """From a timm ``pretrained_cfg``: crop = input size, resize = floor(crop / crop_pct) (timm's eval
        transform), its mean, std and interpolation."""
        crop = int(cfg.get("input_size", (3, CROP, CROP))[-1])
        crop_pct = float(cfg.get("crop_pct") or 0.875)
        return cls(resize=math.floor(crop / crop_pct), crop=crop, mean=_triple(cfg.get("mean", IMAGENET_MEAN)),
                   std=_triple(cfg.get("std", IMAGENET_STD)), interpolation=str(cfg.get("interpolation") or
                                                                              "bicubic"))

    @classmethod
    def from_image_processor(cls, cfg: dict) -> TilePreprocessing:
        """From a Hugging Face image processor config (``preprocessor_config.json``): ``size`` (shortest edge),
        ``crop_size``, ``image_mean``/``image_std``, ``resample`` (PIL's number)."""
        size = cfg.get("size", {"shortest_edge": CROP})
        resize = int(size["shortest_edge"] if isinstance(size, dict) and "shortest_edge" in size else
                     (size.get("height") if isinstance(size, dict) else size))
        crop_size = cfg.get("crop_size", {"height": resize})
        crop = int(crop_size["height"] if isinstance(crop_size, dict) else crop_size) if cfg.get(
            "do_center_crop", True) else resize
        return cls(resize=resize, crop=crop, mean=_triple(cfg.get("image_mean", IMAGENET_MEAN)),
                   std=_triple(cfg.get("image_std", IMAGENET_STD)),
                   interpolation=_PIL_RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic"))


def _triple(values) -> tuple[float, float, float]:
    return tuple(float(v) for v in values)


PROV_GIGAPATH_PREPROCESSING = TilePreprocessing()
"""Prov-GigaPath's model card (resize 256 bicubic, crop 224, ImageNet); also what runs recorded before
per-encoder preprocessing, so ``run_preprocessing`` falls back to it."""


def run_preprocessing(record: dict | None) -> TilePreprocessing:
    """The ``TilePreprocessing`` a run recorded (``model.json``'s ``preprocessing`` or the data settings'); a run
    from before the per-encoder record (no ``crop``/``mean``) used Prov-GigaPath's."""
    if not record or "mean" not in record or "crop" not in record:
        return PROV_GIGAPATH_PREPROCESSING
    return TilePreprocessing.from_json(record)


def check_image_tokens(count: int) -> int:
    """Pooled grid side g for N = 1 + g^2 image tokens (0 for the class token alone)."""
    side = math.isqrt(max(count - 1, 0))
    if count < 1 or side * side != count - 1:
        raise ConfigError("--image-tokens", f"{count} is not 1 + g^2 (1, 2, 5, 10, 17 ...): the class token plus a "
                                            "g x g grid of pooled patch tokens")
    return side


class HFDinov2Backbone(nn.Module):
    """A transformers ``Dinov2Model`` (Phikon-v2) behind the timm interface ``TileEncoder`` uses:
    ``forward_features`` (all tokens, final LayerNorm), ``embed_dim``, ``num_prefix_tokens``."""

    lora_targets = r".*layer\.\d+\.attention\.(q_proj|k_proj|v_proj|o_proj|attention\.(query|key|value)|output\.dense)"
    """Attention input and output projections (transformers 5 names, and the attention.query ... of 4.x)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embed_dim = int(model.config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state


class TileEncoder(nn.Module):
    """A ViT that turns (B, 3, S, S) tiles into (B, N, D) tokens: class token + pooled patch grid.

    ``tokens="cls+mean"`` (Virchow2) makes each token [class token, mean of a region's patch tokens] (D = 2 x
    width; region 0 is the whole image). ``seed`` is the seed random weights were built from (None for loaded
    weights); ``fingerprint`` is the SHA-256 of the weights, computed once.
    """

    def __init__(self, backbone: nn.Module, name: str, image_tokens: int = 5, pretrained: bool = False,
                 preprocessing: TilePreprocessing = PROV_GIGAPATH_PREPROCESSING, tokens: str = "cls",
                 seed: int | None = None):
        super().__init__()
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, not {tokens!r}")
        self.backbone, self.name, self.image_tokens = backbone, name, image_tokens
        self.preprocessing = preprocessing
        self.pretrained = pretrained
        """True when the weights came from a source (hub, timm cache, local folder) that can rebuild them: then
        frozen backbone weights need not be saved with a run."""
        self.tokens, self.seed = tokens, seed
        self.grid = check_image_tokens(image_tokens)
        self.width = int(backbone.embed_dim)
        self.dim = self.width * (2 if tokens == "cls+mean" else 1)
        self.lora_targets = getattr(backbone, "lora_targets", LORA_TARGETS)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the backbone's state dict: names, dtypes, shapes and bytes, in key order."""
        return weights_fingerprint(self.backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        cls, patches = tokens[:, :1], tokens[:, prefix:]
        regions = []
        if self.tokens == "cls+mean":
            regions.append(patches.mean(1, keepdim=True))
        if self.grid:
            side = math.isqrt(patches.shape[1])
            grid = patches.transpose(1, 2).reshape(len(patches), self.width, side, side)
            regions.append(F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2))
        if self.tokens == "cls":
            return torch.cat([cls, *regions], 1)
        regions = torch.cat(regions, 1)
        return torch.cat([cls.expand(-1, regions.shape[1], -1), regions], 2)


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex) of a module's state dict (names, dtypes, shapes, bytes): equal iff the weights are equal."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _seeded(build, seed: int):
    """``build()`` under ``torch.manual_seed(seed)``, leaving the global RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:160]


def _local_folder(name: str) -> Path | None:
    """``name`` as a local checkpoint folder, or None when it is a preset or a timm name."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise DataError(path, "encoder folder does not exist (expected a folder with config.json and "
                              "model.safetensors, a preset or a timm model name)")
    return None


def _read_local_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DataError(folder, "no config.json: an encoder folder holds timm's config.json (architecture, "
                                "model_args, pretrained_cfg) and model.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(config_path, f"not valid JSON ({_first_line(err)})") from err
    if not isinstance(config, dict) or not ("architecture" in config or config.get("model_type") == "dinov2"):
        raise DataError(config_path, "has no timm 'architecture' (nor model_type dinov2)")
    return config


def _matching_preset_options(config: dict) -> dict:
    """Options of the real preset a local timm config.json is a copy of (same architecture and model_args), for
    what its hub repo cannot write in JSON: Virchow2's layers and token recipe."""
    for name in ENCODERS:
        options = get_preset(name, "tile-encoder").options
        args = options.get("model_args", {})
        if options.get("architecture") == config.get("architecture") and args and all(
                config.get("model_args", {}).get(k) == v for k, v in args.items() if k != "dynamic_img_size"):
            return dict(options)
    return {}


def _load_weights(backbone: nn.Module, folder: Path) -> None:
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise DataError(folder, f"no {' or '.join(WEIGHT_FILES)} beside config.json")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: one line naming it
        raise DataError(weights, f"cannot read the weights ({_first_line(err)})") from err
    if not isinstance(state, dict):
        raise DataError(weights, "does not hold a state dict")
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        expected, found = set(backbone.state_dict()), set(state)
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + (
            f"{', ' if missing else ''}{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "")
        raise DataError(weights, "weights do not match the architecture in config.json ("
                                 f"{what or _first_line(err)})") from err


def _load_local(folder: Path, image_tokens: int) -> TileEncoder:
    import timm

    config = _read_local_config(folder)
    if "architecture" not in config:  # a transformers Dinov2 save_pretrained folder (Phikon-v2)
        from transformers import Dinov2Model

        from common.hf import load_pretrained

        backbone = HFDinov2Backbone(load_pretrained(Dinov2Model, folder))
        processor = folder / "preprocessor_config.json"
        preprocessing = (TilePreprocessing.from_image_processor(json.loads(processor.read_text()))
                         if processor.is_file() else TilePreprocessing.from_image_processor({}))
        return TileEncoder(backbone.eval(), str(folder), image_tokens, pretrained=True, preprocessing=preprocessing)
    options = {**_matching_preset_options(config), "architecture": config["architecture"],
               "model_args": config.get("model_args", {})}
    architecture, kwargs = timm_arguments(options)
    try:
        backbone = timm.create_model(architecture, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as err:
        raise DataError(folder / "config.json", f"timm cannot build {architecture} from it "
                                                f"({_first_line(err)})") from err
    _load_weights(backbone, folder)
    _check_vit(backbone, str(folder))
    return TileEncoder(backbone.eval(), str(folder), image_tokens, pretrained=True,
                       preprocessing=_local_timm_preprocessing(config, backbone), tokens=options.get("tokens", "cls"))


def _local_timm_preprocessing(config: dict, backbone: nn.Module | None = None) -> TilePreprocessing:
    """A local folder's preprocessing: its config.json's ``pretrained_cfg`` over timm's default for the
    architecture (the architecture is built on the meta device when ``backbone`` is not given)."""
    if backbone is None:
        import timm

        architecture, kwargs = timm_arguments({**_matching_preset_options(config), "architecture":
                                               config["architecture"], "model_args": config.get("model_args", {})})
        try:
            with torch.device("meta"):
                backbone = timm.create_model(architecture, pretrained=False, **kwargs)
        except (RuntimeError, ValueError, TypeError) as err:
            raise DataError("config.json", f"timm cannot build {architecture} ({_first_line(err)})") from err
    return TilePreprocessing.from_timm({**dict(getattr(backbone, "pretrained_cfg", None) or {}),
                                        **config.get("pretrained_cfg", {})})


def _check_vit(backbone: nn.Module, name: str) -> None:
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "embed_dim"):
        raise ConfigError("--encoder", f"{name} is not a ViT with a class token")


def preset_preprocessing(options: dict) -> TilePreprocessing:
    """A tile-encoder preset's preprocessing, from the config stored in it (no download)."""
    if "image_processor" in options:
        return TilePreprocessing.from_image_processor(options["image_processor"])
    return TilePreprocessing.from_timm(options.get("pretrained_cfg", {}))


def encoder_preprocessing(name: str) -> TilePreprocessing:
    """The preprocessing ``load_tile_encoder(name)`` sets, without loading weights (a timm name is built on the
    meta device)."""
    if name in ENCODERS:
        return preset_preprocessing(dict(get_preset(name, "tile-encoder", "--encoder").options))
    folder = _local_folder(name)
    if folder is not None:
        config = _read_local_config(folder)
        if "architecture" not in config:
            processor = folder / "preprocessor_config.json"
            return TilePreprocessing.from_image_processor(json.loads(processor.read_text()) if processor.is_file()
                                                          else {})
        return _local_timm_preprocessing(config)
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except (OSError, RuntimeError, ValueError) as err:
        raise ConfigError("--encoder", f"unknown encoder {name!r}; presets: {', '.join(ENCODERS)}, a timm model "
                                       "name or a local folder") from err
    return TilePreprocessing.from_timm(dict(model.pretrained_cfg or {}))


def load_tile_encoder(name: str, image_tokens: int = 5, pretrained: bool = True, seed: int = 0) -> TileEncoder:
    """Build a ``tile-encoder`` preset (the real one with its hub weights), a timm model name or a local folder.

    Random weights (a tiny twin, or ``pretrained=False``) come from ``seed``, whatever the global RNG state, so
    train, evaluate and submit rebuild the same encoder. ``encoder.preprocessing`` is the encoder's own.
    """
    import timm

    folder = None if name in ENCODERS else _local_folder(name)
    if folder is not None:
        return _load_local(folder, image_tokens)
    if name in ENCODERS:
        preset = get_preset(name, "tile-encoder", "--encoder")
        options = dict(preset.options)
        use_weights = pretrained and preset.has_pretrained_weights
        preprocessing, tokens = preset_preprocessing(options), options.get("tokens", "cls")
    else:
        options, use_weights, tokens, preprocessing = {}, pretrained, "cls", None
    try:
        if options and not use_weights:
            backbone = _seeded(lambda: build_tile_backbone(options), seed)
            if options.get("backend") == "transformers":
                backbone = HFDinov2Backbone(backbone)
        elif options.get("backend") == "transformers":
            from transformers import Dinov2Model

            from common.hf import load_pretrained

            backbone = HFDinov2Backbone(load_pretrained(Dinov2Model, options["hf"]))
        elif options:
            _, kwargs = timm_arguments(options)
            layers = {k: v for k, v in kwargs.items() if k in options.get("layers", {})}
            backbone = timm.create_model(options["hub"], pretrained=True, num_classes=0, **layers)
        elif use_weights:
            backbone = timm.create_model(name, pretrained=True, num_classes=0)
        else:
            backbone = _seeded(lambda: timm.create_model(name, pretrained=False, num_classes=0), seed)
    except (OSError, RuntimeError, ValueError) as err:
        if name in ENCODERS or "Unknown model" not in str(err):
            raise ConfigError("--encoder", f"{name} cannot be loaded here ({_first_line(err)}); it needs the hub or "
                                           "a local cache (gated models: accept the terms and log in), or a local "
                                           "checkpoint folder; offline: its tiny twin") from err
        raise ConfigError("--encoder", f"unknown encoder {name!r}; presets: {', '.join(ENCODERS)}, a timm model "
                                       "name or a local folder") from err
    _check_vit(backbone, name)
    if preprocessing is None:
        preprocessing = TilePreprocessing.from_timm(dict(getattr(backbone, "pretrained_cfg", None) or {}))
    return TileEncoder(backbone.eval(), name, image_tokens, pretrained=use_weights, preprocessing=preprocessing,
                       tokens=tokens, seed=None if use_weights else seed)


LORA_TARGETS = r".*blocks\.\d+\.attn\.(qkv|proj)"
"""The attention input (qkv) and output (proj) projections of every ViT block (not the patch embedding's proj)."""


def add_lora(encoder: TileEncoder, rank: int, alpha: int, dropout: float = 0.0) -> TileEncoder:
    """Freeze the encoder and add LoRA adapters (peft) to its attention projections; only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model

    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    targets = getattr(encoder, "lora_targets", LORA_TARGETS)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
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


def normalize_pixels(pixels: torch.Tensor, normalize: str = DEFAULT_NORMALIZE,
                     preprocessing: TilePreprocessing = PROV_GIGAPATH_PREPROCESSING) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float: ``config`` the encoder's own mean/std (``preprocessing``), ``imagenet`` the
    ImageNet mean/std, ``seed`` the seed's bare /255."""
    if normalize not in NORMALIZATIONS:
        raise ConfigError("--normalize", f"choose one of {', '.join(NORMALIZATIONS)}, not {normalize!r}")
    x = pixels.float() / 255.0
    if normalize != "seed":
        mean, std = (preprocessing.mean, preprocessing.std) if normalize == "config" else (IMAGENET_MEAN,
                                                                                           IMAGENET_STD)
        x = (x - torch.tensor(mean, device=x.device).view(3, 1, 1)) / torch.tensor(std, device=x.device).view(3, 1, 1)
    return x


def preprocess(image: Image.Image, normalize: str = DEFAULT_NORMALIZE,
               preprocessing: TilePreprocessing = PROV_GIGAPATH_PREPROCESSING) -> torch.Tensor:
    """The encoder's input: resize, centre crop, then its mean/std (or ImageNet's, or the seed's /255)."""
    return normalize_pixels(crop_pixels(image, preprocessing), normalize, preprocessing)


def read_rgb(path: Path) -> Image.Image:
    """A tile as 8-bit RGB (a 16-bit export rescaled, transparency over white slide background); a missing,
    undecodable or oversized file is one DataError naming it."""
    return read_image_rgb(path, background=255)


def cache_for(encoder: TileEncoder, root: Path, normalize: str) -> FeatureCache:
    """The feature cache of this encoder's weights, preprocessing, normalisation and token layout: the weights'
    fingerprint names the folder and is checked in every shard, so features of other weights never mix in."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", encoder.name.strip("/"))[-60:]
    namespace = f"{safe}-{normalize}-t{encoder.image_tokens}-{encoder.fingerprint[:16]}"
    return FeatureCache(root, namespace, {"encoder": encoder.name, "normalize": normalize, "dim": str(encoder.dim),
                                          "image_tokens": str(encoder.image_tokens), "weights": encoder.fingerprint,
                                          "tokens": encoder.tokens, "preprocessing": json.dumps(
                                              encoder.preprocessing.to_json(), sort_keys=True)})


__all__ = ["ENCODERS", "NORMALIZATIONS", "DEFAULT_NORMALIZE", "TileEncoder", "TilePreprocessing",
           "PROV_GIGAPATH_PREPROCESSING", "HFDinov2Backbone", "load_tile_encoder", "encoder_preprocessing",
           "preset_preprocessing", "run_preprocessing", "weights_fingerprint", "add_lora", "LORA_TARGETS",
           "preprocess", "crop_pixels", "normalize_pixels", "read_rgb", "cache_for", "check_image_tokens"]

