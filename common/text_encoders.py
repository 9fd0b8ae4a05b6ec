"""Frozen Hugging Face text encoders named by ``text-encoder`` presets (or a local HF directory).

    python -c "from common.text_encoders import load_text_encoder as l; print(l('minilm').encode(['no edema']).shape)"

Shared by every pipeline that embeds text with a frozen encoder (report-conditioned segmentation, disease
descriptions). Pooling is a property of the weights: CLIP's ``pooler`` output, the mean of BERT token states, or
BERT's ``[CLS]`` state (as MAVL and Bio_ClinicalBERT-based work embed one sentence). A preset states it; a local
folder takes it from its sentence-transformers pooling config, from the preset whose hub cache it is
(``models--owner--name``), or from the caller (``pooling=``), else the mean (CLIP: ``pooler``). A WordPiece
tokenizer whose vocabulary is cased keeps case even when its config leaves ``do_lower_case`` at BERT's default
(Bio_ClinicalBERT ships no tokenizer config, so ``AutoTokenizer`` would lower-case text it was trained on cased).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.errors import ConfigError, DataError
from common.presets import get_preset, list_presets, minilm_dir, preset_names

POOLINGS = ("pooler", "mean", "cls")
log = logging.getLogger("medvl.text")


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


def load_text_encoder(spec: str, *, cache_dir: Path | None = None, device: str | torch.device = "cpu",
                      pooling: str | None = None) -> TextEncoder:
    """Build the frozen text encoder named by a ``text-encoder`` preset or a local HF directory.

    ``pooling`` overrides the weights' own (``cls`` or ``mean`` for a BERT, ``pooler`` for CLIP); None keeps it.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    from common import hf

    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError("--text-pooling", f"choose one of {', '.join(POOLINGS)}, not {pooling!r}")
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
            return TextEncoder(model, tokenizer, pooling or preset.options["pooling"], spec, device)
        source = minilm_dir() if preset.source.startswith("package:") else preset.source
    try:
        if isinstance(source, Path):
            if not (source / "config.json").is_file():
                raise DataError(source, "not a Hugging Face model folder: no config.json (save it with "
                                        "save_pretrained)")
            hf.refuse_pickled_weights(source)
            config = AutoConfig.from_pretrained(str(source))
            is_clip = config.model_type in ("clip", "clip_text_model")
        else:
            is_clip = preset.options["pooling"] == "pooler"
        cls = CLIPTextModel if is_clip else AutoModel
        model = hf.load_pretrained(cls, source, cache_dir=cache_dir, refuse_missing_weights=True,
                                   optional_weights=("pooler.",))
        tokenizer = keep_case(hf.load_processor(AutoTokenizer, source, cache_dir=cache_dir), source, cache_dir)
    except ConfigError as err:
        if preset is not None and not preset.offline:
            raise ConfigError("--text-encoder", f"{spec} ({preset.source}) is not cached and the hub is "
                                                f"unreachable; offline choices: {offline_text_choices()}") from err
        raise
    except (OSError, ValueError) as err:
        raise DataError(source, f"cannot load a text encoder from here ({str(err).splitlines()[0]})") from err
    if pooling is None:
        pooling = preset.options["pooling"] if preset is not None else folder_pooling(source, is_clip)
    return TextEncoder(model, tokenizer, pooling, spec, device)


def folder_pooling(folder: Path, is_clip: bool) -> str:
    """The pooling a local folder's weights were made for (see the module docstring for the order)."""
    if is_clip:
        return "pooler"
    pooling_config = folder / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        try:
            modes = json.loads(pooling_config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(pooling_config, f"not valid JSON ({err})") from err
        if modes.get("pooling_mode_cls_token"):
            return "cls"
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
    for part in folder.resolve().parts:
        if part.startswith("models--"):
            # a Hugging Face cache folder: the weights of the text-encoder preset published under that hub id
            by_hub_id = {preset.source: preset for preset in list_presets("text-encoder")}
            stands_in_for = by_hub_id.get(part[len("models--"):].replace("--", "/"))
            if stands_in_for is not None:
                return stands_in_for.options["pooling"]
    log.warning("%s: pooling not stated by the folder; using the mean of token states (pass the pooling its "
                "weights were trained for, e.g. --text-pooling cls for a Bio_ClinicalBERT copy)", folder)
    return "mean"


def weights_pooling(spec: str, pooling: str | None = None) -> str:
    """The pooling ``load_text_encoder(spec, pooling=pooling)`` uses, without loading the weights."""
    if pooling is not None:
        return pooling
    folder = Path(spec).expanduser()
    if folder.is_dir():
        try:
            model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise DataError(folder, "not a Hugging Face model folder: no readable config.json (save it with "
                                    "save_pretrained)") from err
        return folder_pooling(folder, model_type in ("clip", "clip_text_model"))
    return get_preset(spec, "text-encoder", "--text-encoder").options["pooling"]


def vocabulary_is_cased(tokenizer) -> bool:
    """True when more than 1% of the vocabulary's ordinary tokens hold an upper-case letter."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    words = [t for t in vocab if not (t.startswith("[") and t.endswith("]")) and not t.startswith("<")]
    return bool(words) and sum(any(c.isupper() for c in t) for t in words) > 0.01 * len(words)


def keep_case(tokenizer, source: str | Path, cache_dir: Path | None):
    """Reload a lower-casing WordPiece tokenizer without lower-casing when its vocabulary is cased."""
    from transformers import AutoTokenizer

    from common import hf

    if getattr(tokenizer, "do_lower_case", False) and vocabulary_is_cased(tokenizer):
        log.info("%s: cased vocabulary; the tokenizer keeps case", source)
        return hf.load_processor(AutoTokenizer, source, cache_dir=cache_dir, do_lower_case=False)
    return tokenizer


__all__ = ["POOLINGS", "TextEncoder", "load_text_encoder", "offline_text_choices", "text_presets", "folder_pooling",
           "weights_pooling", "vocabulary_is_cased", "keep_case"]
