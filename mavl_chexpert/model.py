"""Phase-1 image model (timm ViT + low-rank projection), the LRF terms, and the phase-3 similarity fusion.

    python -c "from mavl_chexpert.model import build_image_model; print(build_image_model('vit-tiny', 5))"

Phase 1: ViT -> pooled feature (CLS or mean of patch tokens) -> LayerNorm -> Linear(D -> r, no bias) -> ReLU ->
Dropout -> Linear(r -> C). The r-dimensional ReLU output is the image embedding phase 3 builds on.

LRF (Low-Rank Feature learning, arXiv 2404.18933) penalises the truncated nuclear norm of the training features:
the singular values of the (N x D) matrix of all training features beyond a rank. A batch of 16 has only 16
singular values, so, as in LRFL's code, the decomposition F = U S V^T of the whole training split is computed
once per epoch without gradient; batch b then adds its share diag(U[b]^T F_b V)_j for j >= rank, which is
differentiable in F_b and sums over an epoch to sum_{j >= rank} S_j when F has not moved (``tail_term``).
``lrfl_term`` is LRFL's code as written (the L1 of the shares per batch, and Vh where the algebra wants V);
``seed_term`` is the seed notebook's formula (the sum of every entry of U_r^T F V_r^T over the batch's top-r
singular directions), equal to theirs in value and gradient.

Phase 3 projects the image embedding and every aspect-sentence embedding into a shared 256-d space, takes the
cosine similarity of the image with each aspect of each disease, aggregates over a disease's aspects (mean, or
attention), and scales by a learnable temperature plus a bias (the seed used the raw cosine, ``--similarity seed``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError

from common.errors import ConfigError, DataError
from common.images import IMAGENET_MEAN, IMAGENET_STD
from common.presets import build_timm, get_preset, preset_names

BACKBONES = tuple(preset_names("vit"))
POOLS = ("cls", "mean", "mean-fc-norm")
LRF_VARIANTS = ("tail", "lrfl", "seed", "none")
AGGREGATIONS = ("mean", "attention")
FUSIONS = ("similarity", "mavl")
ASPECT_COMBINES = ("concat", "all", "shared")
SIMILARITIES = ("scaled", "seed")
SHARED_DIM = 256
HIDDEN_DIM = 128


TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"


def local_backbone_dir(name: str | Path) -> Path | None:
    """``name`` as a local timm folder (``config.json`` + ``model.safetensors``, timm's hub layout), or None when it
    names a preset. A folder in another layout is one DataError naming it."""
    if str(name) in BACKBONES:
        return None
    folder = Path(name).expanduser()
    if not folder.exists():
        raise ConfigError("--backbone", f"{name!r} is neither a vit preset ({', '.join(BACKBONES)}) nor a folder")
    if not folder.is_dir():
        raise DataError(folder, "expected a timm weights folder (config.json + model.safetensors), got a file")
    config_file = folder / TIMM_CONFIG
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(folder, "not a timm weights folder: no config.json (save with "
                                "timm.models.save_for_hf, or pass a vit preset)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(config_file, f"not valid JSON ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise DataError(config_file, "not a timm config: no 'architecture' (a Hugging Face transformers folder is "
                                     "not a timm ViT)")
    if not (folder / TIMM_WEIGHTS).is_file():
        raise DataError(folder, f"no {TIMM_WEIGHTS} (timm's layout; pickled checkpoints are never loaded)")
    return folder


def timm_architecture(name: str | Path) -> dict[str, Any]:
    """``{"model_name", **timm kwargs}`` that rebuild ``name``'s network without its weights (stored in model.json,
    so evaluating a run never needs the folder it started from)."""
    folder = local_backbone_dir(name)
    if folder is None:
        return dict(get_preset(str(name), "vit", "--backbone").options)
    config = json.loads((folder / TIMM_CONFIG).read_text(encoding="utf-8"))
    options = {key: value for key, value in dict(config.get("model_args") or {}).items() if key != "num_classes"}
    return {"model_name": config["architecture"], **options}


def build_backbone(name: str | Path, pretrained: bool = False, cache_dir: str | Path | None = None,
                   architecture: dict[str, Any] | None = None) -> nn.Module:
    """A timm ViT (no classifier head) from a ``vit`` preset or a local timm folder.

    ``pretrained`` loads the weights: a preset's from timm's hub cache (``cache_dir`` overrides its location), a
    folder's own ``model.safetensors``. ``architecture`` (from ``timm_architecture``) rebuilds without weights.
    """
    import timm

    if architecture is not None and not pretrained:
        return build_timm(architecture, num_classes=0)
    folder = local_backbone_dir(name)
    if folder is not None:
        try:
            return timm.create_model(f"local-dir:{folder.resolve()}", pretrained=pretrained, num_classes=0)
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as err:
            raise DataError(folder, f"timm cannot load these weights ({str(err).splitlines()[0][:160]})") from err
    options = timm_architecture(name)
    if not pretrained:  # a preset at random weights: the registry's builder (what its parameter count counts)
        return build_timm(options, num_classes=0)
    model_name = options.pop("model_name")
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0,
                                 cache_dir=None if cache_dir is None else str(cache_dir), **options)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        first = str(err).splitlines()[0][:160]
        where = f"in --cache-dir {cache_dir}" if cache_dir is not None else "cached"
        raise ConfigError("--pretrained", f"ImageNet weights of {model_name} are not {where} and the hub is "
                                          f"unreachable ({first}); pass --no-pretrained to train from scratch, "
                                          "or a local timm folder as --backbone") from err


def preprocessing_from_backbone(backbone: nn.Module, pretrained: bool = True) -> dict[str, Any]:
    """Input size, mean/std and interpolation from the backbone's timm ``pretrained_cfg`` (what its weights expect).

    The size is the network's own (``patch_embed.img_size``: a tiny preset's 64 px, not its class's 224). A backbone
    that loads no weights (a tiny preset, ``--no-pretrained``) has no such expectation and keeps ImageNet's
    statistics and a bilinear resize, what every medvl run used before.
    """
    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {}) if pretrained else {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    interpolation = cfg.get("interpolation") or "bilinear"
    source = ("timm pretrained_cfg" + (f" ({cfg['hf_hub_id']})" if cfg.get("hf_hub_id") else "")) if cfg else \
        "no weights loaded: ImageNet statistics, bilinear"
    return {"image_size": int(backbone.patch_embed.img_size[0]), "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "interpolation": str(interpolation), "source": source}


class ImageModel(nn.Module):
    """ViT -> pooled feature -> LayerNorm -> low-rank projection (ReLU) -> dropout -> linear head."""

    def __init__(self, backbone: str, num_classes: int, rank: int = 64, pool: str = "cls", dropout: float = 0.1,
                 pretrained: bool = False, cache_dir: str | Path | None = None,
                 architecture: dict[str, Any] | None = None):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError("--pool", f"choose one of {', '.join(POOLS)}, not {pool!r}")
        self.backbone = build_backbone(backbone, pretrained, cache_dir, architecture)
        self.pool = pool
        dim = int(self.backbone.embed_dim)
        if pool == "mean-fc-norm":
            # LRFL (MAE fine-tuning's global pool): the last block's patch tokens are averaged, then a fresh
            # LayerNorm (fc_norm) replaces the encoder's final norm.
            self.backbone.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_dim, self.rank, self.num_classes = dim, rank, num_classes
        self.norm = nn.LayerNorm(dim)
        self.project = nn.Linear(dim, rank, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(rank, num_classes)

    @property
    def image_size(self) -> int:
        return int(self.backbone.patch_embed.img_size[0])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled ViT features: what the LRF term decomposes."""
        tokens = self.backbone.forward_features(images)
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        if self.pool == "cls":
            return tokens[:, 0]
        pooled = tokens[:, prefix:].mean(1)
        return self.fc_norm(pooled) if self.pool == "mean-fc-norm" else pooled

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P, D) the ViT's final patch tokens (prefix tokens dropped): what MAVL's aspect queries attend over."""
        tokens = self.backbone.forward_features(images)
        return tokens[:, int(getattr(self.backbone, "num_prefix_tokens", 1)):]

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, r) low-rank image embedding (phase 3's input)."""
        return F.relu(self.project(self.norm(features)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(images))

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """Logits (B, C), or ``(logits, features)`` for the LRF term (one call, so DDP sees one forward)."""
        features = self.features(images)
        logits = self.head(self.dropout(self.embed_features(features)))
        return (logits, features) if return_features else logits


def build_image_model(backbone: str, num_classes: int, **kwargs: Any) -> ImageModel:
    return ImageModel(backbone, num_classes, **kwargs)


# --- LRF ----------------------------------------------------------------------------------------------------------

def feature_basis(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the (N, D) training features, ``(U (N, k), S (k,), V (D, k))`` with F = U diag(S) V^T."""
    u, s, vh = torch.linalg.svd(features.detach().double(), full_matrices=False)
    return u.float(), s.float(), vh.T.contiguous().float()


def tail_term(u_batch: torch.Tensor, features: torch.Tensor, v: torch.Tensor, rank: int) -> torch.Tensor:
    """sum_{j >= rank} diag(U[b]^T F_b V)_j: this batch's share of the truncated nuclear norm (medvl's ``tail``).

    Args:
        u_batch: rows of the epoch's U for the batch's samples, (B, k).
        features: the batch's current features, (B, D), with gradient.
        v: the epoch's right singular vectors as columns, (D, k).
        rank: directions kept free; the ones after it are penalised.
    """
    if rank >= v.shape[1]:
        return features.sum() * 0.0
    return tail_shares(u_batch[:, rank:], features, v[:, rank:]).sum()


def tail_shares(u_tail: torch.Tensor, features: torch.Tensor, v_tail: torch.Tensor) -> torch.Tensor:
    """(k - rank,) per-direction shares diag(U_tail[b]^T F_b V_tail) of one batch, computed without forming the
    (k, k) product: column j is sum_i U[i, j] (F_b V_tail)[i, j]."""
    return (u_tail * (features.float() @ v_tail)).sum(0)


def lrfl_term(u_tail: torch.Tensor, features: torch.Tensor, vh_cols_tail: torch.Tensor) -> torch.Tensor:
    """LRFL's ``trucated_nuclear_loss`` as its code computes it: || diag(U[b]^T F_b Vh)[rank:] ||_1.

    The L1 is taken per batch (absolute value of each direction's batch share), and the product is with ``Vh``
    (scipy's right factor, rows = singular vectors) as the code writes it, not with ``Vh^T``: ``vh_cols_tail`` is
    ``Vh[:, rank:]``, which needs the square ``Vh`` of N >= D training features.
    """
    return tail_shares(u_tail, features, vh_cols_tail).abs().sum()


def seed_term(features: torch.Tensor, rank: int) -> torch.Tensor:
    """The seed's ``torch.sum((U.T @ features) @ V.T)`` with U, V = the batch's top-``rank`` singular vectors.

    The SVD is taken without gradient in the features' float precision as the seed's ``compute_uv`` does; every
    entry of the (r, r) matrix is summed, so the value is the sum of the top singular values (the off-diagonal
    entries are zero) while the gradient is the rank-1 (U_r 1)(V_r^T 1)^T, which depends on the SVD's signs.
    """
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(features.detach().float(), full_matrices=False)
    r = min(rank, u.shape[1])
    u_r, v_r = u[:, :r], vh[:r]
    # sum_{a,b} (U_r^T F V_r^T)_{ab} = (U_r 1)^T F (V_r^T 1): the same sum without the (r, D) intermediate.
    return u_r.sum(1) @ features.float() @ v_r.sum(0)


# --- phase 3 ------------------------------------------------------------------------------------------------------

def _projector(in_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, HIDDEN_DIM), nn.LayerNorm(HIDDEN_DIM), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(HIDDEN_DIM, SHARED_DIM))


class FusionModel(nn.Module):
    """Image embedding vs. the aspect sentences of every disease: one logit per disease.

    ``aspects`` (C, A, Dt) and ``aspect_mask`` (C, A) are buffers saved with the model, so evaluation needs no text
    encoder; diseases held out of training still get a logit from their descriptions (zero-shot).
    """

    def __init__(self, image_model: ImageModel, aspects: torch.Tensor, aspect_mask: torch.Tensor,
                 aggregation: str = "mean", similarity: str = "scaled", dropout: float = 0.3,
                 freeze_image: bool = True, init_temperature: float = 0.07):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ConfigError("--aggregation", f"choose one of {', '.join(AGGREGATIONS)}, not {aggregation!r}")
        if similarity not in SIMILARITIES:
            raise ConfigError("--similarity", f"choose one of {', '.join(SIMILARITIES)}, not {similarity!r}")
        self.image_model = image_model
        self.freeze_image = freeze_image
        if freeze_image:
            image_model.requires_grad_(False)
        image_model.head.requires_grad_(False)  # phase 1's classifier takes no part in fusion (DDP needs every grad)
        self.register_buffer("aspects", aspects.float().clone())
        self.register_buffer("aspect_mask", aspect_mask.bool().clone())
        self.image_projector = _projector(image_model.rank, dropout)
        self.text_projector = _projector(aspects.shape[-1], dropout)
        self.aggregation, self.similarity = aggregation, similarity
        # Only the parameters the chosen variant uses exist: DDP refuses parameters that never get a gradient.
        if similarity == "scaled":
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
            self.bias = nn.Parameter(torch.zeros(()))
        if aggregation == "attention":
            self.attention_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def train(self, mode: bool = True) -> FusionModel:
        super().train(mode)
        if self.freeze_image:
            self.image_model.eval()
        return self

    def similarities(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, C) aggregated cosine similarity of each image with each disease's aspects."""
        image = F.normalize(self.image_projector(embedding), dim=-1)
        text = F.normalize(self.text_projector(self.aspects), dim=-1)
        cosine = torch.einsum("bd,cad->bca", image, text)
        mask = self.aspect_mask.unsqueeze(0)
        if self.aggregation == "mean":
            return (cosine * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        weights = (cosine * self.attention_log_scale.exp()).masked_fill(~mask, float("-inf")).softmax(-1)
        return (weights * cosine).sum(-1)

    def logits_from_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        similarity = self.similarities(embedding)
        if self.similarity == "seed":
            return similarity
        return similarity * self.log_scale.exp().clamp(max=100.0) + self.bias

    def forward(self, images: torch.Tensor | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, C) from images, or from precomputed phase-1 embeddings (frozen backbone)."""
        if embedding is not None:
            return self.logits_from_embedding(embedding)
        if self.freeze_image:
            with torch.no_grad():
                embedding = self.image_model.embed(images)
        else:
            embedding = self.image_model.embed(images)
        return self.logits_from_embedding(embedding)


class AspectAttentionFusion(nn.Module):
    """MAVL's fusion: every aspect sentence of every disease is a query that cross-attends over the image's patch
    tokens; the attended outputs of a disease's aspects are concatenated and one head, shared by all diseases, turns
    them into that disease's logit.

    The attention of aspect slot a is ``softmax_p(exp(t_a) * cos(q, k_p))`` with one learnable temperature per
    aspect (a location sentence may need a sharp, local look, a texture sentence a broad one). The head sees each
    output gated by its own query (``out * q``), so it judges "does what this sentence describes appear here"; as
    it has no per-disease weights, a disease held out of training is scored through its own sentences alone.
    Slot a means the same aspect for every disease (the descriptions list aspects in one order).

    ``combine`` ``all`` replaces the head over the concatenation: one detector, shared by every sentence, scores
    each gated aspect output, and a disease's logit is ``exp(s) * mean_a log sigmoid(z_a) + b`` over its aspect
    sentences (slot 0, the definition, a sentence of one disease only, is left out): the log-probability that every
    aspect it states is there. A head over the concatenation can learn each seen disease's combination of queries as
    a whole; this one scores a combination only through its sentences, so an unseen combination of seen aspects is
    scored as its parts are, and a negative image pushes down the aspects that are absent, not the ones it shows.

    ``combine`` ``shared`` is ``all`` over the sentences that describe more than one disease only (the same text,
    hence the same embedding, in another disease's row; the definition is one disease's sentence by construction).
    A sentence of one disease only cannot transfer to an unseen disease, and on a seen one it becomes a per-disease
    detector through which the shared head can recognise the disease without the shared aspects becoming selective.
    The mask is fixed from the training descriptions (buffer ``aspect_shared``) and moves with a disease's row.
    """

    def __init__(self, image_model: ImageModel, aspects: torch.Tensor, aspect_mask: torch.Tensor,
                 dropout: float = 0.3, freeze_image: bool = True, dim: int = HIDDEN_DIM,
                 init_temperature: float = 0.07, combine: str = "concat"):
        super().__init__()
        if combine not in ASPECT_COMBINES:
            raise ConfigError("--aspect-combine", f"choose one of {', '.join(ASPECT_COMBINES)}, not {combine!r}")
        self.combine = combine
        self.image_model = image_model
        self.freeze_image = freeze_image
        if freeze_image:
            image_model.requires_grad_(False)
        image_model.head.requires_grad_(False)
        self.register_buffer("aspects", aspects.float().clone())
        self.register_buffer("aspect_mask", aspect_mask.bool().clone())
        self.patch_projector = nn.Sequential(nn.LayerNorm(image_model.feature_dim),
                                             nn.Linear(image_model.feature_dim, dim))
        self.query_projector = nn.Sequential(nn.Linear(aspects.shape[-1], HIDDEN_DIM), nn.LayerNorm(HIDDEN_DIM),
                                             nn.ReLU(), nn.Dropout(dropout), nn.Linear(HIDDEN_DIM, dim))
        self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.aspect_log_scale = nn.Parameter(torch.full((aspects.shape[1],), math.log(1.0 / init_temperature)))
        if combine == "shared":
            self.register_buffer("aspect_shared", shared_sentences(aspects, aspect_mask))
        if combine == "concat":
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(aspects.shape[1] * dim, HIDDEN_DIM), nn.ReLU(),
                                      nn.Linear(HIDDEN_DIM, 1))
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, HIDDEN_DIM), nn.ReLU(),
                                      nn.Linear(HIDDEN_DIM, 1))
            # exp(s) * mean log-probability + b starts near a 20% prior when every aspect is at 0.5.
            self.log_scale = nn.Parameter(torch.tensor(math.log(5.0)))
            self.bias = nn.Parameter(torch.tensor(2.0))

    def train(self, mode: bool = True) -> AspectAttentionFusion:
        super().train(mode)
        if self.freeze_image:
            self.image_model.eval()
        return self

    def attend(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(outputs (B, C, A, d), attention (B, C, A, P), queries (C, A, d)) of patch tokens (B, P, D)."""
        patches = self.patch_projector(tokens.float())
        keys = F.normalize(self.key(patches), dim=-1)
        values = self.value(patches)
        queries = self.query_projector(self.aspects)
        scale = self.aspect_log_scale.exp().clamp(max=100.0).view(1, 1, -1, 1)
        attention = (torch.einsum("cad,bpd->bcap", F.normalize(queries, dim=-1), keys) * scale).softmax(-1)
        return torch.einsum("bcap,bpd->bcad", attention, values), attention, queries

    def aspect_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, C, A) ``combine=all``: the shared detector's logit that aspect sentence a of disease c is shown."""
        outputs, _, queries = self.attend(tokens)
        return self.head(outputs * queries.unsqueeze(0)).squeeze(-1)

    def logits_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.combine in ("all", "shared"):
            stated = self.aspect_mask.clone()
            stated[:, 0] = False  # the definition: one disease's own sentence, not a shared aspect
            if self.combine == "shared":
                stated &= self.aspect_shared
            weights = stated.float().unsqueeze(0)
            present = (F.logsigmoid(self.aspect_logits(tokens)) * weights).sum(-1) / weights.sum(-1).clamp_min(1)
            return present * self.log_scale.exp().clamp(max=100.0) + self.bias
        outputs, _, queries = self.attend(tokens)
        gated = outputs * queries.unsqueeze(0) * self.aspect_mask[None, :, :, None]
        return self.head(gated.flatten(2)).squeeze(-1)

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, C) from images, or from precomputed phase-1 patch tokens (frozen backbone)."""
        if tokens is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_image):
                tokens = self.image_model.patch_tokens(images)
        return self.logits_from_tokens(tokens)


SAME_SENTENCE_COSINE = 0.9999
"""Two sentence embeddings this close are one sentence (the same text embeds alike up to float noise)."""


def same_sentences(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) bool: row n of ``a`` (N, D) and row m of ``b`` (M, D) embed the same sentence."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T >= SAME_SENTENCE_COSINE


def shared_sentences(aspects: torch.Tensor, aspect_mask: torch.Tensor) -> torch.Tensor:
    """(C, A) bool: slot (c, a) holds a sentence that also describes another disease (``same_sentences``)."""
    diseases, slots = aspect_mask.shape
    flat = aspects.reshape(diseases * slots, -1)
    same = same_sentences(flat, flat) & aspect_mask.reshape(-1)[None, :] & aspect_mask.reshape(-1)[:, None]
    row = torch.arange(diseases).repeat_interleave(slots)
    other_row = row[None, :] != row[:, None]
    return (same & other_row).any(1).reshape(diseases, slots)


def build_fusion_model(meta_kwargs: dict[str, Any]) -> nn.Module:
    """Rebuild a phase-3 model from ``model.json`` kwargs (weights and aspect buffers come from the safetensors)."""
    image = build_image_model(**meta_kwargs["image"])
    shape = meta_kwargs["aspects_shape"]
    aspects, mask = torch.zeros(shape), torch.ones(shape[:2], dtype=torch.bool)
    if meta_kwargs.get("fusion", "similarity") == "mavl":
        return AspectAttentionFusion(image, aspects, mask, dropout=meta_kwargs["dropout"],
                                     freeze_image=meta_kwargs["freeze_image"],
                                     combine=meta_kwargs.get("aspect_combine", "concat"))
    return FusionModel(image, aspects, mask, aggregation=meta_kwargs["aggregation"],
                       similarity=meta_kwargs["similarity"], dropout=meta_kwargs["dropout"],
                       freeze_image=meta_kwargs["freeze_image"])


__all__ = ["BACKBONES", "POOLS", "LRF_VARIANTS", "AGGREGATIONS", "SIMILARITIES", "FUSIONS", "ASPECT_COMBINES",
           "ImageModel",
           "FusionModel", "AspectAttentionFusion", "build_backbone", "build_image_model", "build_fusion_model",
           "feature_basis", "same_sentences", "shared_sentences", "tail_term", "tail_shares", "lrfl_term", "seed_term",
           "local_backbone_dir", "timm_architecture", "preprocessing_from_backbone"]
