"""Vision-language models for every pipeline: load by preset, hub id or folder (4-bit through ``common.hf``), chat.

    python -c "from common.vlm import load_vlm; print(load_vlm('tiny-gemma3').source)"

``load_vlm`` resolves ``--vlm`` (a ``vlm`` preset, a ``save_pretrained`` folder or a hub id), ``build_messages``
writes a chat in the Hugging Face multimodal format, and ``generate_reports`` answers a batch greedily (left
padding, so every reply starts at the same column). The tiny preset quantizes through a temporary save, so the
4-bit code path is the real one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Gemma3ForConditionalGeneration

from common import hf
from common.device import compute_dtype
from common.errors import ConfigError
from common.presets import get_preset, preset_names
from common.tiny import save_tiny_gemma3

VLM_PRESETS = tuple(preset_names("vlm"))


def build_messages(image: Image.Image, system: str | None, user: str,
                   text_first: bool = False) -> list[dict[str, Any]]:
    """A chat in the Hugging Face multimodal format: optional system turn, then the image and the question (the
    question before the image with ``text_first``, as some published prompts have it)."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    content = [{"type": "image", "image": image}, {"type": "text", "text": user}]
    messages.append({"role": "user", "content": content[::-1] if text_first else content})
    return messages


@dataclass
class VLM:
    """A loaded vision-language model with its processor and where it came from."""

    model: torch.nn.Module
    processor: Any
    source: str
    memory_bytes: int


def vlm_source(name: str) -> tuple[type, str | None]:
    """(model class, hub id or directory) for ``--vlm``; ``None`` for a tiny preset built in memory."""
    if name in preset_names("vlm"):  # the registry now: a pipeline may register presets after this module loads
        preset = get_preset(name, "vlm", "--vlm")
        return Gemma3ForConditionalGeneration, (None if preset.build is not None else preset.source)
    if Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") == 1:
        return AutoModelForImageTextToText, name
    raise ConfigError("--vlm", f"unknown VLM {name!r}; choose one of {', '.join(preset_names('vlm'))}, a "
                               "save_pretrained directory or a hub id owner/name")


def load_vlm(name: str, quantization: str = "none", device: torch.device | str = "cpu", precision: str = "auto",
             cache_dir: Path | None = None, trust_remote_code: bool = False, seed: int = 0) -> VLM:
    """Resolve ``--vlm`` and load it through ``common.hf`` (the tiny preset quantizes via a temporary save)."""
    device = torch.device(device)
    dtype = {"auto": compute_dtype(device), "fp32": torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16}[precision]
    cls, source = vlm_source(name)
    if source is not None:
        return _load(cls, source, source, quantization, device, dtype, cache_dir, trust_remote_code)
    label = f"{name} (random weights)"
    if quantization == "none":
        model, processor = get_preset(name, "vlm", "--vlm").build(seed=seed, cache_dir=cache_dir)
        model = model.to(device=device, dtype=dtype)
        return VLM(model, processor, label, hf.model_memory_bytes(model))
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        save_tiny_gemma3(Path(tmp), seed)
        return _load(cls, tmp, label, quantization, device, dtype, None, False)


def _load(cls, source: str, label: str, quantization: str, device: torch.device, dtype: torch.dtype,
          cache_dir: Path | None, trust_remote_code: bool) -> VLM:
    model = hf.load_pretrained(cls, source, quantization=quantization, dtype=dtype, cache_dir=cache_dir,
                               trust_remote_code=trust_remote_code, device=device)
    processor = hf.load_processor(AutoProcessor, source, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    return VLM(model, processor, label, hf.model_memory_bytes(model))


def processor_image_size(processor) -> tuple[int, int]:
    """(height, width) the processor resizes images to."""
    size = processor.image_processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    side = int(size.get("shortest_edge", size.get("longest_edge")))
    return side, side


@torch.no_grad()
def generate_reports(vlm: VLM, conversations: list[list[dict]], max_new_tokens: int, seed: int = 0) -> list[str]:
    """Greedy replies to a batch of conversations, padded on the left so every reply starts at the same column."""
    processor = vlm.processor
    processor.tokenizer.padding_side = "left"
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
    device = next(vlm.model.parameters()).device
    inputs = inputs.to(device, dtype=vlm.model.dtype)
    torch.manual_seed(seed)
    output = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    replies = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [reply.strip() for reply in replies]


__all__ = ["VLM", "VLM_PRESETS", "vlm_source", "load_vlm", "processor_image_size", "generate_reports",
           "build_messages"]
