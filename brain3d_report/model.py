"""3D report model: an inflated SigLIP encoder, a Perceiver resampler to 32 tokens, a projector, a frozen Gemma 3 LM.

    python -c "from brain3d_report.model import build_model; print(build_model('siglip-tiny', 'tiny-gemma3'))"

A volume (B, 1, D, H, W) is cut into (depth_patch, p, p) tubelets by a Conv3d inflated from the 2D patch embedding
of a SigLIP vision tower (``medsiglip-448``, or ``siglip-tiny`` offline), gets position embeddings, and passes the
tower's encoder and final LayerNorm as one sequence of D' x H' x W' tokens. A compressor turns these into 32 visual
tokens (a Perceiver resampler, or the seed's adaptive average pool), a projector maps them to the LM's width, and they
precede the prompt's token embeddings in the LM (the text part of ``medgemma-4b``, or ``tiny-gemma3``).

Where the seed (BrainGemma3D) and its README disagree, the README's design is the default and the seed's is an option:
``inflation="centre"`` (README) or ``"mean"`` (seed); ``pos_emb="pretrained+depth"`` or ``"seed"`` (the seed's fixed
linspace, which drops the pretrained grid); ``compressor="perceiver"`` (README) or ``"pool"`` (seed). Unlike the
seed's Conv3d (depth stride 1, depth padding 1: D + 1 depth tokens), tubelets do not overlap, so a (64, 128, 128)
volume gives 32 x H' x W' tokens and every size must divide by the tubelet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

import brain3d_report.lm_twin  # noqa: F401 - registers the offline LM twin, tiny-gemma3-brain
from common import hf
from common.errors import ConfigError
from common.lm import is_text_only_folder, load_causal_lm, load_lm_tokenizer
from common.presets import build_vision_tower, get_preset, preset_names
from common.vlm import load_vlm

VISION_PRESETS = tuple(preset_names("vision-tower"))
LM_KINDS = ("vlm", "lm")
"""``--lm`` takes the text part of a vision-language preset (MedGemma) or a text-only causal LM (Gemma 3 270M)."""
LM_PRESETS = (*preset_names("vlm"), *preset_names("lm"))
INPUT_RANGES = ("processor", "unit")
"""``--input-range``: ``processor`` normalises the [0, 1] volumes with the vision tower's 2D image processor (SigLIP,
MedSigLIP: mean 0.5, std 0.5, so [-1, 1], the range the pretrained patch embedding saw); ``unit`` feeds [0, 1] as
the seed does."""
INFLATIONS = ("centre", "mean")
POS_EMBS = ("pretrained+depth", "seed")
COMPRESSORS = ("perceiver", "pool")
STAGES = ("contrastive", "warmup", "lora")
VISION_TRAINABLES = ("all", "embeddings", "seed")
"""What of the vision encoder stage 1 trains (``trainable_parameters``)."""
IGNORE_INDEX = -100
CONTRASTIVE_TEMPERATURE = 0.07
"""Initial InfoNCE temperature (CLIP's, the seed's fixed value); ``logit_scale`` learns from log(1 / 0.07)."""
CONFIG_KEYS = ("vision", "lm", "depth_patch", "inflation", "pos_emb", "compressor", "perceiver_layers", "latents",
               "max_depth_patches", "text_dim", "text_whiten", "quantization", "pretrained", "seed",
               "lm_pretrain", "input_range")


# --- vision encoder ----------------------------------------------------------------------------------------------

def inflate_patch_weight(weight: torch.Tensor, depth_patch: int, inflation: str = "centre") -> torch.Tensor:
    """Conv2d weight (D, C, p, p) -> Conv3d weight (D, 1, depth_patch, p, p) for one-channel volumes.

    The C input channels are summed, so a grey slice fed to the 2D conv as C equal channels gives the same response
    as the inflated conv on that slice. ``centre`` (I3D/ViViT "central frame" initialisation) puts the 2D kernel on
    slice ``depth_patch // 2`` and zeros elsewhere: for an even depth that is the later of the two middle slices, as
    ViViT's floor(t / 2). ``mean`` (the seed's) spreads kernel / depth_patch over every slice. Either way a volume
    that is constant along depth gives exactly the 2D patch embedding of its slice.
    """
    if inflation not in INFLATIONS:
        raise ConfigError("--inflation", f"choose one of {', '.join(INFLATIONS)}, not {inflation!r}")
    grey = weight.sum(dim=1, keepdim=True)  # (D, 1, p, p)
    if inflation == "mean":
        return grey.unsqueeze(2).repeat(1, 1, depth_patch, 1, 1) / depth_patch
    inflated = torch.zeros(*grey.shape[:2], depth_patch, *grey.shape[2:], dtype=weight.dtype, device=weight.device)
    inflated[:, :, depth_patch // 2] = grey
    return inflated


def interpolate_position_grid(weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Square pretrained position table (g*g, D) -> (h*w, D) by bicubic interpolation of the 2D grid.

    Row-major like the tokens (row h, column w), and the same call as transformers' SigLIP
    ``interpolate_pos_encoding`` (bicubic, ``align_corners=False``), so a (g, g) grid gives the table back.
    """
    side = math.isqrt(weight.shape[0])
    if side * side != weight.shape[0]:
        raise ValueError(f"position table of {weight.shape[0]} rows is not a square grid")
    table = weight.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)


def seed_position_embedding(depth: int, height: int, width: int, dim: int) -> torch.Tensor:
    """The seed's fixed 3D position embedding (depth*height*width, dim), token order (d, h, w) row-major.

    Every channel gets linspace(-1, 1, depth)[d]; channel 0 adds linspace(-1, 1, height)[h] and channel 1 adds
    linspace(-1, 1, width)[w]. Nothing is learned and the pretrained 2D grid is not used.
    """
    pos_d = torch.linspace(-1, 1, steps=depth).unsqueeze(1).repeat(1, dim)
    grid_y, grid_x = torch.meshgrid(torch.linspace(-1, 1, steps=height), torch.linspace(-1, 1, steps=width),
                                    indexing="ij")
    pos_s = torch.zeros(height * width, dim)
    pos_s[:, 0] = grid_y.reshape(-1)
    if dim > 1:
        pos_s[:, 1] = grid_x.reshape(-1)
    return (pos_d.unsqueeze(1) + pos_s.unsqueeze(0)).reshape(depth * height * width, dim)


def _nearest_multiples(size: tuple[int, ...], patch: tuple[int, ...]) -> tuple[str, str]:
    lower = [max(k, n // k * k) for n, k in zip(size, patch)]
    upper = [(n // k + 1) * k if n % k else n for n, k in zip(size, patch)]
    return " ".join(map(str, lower)), " ".join(map(str, upper))


class InflatedSiglip3D(nn.Module):
    """A 2D SigLIP vision tower applied to volumes: inflated tubelet embedding, 3D positions, the tower's encoder.

    Args:
        tower: a ``SiglipVisionModel``; its encoder and final LayerNorm are reused (shared, not copied), its 2D patch
            embedding is inflated, its pooling head is dropped (the compressor pools).
        depth_patch: depth of a tubelet (``--depth-patch``).
        inflation: ``centre`` or ``mean``, see ``inflate_patch_weight``.
        pos_emb: ``pretrained+depth`` (the pretrained grid interpolated to the volume's (h, w) patch grid, plus a
            learned depth embedding that starts at zero, so a constant-depth volume first sees exactly the 2D
            model's inputs) or ``seed`` (the seed's fixed linspace).
        max_depth_patches: rows of the depth embedding, the most tubelets along depth.
        pixel_mean, pixel_std: a [0, 1] volume is fed as (volume - pixel_mean) / pixel_std, as the tower's 2D
            image processor prepares an image (``vision_pixel_norm``); 0 and 1 feed it unchanged.
    """

    def __init__(self, tower: SiglipVisionModel, depth_patch: int = 2, inflation: str = "centre",
                 pos_emb: str = "pretrained+depth", max_depth_patches: int = 64, pixel_mean: float = 0.0,
                 pixel_std: float = 1.0):
        super().__init__()
        if not pixel_std > 0:
            raise ValueError(f"pixel_std must be positive, not {pixel_std}")
        self.pixel_mean, self.pixel_std = float(pixel_mean), float(pixel_std)
        if depth_patch < 1:
            raise ConfigError("--depth-patch", f"must be at least 1, not {depth_patch}")
        if pos_emb not in POS_EMBS:
            raise ConfigError("--pos-emb", f"choose one of {', '.join(POS_EMBS)}, not {pos_emb!r}")
        conv2d = tower.embeddings.patch_embedding
        self.patch_size = int(conv2d.kernel_size[0])
        self.hidden_size = int(conv2d.out_channels)
        self.depth_patch, self.inflation, self.pos_emb = depth_patch, inflation, pos_emb
        self.max_depth_patches = max_depth_patches
        self.patch_embed = nn.Conv3d(1, self.hidden_size, kernel_size=self.tubelet, stride=self.tubelet,
                                     bias=conv2d.bias is not None, device=conv2d.weight.device,
                                     dtype=conv2d.weight.dtype)
        with torch.no_grad():
            self.patch_embed.weight.copy_(inflate_patch_weight(conv2d.weight, depth_patch, inflation))
            if conv2d.bias is not None:
                self.patch_embed.bias.copy_(conv2d.bias)
        if pos_emb == "pretrained+depth":
            self.position_embedding = tower.embeddings.position_embedding
            self.depth_embedding = nn.Parameter(torch.zeros(max_depth_patches, self.hidden_size,
                                                            device=conv2d.weight.device, dtype=conv2d.weight.dtype))
        self.encoder = tower.encoder
        self.post_layernorm = tower.post_layernorm
        self.gradient_checkpointing = False

    @property
    def tubelet(self) -> tuple[int, int, int]:
        return self.depth_patch, self.patch_size, self.patch_size

    def token_grid(self, volume_size: tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
        """(D', H', W') tokens for a (D, H, W) volume; a size the tubelet does not divide is a ConfigError."""
        size = tuple(int(n) for n in volume_size)
        if len(size) != 3 or any(n < k or n % k for n, k in zip(size, self.tubelet)):
            lower, upper = _nearest_multiples(size, self.tubelet) if len(size) == 3 else ("", "")
            hint = f"; use e.g. {lower} or {upper}" if lower else ""
            raise ConfigError("--volume-size", f"{' '.join(map(str, size))} is not divisible by the vision patch "
                                               f"{self.tubelet} (depth x height x width){hint}")
        grid = tuple(n // k for n, k in zip(size, self.tubelet))
        if self.pos_emb == "pretrained+depth" and grid[0] > self.max_depth_patches:
            raise ConfigError("--volume-size", f"depth {size[0]} gives {grid[0]} depth patches, more than the "
                                               f"{self.max_depth_patches} rows of the depth embedding")
        return grid

    def position(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(D'*H'*W', hidden) position embedding for a token grid."""
        depth, height, width = grid
        if self.pos_emb == "seed":
            return seed_position_embedding(depth, height, width, self.hidden_size).to(self.patch_embed.weight)
        spatial = interpolate_position_grid(self.position_embedding.weight, (height, width))
        return (self.depth_embedding[:depth, None, :] + spatial[None]).reshape(depth * height * width, -1)

    def embed(self, volume: torch.Tensor) -> torch.Tensor:
        """Tubelet embeddings plus positions, (B, D'*H'*W', hidden), before the encoder."""
        if volume.ndim != 5 or volume.shape[1] != 1:
            raise ValueError(f"expected a volume (B, 1, D, H, W), got shape {tuple(volume.shape)}")
        grid = self.token_grid(volume.shape[-3:])
        volume = (volume.to(self.patch_embed.weight.dtype) - self.pixel_mean) / self.pixel_std
        tokens = self.patch_embed(volume).flatten(2).transpose(1, 2)
        return tokens + self.position(grid).to(tokens.dtype)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, D'*H'*W', hidden) token states after the tower's final LayerNorm."""
        hidden = self.embed(volume)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, None, use_reentrant=False)
            else:
                hidden = layer(hidden, None)
        return self.post_layernorm(hidden)


# --- compressor and projector -------------------------------------------------------------------------------------

class PerceiverLayer(nn.Module):
    """Latents attend to [visual tokens; latents] (Flamingo, Alayrac et al. 2022, Fig. 5), then a feed-forward block.

    Pre-norm residual blocks; keys and values include the latents so each latent also sees what the others hold.
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ffn_mult * dim, bias=False), nn.GELU(),
                                 nn.Linear(ffn_mult * dim, dim, bias=False))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        normed = self.norm_latents(latents)
        keys, values = self.to_kv(torch.cat([self.norm_media(tokens), normed], dim=1)).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(self._split(self.to_q(normed)), self._split(keys),
                                                  self._split(values))
        latents = latents + self.to_out(attended.transpose(1, 2).flatten(2))
        return latents + self.ffn(latents)


class PerceiverResampler(nn.Module):
    """(B, N, D) visual tokens -> (B, latents, D) through ``layers`` Perceiver layers and a final LayerNorm."""

    def __init__(self, dim: int, latents: int = 32, layers: int = 2, heads: int = 8, ffn_mult: int = 4):
        super().__init__()
        if layers < 1:
            raise ConfigError("--perceiver-layers", f"must be at least 1, not {layers}")
        self.num_latents = latents
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, ffn_mult) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(tokens, latents)
        return self.norm(latents)


class PoolCompressor(nn.Module):
    """The seed's compressor: adaptive average pooling of the token sequence (in scan order) to ``latents`` tokens."""

    def __init__(self, latents: int = 32):
        super().__init__()
        self.num_latents = latents

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_latents).transpose(1, 2)


class Projector(nn.Module):
    """Linear -> GELU -> Linear to the LM's width, times a learnable scalar ``vis_scale`` (the seed's, from 1.0).

    Xavier-uniform weights with gain 0.5 and zero biases, as the seed, keep the first visual tokens small next to
    the LM's own embeddings.
    """

    def __init__(self, in_dim: int, out_dim: int, vis_scale: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=0.5)
                nn.init.zeros_(module.bias)
        self.vis_scale = nn.Parameter(torch.tensor(float(vis_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.vis_scale


# --- the whole model ----------------------------------------------------------------------------------------------

class Brain3DReportModel(nn.Module):
    """Vision encoder -> compressor -> projector -> causal LM, with the pieces each training stage needs.

    Args:
        vision: the 3D encoder.
        compressor: ``PerceiverResampler`` or ``PoolCompressor``.
        projector: maps compressed tokens to the LM's embedding width.
        lm: a Hugging Face causal LM; only ``get_input_embeddings()``, ``get_decoder()`` and
            ``forward(inputs_embeds=...)`` are used, so a tiny Gemma 3, MedGemma or a PEFT-wrapped LM work alike.
        text_dim: width of the text embeddings the contrastive stage compares with (the LM's by default).
        tokenizer: the LM's tokenizer, kept for the scripts.
        model_config: the ``build_model`` arguments that rebuild this model (saved as ``model.json``).
        freeze_lm: freeze the LM's weights (``trainable_parameters`` decides later stages).
    """

    def __init__(self, vision: InflatedSiglip3D, compressor: nn.Module, projector: Projector, lm: nn.Module,
                 text_dim: int | None = None, tokenizer: Any = None, model_config: Mapping[str, Any] | None = None,
                 freeze_lm: bool = True, text_whiten: int = 0):
        super().__init__()
        self.vision, self.compressor, self.projector, self.lm = vision, compressor, projector, lm
        lm_dim = lm.get_input_embeddings().embedding_dim
        device = projector.vis_scale.device
        # Contrastive stage: the report's text embedding is mapped to the vision width and compared with pooled().
        self.text_whiten = int(text_whiten)
        self.text_head = nn.Linear(self.text_whiten or text_dim or lm_dim, vision.hidden_size, device=device)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / CONTRASTIVE_TEMPERATURE), device=device))
        # Centres subtracted before the cosine of the contrastive stage (DINO-style centring): a randomly initialised
        # or 2D-pretrained encoder gives every volume almost the same pooled vector (cosine > 0.9999 across cases),
        # so an uncentred InfoNCE sees no differences to learn from. The image centre is an EMA of pooled vectors
        # during training, the text centre the mean over training reports; both are saved with the weights.
        self.register_buffer("image_center", torch.zeros(vision.hidden_size, device=device))
        self.register_buffer("text_center", torch.zeros(text_dim or lm_dim, device=device))
        # Whitening of the compressed tokens before the projector (``fit_token_whitening``, fitted at the start of
        # the warm-up stage; identity until then): per-latent mean, then one PCA whitening shared by all latents.
        self.register_buffer("token_mean", torch.zeros(compressor.num_latents, vision.hidden_size, device=device))
        self.register_buffer("token_whitening", torch.eye(vision.hidden_size, device=device))
        self.register_buffer("token_bound", torch.tensor(float("inf"), device=device))
        # Optional PCA whitening of the centred text embeddings onto their ``text_whiten`` leading components (Su et
        # al. 2021, "Whitening sentence representations"): sentence embedders give a report's laterality a tiny
        # share of the variance (left vs right reports of the brain phantom differ by 0.02 in centred MiniLM cosine,
        # lobes by 0.49; with 16 unit-variance components the side gap is 0.11). Measured on the phantom it did not
        # help the side probe (0.68 with 16 components against 0.91 without, 30 epochs), so it is off by default.
        # Fitted on the training reports (``fit_text_centering``) and saved with the weights.
        if self.text_whiten:
            self.register_buffer("text_whitening", torch.zeros(text_dim or lm_dim, self.text_whiten, device=device))
        self.tokenizer = tokenizer
        self.model_config = dict(model_config or {})
        self._lm_checkpointing = False
        if freeze_lm:
            self.lm.requires_grad_(False)
            self.lm.eval()

    def train(self, mode: bool = True) -> Brain3DReportModel:
        """Train mode, except for an LM none of whose weights train: it stays in eval mode.

        With gradient checkpointing on, the LM follows ``mode`` even when frozen, because Hugging Face layers only
        recompute in train mode (Gemma 3 has no dropout, so both modes compute the same).
        """
        super().train(mode)
        if not self._lm_checkpointing and not any(p.requires_grad for p in self.lm.parameters()):
            self.lm.eval()
        return self

    def forward(self, volume: torch.Tensor, text: torch.Tensor | None = None, prompt_ids: torch.Tensor | None = None,
                target_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None, target_weight: torch.Tensor | None = None):
        """The training entry, so that DDP sees every trained module inside ``forward``.

        With ``target_ids``: the caption loss. Otherwise the contrastive pieces: (pooled visual vectors (B, Dv),
        centred and projected text embeddings of ``text`` (N, Dt) or None, the logit scale).
        """
        if target_ids is not None:
            return self.caption_loss(volume, prompt_ids, target_ids, prompt_mask, target_mask, target_weight)
        pooled = self.pooled(volume)
        projected = None
        if text is not None:
            head = self.text_head
            centred = text.float() - self.text_center.float()
            if self.text_whiten:
                centred = centred @ self.text_whitening.float()
            projected = head(centred.to(head.weight.dtype))
        return pooled, projected, self.logit_scale.exp().clamp(max=100)

    @torch.no_grad()
    def fit_text_centering(self, embeddings: torch.Tensor) -> None:
        """Set the text centre (and whitening, when the model has it) from the training reports' embeddings."""
        x = embeddings.float()
        mean = x.mean(0)
        self.text_center.copy_(mean.to(self.text_center.dtype))
        if not self.text_whiten:
            return
        _, values, vectors = torch.linalg.svd(x - mean, full_matrices=False)
        k = min(self.text_whiten, int((values > values[0] * 1e-5).sum()))
        scale = (len(x) - 1) ** 0.5 / values[:k]
        whitening = torch.zeros_like(self.text_whitening, dtype=torch.float32)
        whitening[:, :k] = vectors[:k].T * scale
        self.text_whitening.copy_(whitening.to(self.text_whitening.dtype))

    def rebuilt_keys(self) -> set[str]:
        """State keys a run does not save: the frozen LM's weights, which ``build_model`` rebuilds from the LM's
        source (hub weights, or the tiny twin's seeded initialisation). LoRA adapters train and are saved, and so
        is a whole LM that was language-pre-trained here (``lm_pretrain``)."""
        if self.model_config.get("lm_pretrain"):
            return set()
        trained = {f"lm.{n}" for n, p in self.lm.named_parameters() if p.requires_grad}
        # From the state dict, not named_parameters: tied weights (Gemma's lm_head = embed_tokens) appear once there.
        return {k for k in self.lm.state_dict(prefix="lm.", keep_vars=True)} - trained

    @property
    def num_latents(self) -> int:
        return self.compressor.num_latents

    def gradient_checkpointing_enable(self) -> None:
        """Recompute vision and LM layers in the backward pass (thousands of tokens per volume on a 16 GB GPU)."""
        self.vision.gradient_checkpointing = True
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._lm_checkpointing = True
        self.train(self.training)

    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, latents, D_vision) compressed visual tokens. A (B, latents, D_vision) input is taken
        as encoded already: stages 2 and 3 keep the encoder frozen and encode each volume once (``encode_frozen``)."""
        if volume.dim() == 3:
            return volume
        return self.compressor(self.vision(volume))

    def pooled(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, D_vision): the mean of the compressed tokens, the visual side of the contrastive loss."""
        return self.encode(volume).mean(dim=1)

    def visual_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, latents, D_lm): projected visual tokens in the dtype of the LM's embeddings."""
        dtype = self.lm.get_input_embeddings().weight.dtype
        tokens = self.encode(volume)
        tokens = (tokens - self.token_mean.to(tokens.dtype)) @ self.token_whitening.to(tokens.dtype)
        bound = self.token_bound.to(tokens.dtype)
        return self.projector(tokens.clamp(-bound, bound)).to(dtype)

    @torch.no_grad()
    def fit_token_whitening(self, volumes: torch.Tensor, batch_size: int = 4, floor: float = 1e-6) -> None:
        """Fit the mean of each latent and a PCA whitening of the compressed tokens over ``volumes`` (the training
        split), applied before the projector from then on.

        After stage 1 the compressed tokens of different volumes share almost all of their value, and what varies
        is strongly anisotropic: on the brain phantom the leading direction holds 73% of the variance between
        volumes and the side of the tumour lives in directions that together hold under 1% of it. A projector fed
        raw tokens gave the LM the same prefix for every volume (the log-likelihood difference of "left" and
        "right" varied by 0.02 nats across volumes); fed per-feature standardised tokens, the side was still a
        needle (logistic regression with C = 0.1 on one latent: 0.77 test accuracy), and the warm-up never learned
        it (teacher-forced side AUC 0.36 - 0.53). Whitened, every direction has unit variance over the training
        volumes (the same regression: 1.0). Eigenvalues below ``floor`` times the largest are raised to it, so
        numerically empty directions stay near zero. Whitened values are clamped to the largest magnitude seen on
        the training volumes: directions of tiny variance amplify a volume unlike the training ones (one phantom
        test volume reached 262 where the training volumes stayed below 7), and the LM would get a prefix it was
        never trained on.
        """
        was_training = self.training
        self.eval()
        device = self.token_mean.device
        tokens = torch.cat([self.encode(volumes[i : i + batch_size].to(device)).double()
                            for i in range(0, len(volumes), batch_size)])
        self.train(was_training)
        mean = tokens.mean(0)
        centred = (tokens - mean).flatten(0, 1)
        if len(tokens) > 1:
            covariance = centred.T @ centred / max(len(centred) - 1, 1)
            values, vectors = torch.linalg.eigh(covariance)
            values = values.clamp_min(values.max().clamp_min(1e-12) * floor)
            whitening = vectors / values.sqrt()
        else:
            whitening = torch.eye(tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        self.token_mean.copy_(mean.to(self.token_mean.dtype))
        self.token_whitening.copy_(whitening.to(self.token_whitening.dtype))
        self.token_bound.fill_(float((centred @ whitening).abs().max()) if len(tokens) > 1 else float("inf"))

    @torch.no_grad()
    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D_lm) mean of the frozen LM's last hidden states over real tokens (the seed's text embedding)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        states = self.lm.get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1)

    def inputs_embeds(self, volume: torch.Tensor, prompt_ids: torch.Tensor,
                      prompt_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """([visual tokens; prompt embeddings] (B, K+P, D_lm), attention mask (B, K+P)): the LM's input."""
        visual = self.visual_tokens(volume)
        prompt = self.lm.get_input_embeddings()(prompt_ids)
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        mask = torch.cat([torch.ones(visual.shape[:2], dtype=prompt_mask.dtype, device=prompt_mask.device),
                          prompt_mask], dim=1)
        return torch.cat([visual, prompt], dim=1), mask

    def caption_labels(self, prompt_ids: torch.Tensor, target_ids: torch.Tensor,
                       target_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K+P+T) labels for [visual; prompt; report]: report ids, ``IGNORE_INDEX`` elsewhere and on padding."""
        batch = prompt_ids.shape[0]
        ignored = torch.full((batch, self.num_latents + prompt_ids.shape[1]), IGNORE_INDEX, dtype=torch.long,
                             device=target_ids.device)
        report = target_ids.long() if target_mask is None else target_ids.long().masked_fill(target_mask == 0,
                                                                                             IGNORE_INDEX)
        return torch.cat([ignored, report], dim=1)

    def caption_token_losses(self, volume: torch.Tensor, prompt_ids: torch.Tensor, target_ids: torch.Tensor,
                             target_mask: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None
                             ) -> torch.Tensor:
        """(B, T) next-token cross-entropy of each report token (0 on padding).

        ``target_ids`` is the report (end it with EOS so the LM learns to stop), right-padded with ``target_mask``
        0. Position ids count real tokens only, so padding inside a left-padded prompt shifts nothing. Logits are
        computed for the report positions alone (MedGemma's vocabulary is 262k).
        """
        if target_mask is None:
            target_mask = torch.ones_like(target_ids)
        elif bool((target_mask[:, 1:] > target_mask[:, :-1]).any()):
            raise ValueError("report padding must be on the right (tokenizer.padding_side = 'right')")
        embeds, mask = self.inputs_embeds(volume, prompt_ids, prompt_mask)
        embeds = torch.cat([embeds, self.lm.get_input_embeddings()(target_ids)], dim=1)
        mask = torch.cat([mask, target_mask.to(mask.dtype)], dim=1)
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        steps = target_ids.shape[1]
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         logits_to_keep=steps + 1).logits[:, :-1]
        labels = self.caption_labels(prompt_ids, target_ids, target_mask)[:, -steps:]
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none")
        return losses.view(labels.shape)

    def caption_loss(self, volume: torch.Tensor, prompt_ids: torch.Tensor, target_ids: torch.Tensor,
                     prompt_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                     target_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the report tokens only (visual and prompt positions are not scored);
        with ``target_weight`` (B, T), the weighted mean (sum of weight x loss over the batch / sum of weights)."""
        losses = self.caption_token_losses(volume, prompt_ids, target_ids, target_mask, prompt_mask)
        real = torch.ones_like(losses) if target_mask is None else target_mask.to(losses.dtype)
        weight = real if target_weight is None else target_weight.to(losses.dtype) * real
        return (losses * weight).sum() / weight.sum().clamp_min(1e-12)


# --- building -----------------------------------------------------------------------------------------------------

def load_vision_tower(name: str, *, pretrained: bool = True, device: torch.device | str = "cpu",
                      cache_dir: str | Path | None = None) -> SiglipVisionModel:
    """A ``SiglipVisionModel`` for ``--vision``: a ``vision-tower`` preset, a save_pretrained folder or a hub id.

    Tiny presets and ``pretrained=False`` build the preset's config with random weights (under the caller's seed).
    """
    if name in VISION_PRESETS:
        preset = get_preset(name, "vision-tower", "--vision")
        if not preset.has_pretrained_weights or not pretrained:
            return build_vision_tower(preset.options).to(device).eval()
        source = preset.source
    else:
        source = name
    return hf.load_pretrained(SiglipVisionModel, source, dtype=torch.float32, device=device, cache_dir=cache_dir)


def vision_patch_size(name: str, cache_dir: str | Path | None = None) -> int | None:
    """The 2D patch size of ``--vision`` read from its preset or config alone (no weights), so a volume size the
    patch does not divide is refused when the flags are parsed; None when the config cannot be read without the
    weights (a hub id that is not cached: the check then happens after loading)."""
    if name in VISION_PRESETS:
        preset = get_preset(name, "vision-tower", "--vision")
        if "patch_size" in preset.options:
            return int(preset.options["patch_size"])
        name = preset.source
    try:
        config = SiglipVisionConfig.from_pretrained(name, cache_dir=cache_dir)
    except (OSError, ValueError):
        return None
    return int(config.patch_size)


def check_volume_fits(volume_size: Sequence[int], vision: str, depth_patch: int,
                      cache_dir: str | Path | None = None) -> None:
    """Refuse a ``--volume-size`` that the tubelet (``depth_patch`` x patch x patch) does not divide, before any
    model is loaded (ConfigError on ``--volume-size`` naming the nearest sizes that do)."""
    patch = vision_patch_size(vision, cache_dir)
    if patch is None:
        return
    size = tuple(int(n) for n in volume_size)
    tubelet = (int(depth_patch), patch, patch)
    if len(size) != 3 or any(n < k or n % k for n, k in zip(size, tubelet)):
        lower, upper = _nearest_multiples(size, tubelet) if len(size) == 3 else ("", "")
        hint = f"; use e.g. {lower} or {upper}" if lower else ""
        raise ConfigError("--volume-size", f"{' '.join(map(str, size))} is not divisible by the vision patch "
                                           f"{tubelet} (depth x height x width) of {vision}{hint}")


def causal_lm_from_vlm(model: nn.Module) -> nn.Module:
    """The text half of an image-text-to-text model as a causal LM (with ``generate``), sharing its modules.

    Hugging Face VLMs (Gemma 3, LLaVA, ...) hold the decoder as ``model.language_model`` next to ``lm_head``; the
    causal-LM class of the text config holds the same two as ``model`` and ``lm_head``. The shell is built on the
    meta device and both modules are moved in, so nothing is copied and a 4-bit decoder stays 4-bit. A model that is
    already a causal LM is returned as it is.
    """
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "language_model") or not hasattr(model, "lm_head"):
        return model
    text_config = model.config.get_text_config()
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config)
    causal.model = inner.language_model
    causal.lm_head = model.lm_head
    causal.generation_config = model.generation_config
    for attribute in ("hf_quantizer", "is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if hasattr(model, attribute):
            setattr(causal, attribute, getattr(model, attribute))
    if getattr(model.config, "quantization_config", None) is not None:
        causal.config.quantization_config = model.config.quantization_config
    return causal


def vision_pixel_norm(vision: str) -> tuple[float, float]:
    """(mean, std) with which the vision tower's 2D image processor normalises a grey image: a save_pretrained folder's
    ``preprocessor_config.json`` when it has one, else ``SiglipImageProcessor``'s own (SigLIP's, and MedSigLIP's
    published config: mean 0.5, std 0.5 on every channel). A grey volume is one channel: the processor's channels
    must agree."""
    import json

    from transformers import SiglipImageProcessor

    folder = Path(vision).expanduser()
    stored = {}
    if vision not in VISION_PRESETS and (folder / "preprocessor_config.json").is_file():
        stored = json.loads((folder / "preprocessor_config.json").read_text())
    processor = SiglipImageProcessor(**{k: stored[k] for k in ("image_mean", "image_std") if k in stored})
    means, stds = list(processor.image_mean), list(processor.image_std)
    if len(set(means)) != 1 or len(set(stds)) != 1:
        raise ConfigError("--vision", f"the image processor normalises channels differently (mean {means}, std "
                                      f"{stds}); a grey volume needs one mean and std")
    return float(means[0]), float(stds[0])


def load_language_model(name: str, *, quantization: str = "none", pretrained: bool = True,
                        device: torch.device | str = "cpu", precision: str = "auto",
                        cache_dir: str | Path | None = None, seed: int = 0, exclude: Sequence[str] = (),
                        pretrain_weights: bool = True) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer) for ``--lm``: the text part of a ``vlm`` preset, folder or hub id (see ``load_vlm``).

    ``pretrained=False`` builds a real preset's architecture with random weights and no tokenizer (for counting
    parameters on the meta device). A preset that is language-pre-trained when built (it declares
    ``options["pretraining_corpus"]``, e.g. ``tiny-gemma3-brain``) leaves the texts of ``exclude`` out of its corpus;
    ``pretrain_weights=False`` skips its pre-training (a run that saved the pre-trained weights loads them). An ``lm``
    preset or a folder holding a text-only model loads as a causal LM (``common.lm``).
    """
    preset = get_preset(name, LM_KINDS, "--lm") if name in LM_PRESETS else None
    if preset is not None and "pretraining_corpus" in preset.options and quantization == "none":
        from common.device import compute_dtype

        model, processor = preset.build(seed=seed, cache_dir=cache_dir, exclude=exclude,
                                        pretrain_weights=pretrain_weights)
        dtype = {"auto": compute_dtype(torch.device(device)), "fp32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[precision]
        causal = causal_lm_from_vlm(model.to(device=device, dtype=dtype))
        causal.pretraining = model.pretraining
        return causal, processor.tokenizer
    if not pretrained and name in LM_PRESETS and get_preset(name, LM_KINDS, "--lm").skeleton is not None:
        with torch.device(device):
            return causal_lm_from_vlm(get_preset(name, LM_KINDS, "--lm").skeleton()), None
    if name in LM_PRESETS and get_preset(name, LM_KINDS, "--lm").kind == "lm" or is_text_only_folder(name):
        return load_causal_lm(name, quantization=quantization, device=device, precision=precision,
                              cache_dir=cache_dir, seed=seed)
    vlm = load_vlm(name, quantization=quantization, device=device, precision=precision,
                   cache_dir=Path(cache_dir) if cache_dir else None, seed=seed)
    causal = causal_lm_from_vlm(vlm.model)
    causal.pretraining = getattr(vlm.model, "pretraining", None)  # a preset language-pre-trained when built
    return causal, getattr(vlm.processor, "tokenizer", vlm.processor)


def lm_tokenizer(name: str, cache_dir: str | Path | None = None) -> Any:
    """The tokenizer of ``--lm`` without loading the LM (to tokenize reports before the model exists)."""
    if name in LM_PRESETS and get_preset(name, LM_KINDS, "--lm").kind == "lm" or is_text_only_folder(name):
        return load_lm_tokenizer(name, cache_dir)
    if name in LM_PRESETS:
        preset = get_preset(name, LM_KINDS, "--lm")
        if "tokenizer" in preset.options:  # a preset whose build trains: its tokenizer alone
            return preset.options["tokenizer"]()
        if preset.build is not None:
            return preset.build(seed=0)[1].tokenizer
        name = preset.source
    from transformers import AutoTokenizer

    return hf.load_processor(AutoTokenizer, name, cache_dir=cache_dir)


def build_model(vision: str, lm: str, *, depth_patch: int = 2, inflation: str = "centre",
                pos_emb: str = "pretrained+depth", compressor: str = "perceiver", perceiver_layers: int = 2,
                latents: int = 32, max_depth_patches: int = 64, text_dim: int | None = None, text_whiten: int = 0,
                lm_pretrain: Mapping[str, Any] | None = None, input_range: str = "unit", quantization: str = "none",
                pretrained: bool = True, lm_exclude: Sequence[str] = (),
                seed: int = 0,
                device: torch.device | str = "cpu", precision: str = "auto",
                cache_dir: str | Path | None = None) -> Brain3DReportModel:
    """Build the 3D report model from presets (or HF folders / hub ids).

    Args:
        vision: ``medsiglip-448`` or ``siglip-tiny`` (or a SigLIP checkpoint folder / hub id).
        lm: ``medgemma-1.5-4b``, ``medgemma-4b``, ``gemma3-270m`` (a text-only causal LM) or a tiny twin (or a Gemma 3
            checkpoint folder / hub id); the text part of a vision-language model is used.
        depth_patch, inflation, pos_emb: see ``InflatedSiglip3D``.
        compressor: ``perceiver`` or ``pool``; ``perceiver_layers`` and ``latents`` size it.
        max_depth_patches: rows of the learned depth embedding.
        text_dim: width of the contrastive text embeddings (default: the LM's width).
        text_whiten: PCA-whiten the centred text embeddings onto this many components (0: centring only).
        lm_pretrain: the record of a language pre-training of the LM in this project (a preset that pre-trains when
            built, ``lm_twin.py``, records it itself); the LM's weights are then saved with the run, and a run that
            has the record is rebuilt without pre-training (its saved weights replace the LM's).
        lm_exclude: texts a language pre-training at build time must leave out (a new run's held-out reports).
        input_range: ``processor`` or ``unit`` (``INPUT_RANGES``). The default here, ``unit``, is what a run whose
            ``model.json`` predates the setting was trained with; ``--input-range`` defaults to ``processor``.
        quantization: ``none``, ``4bit`` or ``8bit`` for the LM (through ``common.hf``).
        pretrained: load real weights; False builds real architectures with random weights.
        seed: fixes every randomly initialised weight (tiny towers, compressor, projector, heads).
        device: where the model lives (``meta`` to count parameters without memory).
        precision: dtype of the LM's weights (``auto``: bf16 on GPUs that have it, fp32 on CPU).
        cache_dir: Hugging Face cache.

    Returns:
        The model, its frozen LM in eval mode; ``model.model_config`` rebuilds it with ``build_model(**config)``.

    Raises:
        ConfigError: an unknown preset or option, a hub model that is not cached offline.
    """
    if compressor not in COMPRESSORS:
        raise ConfigError("--compressor", f"choose one of {', '.join(COMPRESSORS)}, not {compressor!r}")
    if latents < 1:
        raise ConfigError("--latents", f"must be at least 1, not {latents}")
    if vision not in VISION_PRESETS and not Path(vision).expanduser().exists() and vision.count("/") != 1:
        raise ConfigError("--vision", f"unknown vision tower {vision!r}; choose one of {', '.join(VISION_PRESETS)}, "
                                      "a save_pretrained directory or a hub id owner/name")
    if input_range not in INPUT_RANGES:
        raise ConfigError("--input-range", f"choose one of {', '.join(INPUT_RANGES)}, not {input_range!r}")
    device = torch.device(device)
    config = {"vision": vision, "lm": lm, "depth_patch": depth_patch, "inflation": inflation, "pos_emb": pos_emb,
              "compressor": compressor, "perceiver_layers": perceiver_layers, "latents": latents,
              "max_depth_patches": max_depth_patches, "text_dim": text_dim, "text_whiten": text_whiten,
              "lm_pretrain": dict(lm_pretrain) if lm_pretrain else None, "input_range": input_range,
              "quantization": quantization,
              "pretrained": pretrained, "seed": seed}
    language_model, tokenizer = load_language_model(lm, quantization=quantization, pretrained=pretrained,
                                                    device=device, precision=precision, cache_dir=cache_dir, seed=seed,
                                                    exclude=lm_exclude, pretrain_weights=not lm_pretrain)
    if not config["lm_pretrain"] and getattr(language_model, "pretraining", None):
        config["lm_pretrain"] = dict(language_model.pretraining)
    lm_dim = language_model.get_input_embeddings().embedding_dim
    pixel_mean, pixel_std = vision_pixel_norm(vision) if input_range == "processor" else (0.0, 1.0)
    with torch.random.fork_rng(devices=[]), (torch.device("meta") if device.type == "meta" else nullcontext()):
        torch.manual_seed(seed)
        tower = load_vision_tower(vision, pretrained=pretrained, device=device, cache_dir=cache_dir)
        encoder = InflatedSiglip3D(tower, depth_patch, inflation, pos_emb, max_depth_patches, pixel_mean, pixel_std)
        dim = encoder.hidden_size
        squeeze = (PerceiverResampler(dim, latents, perceiver_layers, heads=tower.config.num_attention_heads)
                   if compressor == "perceiver" else PoolCompressor(latents))
        model = Brain3DReportModel(encoder, squeeze.to(device), Projector(dim, lm_dim).to(device), language_model,
                                   text_dim=text_dim, tokenizer=tokenizer, model_config=config,
                                   text_whiten=text_whiten)
    return model


def model_from_config(config: Mapping[str, Any], source: str | Path = "model.json", **runtime: Any
                      ) -> Brain3DReportModel:
    """Rebuild a model from its ``model_config`` (e.g. read from a run's ``model.json``); ``runtime`` adds device,
    precision and cache_dir. Unknown keys are a ConfigError naming ``source``."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(source, f"unknown model settings {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    missing = [key for key in ("vision", "lm") if key not in config]
    if missing:
        raise ConfigError(source, f"model settings lack {', '.join(missing)}")
    return build_model(**config, **runtime)


def trainable_parameters(model: Brain3DReportModel, stage: str, vision: str = "all") -> dict[str, nn.Parameter]:
    """Unfreeze what ``stage`` trains, freeze the rest, and return the trainable parameters by name.

    ``contrastive``: the vision encoder (``vision="embeddings"``: only its tubelet and position embeddings;
    ``"seed"``: only the tubelet embedding, the seed's stage-1 choice), the compressor, the text head and the
    temperature. ``warmup``: the projector (with ``vis_scale``) only, as
    the seed's README says; the vision encoder and compressor stay as stage 1 left them, so the token whitening
    fitted on their output at the start of the stage stays valid (training the compressor too, the warm-up taught it
    to give every volume the same tokens: teacher-forced side AUC 0.5 on the phantom, 0.84 frozen).
    ``lora``: the LoRA adapters inside the LM (apply them with peft first) and the projector.
    """
    if stage not in STAGES:
        raise ConfigError("--stage", f"choose one of {', '.join(STAGES)}, not {stage!r}")
    if vision not in VISION_TRAINABLES:
        raise ValueError(f"vision must be one of {', '.join(VISION_TRAINABLES)}, not {vision!r}")
    model.requires_grad_(False)
    if stage == "contrastive":
        if vision == "all":
            model.vision.requires_grad_(True)
        else:
            names = ("patch_embed",) if vision == "seed" else ("patch_embed", "position_embedding", "depth_embedding")
            for name, param in model.vision.named_parameters():
                param.requires_grad_(name.startswith(names))
        for module in (model.compressor, model.text_head):
            module.requires_grad_(True)
        model.logit_scale.requires_grad_(True)
    elif stage == "warmup":
        model.projector.requires_grad_(True)
    else:
        adapters = [param for name, param in model.lm.named_parameters() if "lora_" in name]
        if not adapters:
            raise ValueError("the LM has no LoRA adapters; wrap it with peft before the lora stage")
        for param in adapters:
            param.requires_grad_(True)
        model.projector.requires_grad_(True)
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


__all__ = ["InflatedSiglip3D", "PerceiverResampler", "PoolCompressor", "Projector", "Brain3DReportModel",
           "build_model", "model_from_config", "trainable_parameters", "vision_patch_size",
           "check_volume_fits", "load_vision_tower", "load_language_model",
           "lm_tokenizer", "vision_pixel_norm", "INPUT_RANGES",
           "causal_lm_from_vlm", "inflate_patch_weight", "interpolate_position_grid",
           "seed_position_embedding", "VISION_PRESETS", "LM_PRESETS", "INFLATIONS", "POS_EMBS", "COMPRESSORS",
           "STAGES", "IGNORE_INDEX", "LM_KINDS"]
