"""Tile + caption classifier: projections to a shared width, cross-attention layers, K averaged heads.

    python -c "from pathology_brats.model import TileCaptionClassifier as M; print(M(64, 32, 9))"

Image tokens (the encoder's class token and pooled patch tokens) and caption token states (frozen text encoder) are
projected to ``width`` (512). Each cross-attention layer lets one stream attend to the other, then adds a residual,
a LayerNorm and a feed-forward block (the seed had no FFN). ``text-to-image`` is the seed's direction (caption
tokens query the image; pooled at the first caption token); ``image-to-text`` pools at the class token; ``both``
runs the two and concatenates. ``--modality image`` or ``text`` drops the other stream (mean of its tokens) for the
ablation. K heads (LayerNorm -> ReLU -> Dropout -> Linear) see the same pooled vector through their own dropout and
weights; their logits are averaged (K = 1 is the seed).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from common.errors import ConfigError

MODALITIES = ("fused", "image", "text")
DIRECTIONS = ("text-to-image", "image-to-text", "both")


class CrossBlock(nn.Module):
    """Queries attend to a context; residual + LayerNorm, then FFN + residual + LayerNorm."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, context: torch.Tensor,
                context_padding: torch.Tensor | None = None) -> torch.Tensor:
        attended, _ = self.attention(queries, context, context, key_padding_mask=context_padding,
                                     need_weights=False)
        x = self.norm1(queries + self.dropout(attended))
        return self.norm2(x + self.dropout(self.ffn(x)))


def streaming_moments(rows, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (unbiased) std over every token of ``rows`` (a lazy ``CachedTensors``: (T, D) rows, or
    ragged (L_i, D) ones, whose tokens are all real: no padding to leave out), read ``batch_size`` rows at a time.

    Each batch's mean and sum of squared deviations are merged in float64 (Chan et al.'s pairwise update), which
    equals the in-memory two-pass result to float32 precision without holding the tokens."""
    count, mean, m2 = 0, None, None
    for batch in rows.batches(batch_size):
        flat = torch.cat(list(batch)) if isinstance(batch, list) else batch.reshape(-1, batch.shape[-1])
        flat = flat.double()
        if not len(flat):
            continue
        n, batch_mean = len(flat), flat.mean(0)
        batch_m2 = ((flat - batch_mean) ** 2).sum(0)
        if mean is None:
            count, mean, m2 = n, batch_mean, batch_m2
            continue
        delta, total = batch_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + batch_m2 + delta**2 * (count * n / total)
        count = total
    if mean is None:
        raise ValueError("no tokens to standardise")
    std = (m2 / max(count - 1, 1)).sqrt() if count > 1 else torch.full_like(mean, float("nan"))
    return mean.float(), std.float()


class TileCaptionClassifier(nn.Module):
    """Logits (B, C) from image tokens (B, T, Di) and/or caption tokens (B, L, Dt) with their mask."""

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, modality: str = "fused",
                 direction: str = "text-to-image", width: int = 512, layers: int = 2, attention_heads: int = 8,
                 heads: int = 1, dropout: float = 0.1):
        super().__init__()
        if modality not in MODALITIES:
            raise ConfigError("--modality", f"choose one of {', '.join(MODALITIES)}, not {modality!r}")
        if direction not in DIRECTIONS:
            raise ConfigError("--fusion-direction", f"choose one of {', '.join(DIRECTIONS)}, not {direction!r}")
        if heads < 1:
            raise ConfigError("--heads", f"needs at least one head, not {heads}")
        self.modality, self.direction = modality, direction
        # Per-feature standardisation of each stream, fitted on the training split (identity until then): frozen
        # foundation-model features are far from zero-mean, unit-variance, and a linear projection trains poorly on
        # them without it (the usual linear-probe practice). Saved with the weights.
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("text_std", torch.ones(text_dim))
        self.image_proj = nn.Linear(image_dim, width) if modality != "text" else None
        self.text_proj = nn.Linear(text_dim, width) if modality != "image" else None
        pooled = width
        if modality == "fused":
            streams = ("t2i", "i2t") if direction == "both" else (("t2i",) if direction == "text-to-image" else
                                                                  ("i2t",))
            self.blocks = nn.ModuleDict({s: nn.ModuleList(CrossBlock(width, attention_heads, dropout)
                                                          for _ in range(layers)) for s in streams})
            pooled = width * len(streams)
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(pooled), nn.ReLU(), nn.Dropout(dropout),
                                                 nn.Linear(pooled, num_classes)) for _ in range(heads))

    @torch.no_grad()
    def fit_standardization(self, image=None, text=None, text_mask: torch.Tensor | None = None) -> None:
        """Set each stream's per-feature mean and std from training tokens (text padding left out).

        Tensors are reduced in memory as before; lazy ``CachedTensors`` (the cached features) in one streaming pass,
        a batch at a time (``streaming_moments``), so memory does not grow with the number of tiles."""
        if image is not None and self.image_proj is not None:
            if isinstance(image, torch.Tensor):
                flat = image.reshape(-1, image.shape[-1]).float()
                mean, std = flat.mean(0), flat.std(0)
            else:
                mean, std = streaming_moments(image)
            self.image_mean.copy_(mean)
            self.image_std.copy_(std.clamp_min(1e-6))
        if text is not None and self.text_proj is not None:
            if isinstance(text, torch.Tensor):
                flat = text.reshape(-1, text.shape[-1]).float()
                if text_mask is not None:
                    flat = flat[text_mask.reshape(-1)]
                mean, std = flat.mean(0), flat.std(0)
            else:
                mean, std = streaming_moments(text)
            self.text_mean.copy_(mean)
            self.text_std.copy_(std.clamp_min(1e-6))

    def pooled(self, image: torch.Tensor | None, text: torch.Tensor | None,
               text_mask: torch.Tensor | None) -> torch.Tensor:
        if image is not None:
            image = (image - self.image_mean.to(image.dtype)) / self.image_std.to(image.dtype)
        if text is not None:
            text = (text - self.text_mean.to(text.dtype)) / self.text_std.to(text.dtype)
        if self.modality == "image":
            return self.image_proj(image).mean(1)
        padding = ~text_mask if text_mask is not None else None
        if self.modality == "text":
            states = self.text_proj(text)
            weights = text_mask.unsqueeze(-1).to(states.dtype)
            return (states * weights).sum(1) / weights.sum(1).clamp_min(1)
        image_tokens, text_tokens = self.image_proj(image), self.text_proj(text)
        out = []
        if "t2i" in self.blocks:
            x = text_tokens
            for block in self.blocks["t2i"]:
                x = block(x, image_tokens)
            out.append(x[:, 0])
        if "i2t" in self.blocks:
            x = image_tokens
            for block in self.blocks["i2t"]:
                x = block(x, text_tokens, padding)
            out.append(x[:, 0])
        return torch.cat(out, -1)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.pooled(image, text, text_mask)
        return torch.stack([head(pooled) for head in self.heads]).mean(0)


class EncoderClassifier(nn.Module):
    """The tile encoder and the classifier as one model, for ``--encoder-mode full`` (the encoder is trained too)."""

    def __init__(self, encoder: nn.Module, classifier: TileCaptionClassifier, normalize: str = "config"):
        super().__init__()
        self.encoder, self.classifier, self.normalize = encoder, classifier, normalize

    def rebuilt_keys(self) -> set[str]:
        """State keys not saved with a run: frozen pretrained encoder weights (LoRA's base layers), which the
        encoder's source rebuilds; a randomly initialised (tiny) encoder is saved whole."""
        if not getattr(self.encoder, "pretrained", False):
            return set()
        frozen = {f"encoder.{n}" for n, p in self.encoder.named_parameters() if not p.requires_grad}
        return frozen | {f"encoder.{n}" for n, _ in self.encoder.named_buffers()}

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, pixels: torch.Tensor | None = None) -> torch.Tensor:
        from pathology_brats.encoder import PROV_GIGAPATH_PREPROCESSING, normalize_pixels

        if pixels is not None:
            preprocessing = getattr(self.encoder, "preprocessing", PROV_GIGAPATH_PREPROCESSING)
            image = self.encoder(normalize_pixels(pixels, self.normalize, preprocessing))
        return self.classifier(image=image, text=text, text_mask=text_mask)


def build_classifier(kwargs: dict) -> TileCaptionClassifier:
    return TileCaptionClassifier(**kwargs)


def build_run_model(meta: dict) -> nn.Module:
    """Rebuild a run's model from ``model.json``: the classifier, with its encoder when that was trained."""
    classifier = build_classifier(meta["kwargs"])
    mode = meta["data"].get("encoder_mode", "frozen")
    if mode == "frozen":
        return classifier
    from pathology_brats.encoder import add_lora, load_tile_encoder, run_preprocessing

    data = meta["data"]
    # LoRA runs saved only the adapters over a pretrained backbone: rebuild that backbone from its source.
    encoder = load_tile_encoder(data["encoder"], data["image_tokens"], pretrained=mode == "lora")
    encoder.preprocessing = run_preprocessing(data.get("preprocessing"))  # the run's own (old runs: GigaPath's)
    if mode == "lora":
        encoder = add_lora(encoder, data["lora_r"], data["lora_alpha"])
    return EncoderClassifier(encoder, classifier, data["normalize"])


__all__ = ["MODALITIES", "DIRECTIONS", "streaming_moments", "CrossBlock", "TileCaptionClassifier",
           "EncoderClassifier", "build_classifier", "build_run_model"]
