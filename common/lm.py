"""Text-only causal language models (``lm`` presets, save_pretrained folders, hub ids), loaded through ``common.hf``.

    python -c "from common.lm import load_causal_lm; print(load_causal_lm('tiny-gemma3-text')[0])"

The LM counterpart of ``common.vlm``: an ``lm`` preset resolves to a local folder (``gemma3-270m``: converted once
from its pip package into medvl's cache, see ``common.gguf_lm``), a hub id, or a tiny twin built from a seed, and
loads as ``AutoModelForCausalLM`` with its tokenizer, at full precision or 4/8-bit through the project's one
``BitsAndBytesConfig``. A tiny twin quantizes through a temporary save, so its 4-bit path is the real one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import hf
from common.device import compute_dtype
from common.presets import get_preset, preset_names

LM_PRESETS = tuple(preset_names("lm"))


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``--precision`` as a dtype (``auto``: bf16 on GPUs that have it, fp32 on CPU)."""
    return {"auto": compute_dtype(device), "fp32": torch.float32, "bf16": torch.bfloat16,
            "fp16": torch.float16}[precision]


def is_text_only_folder(name: str | Path) -> bool:
    """True for a local save_pretrained folder of a causal LM (its config.json has no vision part)."""
    config = Path(str(name)).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        record = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "vision_config" not in record and "text_config" not in record


def lm_source(name: str, cache_dir: str | Path | None = None, flag: str = "--lm") -> str | None:
    """The folder or hub id an ``lm`` preset (or a folder / hub id) loads from; None for a tiny twin built in memory.
    A packaged preset's folder is made here on first use."""
    if name in LM_PRESETS:
        preset = get_preset(name, "lm", flag)
        if preset.build is not None:
            return None
        return str(preset.folder(cache_dir)) if preset.folder is not None else preset.source
    return name


def load_causal_lm(name: str, *, quantization: str = "none", device: torch.device | str = "cpu",
                   precision: str = "auto", cache_dir: str | Path | None = None, seed: int = 0,
                   flag: str = "--lm") -> tuple[torch.nn.Module, Any]:
    """(causal LM in eval mode, tokenizer) for an ``lm`` preset, a save_pretrained folder or a hub id."""
    device = torch.device(device)
    dtype = precision_dtype(precision, device)
    source = lm_source(name, cache_dir, flag)
    if source is None:
        build = get_preset(name, "lm", flag).build
        if quantization == "none":
            model, tokenizer = build(seed=seed)
            return model.to(device=device, dtype=dtype).eval(), tokenizer
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
            model, tokenizer = build(seed=seed)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            return _load(tmp, quantization, device, dtype, None)
    return _load(source, quantization, device, dtype, cache_dir)


def _load(source: str, quantization: str, device: torch.device, dtype: torch.dtype, cache_dir) -> tuple[Any, Any]:
    model = hf.load_pretrained(AutoModelForCausalLM, source, quantization=quantization, dtype=dtype, device=device,
                               cache_dir=cache_dir)
    tokenizer = hf.load_processor(AutoTokenizer, source, cache_dir=cache_dir)
    return model, tokenizer


def load_lm_tokenizer(name: str, cache_dir: str | Path | None = None, flag: str = "--lm") -> Any:
    """The tokenizer of an ``lm`` preset, folder or hub id, without loading the model."""
    source = lm_source(name, cache_dir, flag)
    if source is None:
        return get_preset(name, "lm", flag).build(seed=0)[1]
    return hf.load_processor(AutoTokenizer, source, cache_dir=cache_dir)


__all__ = ["LM_PRESETS", "load_causal_lm", "load_lm_tokenizer", "lm_source", "is_text_only_folder",
           "precision_dtype"]
