"""Frozen Hugging Face text encoders named by ``text-encoder`` presets (or a local HF directory).

    python -c "from common.text_encoders import load_text_encoder as l; print(l('minilm').encode(['no edema']).shape)"

Shared by every pipeline that embeds text with a frozen encoder (report-conditioned segmentation, disease
descriptions). Pooling comes from the preset: CLIP's ``pooler`` output, the mean of BERT token states, or BERT's
``[CLS]`` state (as MAVL and Bio_ClinicalBERT-based work embed one sentence).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.errors import ConfigError, DataError
from common.presets import get_preset, list_presets, minilm_dir, preset_names

POOLINGS = ("pooler", "mean", "cls")


def text_presets() -> tuple[str, ...]:
    """Names accepted by ``--text-encoder``: the ``text-encoder`` kind of ``common.presets``."""
    return tuple(preset_names("text-encoder"))


class TextEncoder:
    """A frozen Hugging Face text model with its tokenizer; embeddings are cached per unique text."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, name: str, device: str | torch.device = "cpu"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer, self.pooling, self.name, self.device = tokenizer, pooling, name, torch.device(device)
        self.max_length = min(int(getattr(model.config, "max_position_embeddings", 77) or 77), 256)
        self.dim = int(model.config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, dim) float32 CPU embeddings; each distinct text goes through the model once per process."""
        todo = sorted({t for t in texts if t not in self._cache})
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            if self.pooling == "pooler":
                vectors = out.pooler_output
            elif self.pooling == "cls":
                vectors = out.last_hidden_state[:, 0]
            else:
                weights = tokens["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
                vectors = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp_min(1)
            for text, vector in zip(chunk, vectors.float().cpu()):
                self._cache[text] = vector
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

    @torch.no_grad()
    def token_states(self, texts: Sequence[str], max_length: int = 128, batch_size: int = 32) -> list[torch.Tensor]:
        """Per text, its (L_i, dim) last-layer token states (special tokens included, padding removed), float32 CPU.

        For models that attend over the words of a text (cross-attention fusion) rather than one pooled vector.
        """
        out: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=min(max_length, self.max_length),
                                    return_tensors="pt").to(self.device)
            states = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            lengths = tokens["attention_mask"].sum(1).tolist()
            out += [h[:n].float().cpu() for h, n in zip(states.last_hidden_state, lengths)]
        return out

    def table(self, texts: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
        """Unique-text embedding table and each text's row in it (what datasets index into)."""
        unique = sorted(set(texts))
        rows = {t: i for i, t in enumerate(unique)}
        return self.encode(unique), np.array([rows[t] for t in texts], dtype=np.int64)


def offline_text_choices() -> str:
    return ", ".join(p.name for p in list_presets("text-encoder") if p.offline) + ", or a local Hugging Face directory"


def load_text_encoder(spec: str, *, cache_dir: Path | None = None, device: str | torch.device = "cpu") -> TextEncoder:
    """Build the frozen text encoder named by a ``text-encoder`` preset or a local HF directory."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    from common import hf

    if Path(spec).expanduser().is_dir():
        source, preset = Path(spec).expanduser(), None
    else:
        try:
            preset = get_preset(spec, "text-encoder", "--text-encoder")
        except ConfigError as err:
            message = err.message.replace("unknown text-encoder preset", "unknown text encoder")
            raise ConfigError("--text-encoder", f"{message}, or a local Hugging Face directory") from err
        if preset.build is not None:
            model, tokenizer = preset.build(seed=0)
            return TextEncoder(model, tokenizer, preset.options["pooling"], spec, device)
        source = minilm_dir() if preset.source.startswith("package:") else preset.source
    try:
        if isinstance(source, Path):
            config = AutoConfig.from_pretrained(str(source))
            is_clip = config.model_type in ("clip", "clip_text_model")
        else:
            is_clip = preset.options["pooling"] == "pooler"
        cls = CLIPTextModel if is_clip else AutoModel
        model = hf.load_pretrained(cls, source, cache_dir=cache_dir, refuse_missing_weights=True,
                                   optional_weights=("pooler.",))
        tokenizer = hf.load_processor(AutoTokenizer, source, cache_dir=cache_dir)
    except ConfigError as err:
        if preset is not None and not preset.offline:
            raise ConfigError("--text-encoder", f"{spec} ({preset.source}) is not cached and the hub is "
                                                f"unreachable; offline choices: {offline_text_choices()}") from err
        raise
    except (OSError, ValueError) as err:
        raise DataError(source, f"cannot load a text encoder from here ({str(err).splitlines()[0]})") from err
    pooling = preset.options["pooling"] if preset is not None else ("pooler" if is_clip else "mean")
    return TextEncoder(model, tokenizer, pooling, spec, device)


__all__ = ["POOLINGS", "TextEncoder", "load_text_encoder", "offline_text_choices", "text_presets"]
