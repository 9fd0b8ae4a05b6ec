"""GPU memory of one training step of the 3D report model at real size, counted on a CPU: stage 1 (contrastive, the
so400m vision tower trains) and stage 3 (LoRA on the 4-bit MedGemma 1.5 LM), against a T4 (16 GB) and an A6000
(48 GB).

    python -m benchmarks.brain3d_memory --stage contrastive --json contrastive.json
    python -m benchmarks.brain3d_memory --stage lora --json lora.json

Nothing here needs a GPU, the hub or real weights, and no run allocates more than about 2 GiB:

- **Saved activations are measured.** A step's activation memory is what autograd keeps for the backward pass.
  Every tensor the forward saves passes through ``torch.autograd.graph.saved_tensors_hooks``; the benchmark adds up
  the bytes of the distinct storages it sees (a tensor saved twice, or a view of one already saved, counts once;
  parameters count as weights, not activations). The models are built at the real width, token count and dtype
  with random weights, but with one and with two layers: the difference is one layer's activations, the rest is
  what lies outside the layers (embeddings, compressor, head, loss), and the real depth (27 vision layers, 34 LM
  layers) is the rest plus that many layers, all layers being the same. Batch B is extrapolated from batches 1 and
  2 (``at_batch``; an earlier direct run at batch 4 gave the same numbers: 705.7 MiB per fp32 layer, 4.00 x batch
  1), which keeps the benchmark under about 2 GiB of host memory.
- **Gradient checkpointing** (``--gradient-checkpointing``) keeps only each layer's input for the backward pass
  (the hooks see it saved), which then recomputes one layer at a time: its activations are what the checkpointed
  forward saves plus, at the backward's peak, one layer's own saved activations (both measured as above).
- **Weights, gradients and AdamW's two moments are computed** from the real architectures' parameter counts (built
  on the meta device): fp32 master weights for everything that trains, as the training loop keeps them under bf16
  autocast; the 4-bit LM at 4.5 bits per quantised weight (NF4 with double-quantised block-64 absmax), its
  embedding and norms in bf16 (bitsandbytes leaves them unquantised); the 4-bit LM stays loaded in stage 1, whose
  text embedding is the LM's. Under bf16 autocast each weight also gets a bf16 copy for the step (2 bytes per
  parameter of the encoder). Stage 3 computes in bf16, as a 4-bit LM does; its frozen LM layers are measured as
  bf16 ``Linear`` layers, which save the same input activations as bitsandbytes' ``Linear4bit``. The LM's
  262k-entry output layer is counted the same way: its logits and the
  cross-entropy's log-probabilities over the report positions (fp32) are measured at a vocabulary of 4,096 and
  8,192 entries and extended linearly to 262,208.
- ``bf16`` is autocast to bfloat16 (``--precision bf16``): matmul inputs and outputs saved in bf16, norms and
  softmax statistics in fp32, as the hooks see them. Not counted: the CUDA context and allocator slack (about 0.5
  to 1 GiB on a real card), and temporaries that live only inside one operation.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.errors import cli_entry
from common.tables import markdown_table

GIB = 2**30
CARDS = {"T4 (16 GB)": 16e9, "A6000 (48 GB)": 48e9}
VISION_LAYERS = 27
PROMPT_TOKENS = 16
"""The seed's prompt is 15 Gemma 3 tokens after BOS."""
NF4_BYTES_PER_WEIGHT = 4.5 / 8
"""NF4 (4 bits) + one 8-bit absmax per block of 64 (0.125 bit) + its fp32 scale per 256 blocks, rounded up to the
4.5 bits bitsandbytes reports for double-quantised NF4 weights."""
VOCAB_MEASURED = (4096, 8192)


def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(prog="python -m benchmarks.brain3d_memory", description=__doc__,
                                 parents=[base_parser()], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("contrastive", "lora"), default="contrastive",
                        help="contrastive: stage 1 of the so400m tower; lora: stage 3 of the 4-bit LM")
    parser.add_argument("--volume-size", type=positive_int, nargs=3, default=[64, 126, 126], metavar=("D", "H", "W"),
                        help="volume of stage 1 (default 64 126 126: 64 x 128 x 128 cut to a multiple of 14)")
    parser.add_argument("--depth-patch", type=positive_int, default=2, help="tubelet depth")
    parser.add_argument("--lm", default=None,
                        help="LM preset of stage 3 (and the loaded LM of stage 1): medgemma-1.5-4b when registered, "
                             "else medgemma-4b (the same Gemma 3 4B architecture)")
    parser.add_argument("--report-tokens", type=positive_int, default=128, help="report tokens (the seed's 128)")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 4], help="batch sizes")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    return parser


# --- measuring ---------------------------------------------------------------------------------------------------

def saved_bytes(step: Callable[[], object], parameters: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``step()`` runs its forward.
    Weights are not activations: parameters and autocast's bf16 copies of them (a saved bf16 tensor of a weight's
    shape) are left out and counted with the weights. The saved tensors live until the function returns."""
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    weight_shapes = {tuple(sorted(p.shape)) for p in parameters if p.dim() >= 2}  # a matmul saves W or W.T
    seen: dict[int, int] = {}
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        copy_of_weight = tuple(sorted(tensor.shape)) in weight_shapes and tensor.dtype == torch.bfloat16
        if storage.data_ptr() not in weights and not copy_of_weight and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step()
    total = sum(seen.values())
    kept.clear()
    del result
    return total


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def layer_and_rest(measure: Callable[[int], int]) -> tuple[int, int]:
    """(bytes of one layer, bytes outside the layers) from ``measure(n_layers)`` at one and two layers."""
    one = measure(1)
    gc.collect()  # the one-layer model goes before the two-layer one is built
    two = measure(2)
    gc.collect()
    return two - one, 2 * one - two


# --- stage 1 -----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def vision_encoder(layers: int, depth_patch: int):
    """The 3D encoder and Perceiver of the report model around a random so400m tower of ``layers`` layers."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from brain3d_report.model import InflatedSiglip3D, PerceiverResampler
    from common.presets import MEDSIGLIP_448_CONFIG

    config = SiglipVisionConfig(**{**MEDSIGLIP_448_CONFIG, "num_hidden_layers": layers})
    config._attn_implementation = "sdpa"
    tower = SiglipVisionModel(config)
    encoder = InflatedSiglip3D(tower, depth_patch)
    return encoder, PerceiverResampler(encoder.hidden_size, 32, 2, heads=config.num_attention_heads)


def contrastive_activations(volume_size: Sequence[int], depth_patch: int, batch: int, precision: str,
                            checkpointing: bool) -> dict[str, float]:
    """Saved bytes of a stage-1 forward at 27 layers (from one- and two-layer towers) and, with checkpointing, the
    recompute peak of one layer in the backward."""
    def measure(layers: int, checkpoint: bool) -> int:
        torch.manual_seed(0)
        encoder, compressor = vision_encoder(layers, depth_patch)
        encoder.gradient_checkpointing = checkpoint
        encoder.train()
        parameters = [*encoder.parameters(), *compressor.parameters()]
        volume = torch.rand(batch, 1, *volume_size)

        def step():
            with _autocast(precision):
                return compressor(encoder(volume)).mean(dim=1)

        return saved_bytes(step, parameters)

    layer, rest = layer_and_rest(lambda n: measure(n, False))
    out = {"per_layer": layer, "outside_layers": rest}
    if not checkpointing:
        out["activations"] = rest + VISION_LAYERS * layer
        return out
    kept, kept_rest = layer_and_rest(lambda n: measure(n, True))
    out.update({"per_layer_checkpointed": kept, "activations": kept_rest + VISION_LAYERS * kept + layer})
    return out


def vision_parameters() -> int:
    """Parameters of the 3D encoder (so400m, tubelet and depth embedding) and its Perceiver, counted on meta."""
    with torch.device("meta"):
        encoder, compressor = vision_encoder.__wrapped__(VISION_LAYERS, 2)
    return sum(p.numel() for p in [*encoder.parameters(), *compressor.parameters()])


# --- stage 3 -----------------------------------------------------------------------------------------------------

def lm_preset_name(choice: str | None) -> str:
    from brain3d_report.model import LM_PRESETS

    if choice is not None:
        return choice
    return "medgemma-1.5-4b" if "medgemma-1.5-4b" in LM_PRESETS else "medgemma-4b"


def lm_text_config(name: str):
    """The Gemma 3 text config of an LM preset, from its skeleton on the meta device."""
    from common.presets import get_preset

    with torch.device("meta"):
        model = get_preset(name, "vlm", "--lm").skeleton()
    return model.config.get_text_config()


def four_bit_lm_bytes(config) -> dict[str, float]:
    """Bytes of the 4-bit LM: the decoder's linear weights in NF4, embedding (tied output) and norms in bf16."""
    with torch.device("meta"):
        from transformers import Gemma3ForCausalLM

        model = Gemma3ForCausalLM(config)
    linear = sum(m.weight.numel() for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear))
    other = sum(p.numel() for p in model.parameters()) - linear  # tied lm_head counted once by parameters()
    return {"linear_params": linear, "other_params": other, "bytes": linear * NF4_BYTES_PER_WEIGHT + other * 2}


_SMALL_LMS: dict = {}
"""One- and two-layer LMs of ``lora_activations``, built once per layer count, vocabulary and dtype."""


def lora_activations(config, batch: int, precision: str, checkpointing: bool, report_tokens: int,
                     rank: int = 4) -> dict[str, float]:
    """Saved bytes of a stage-3 step (projector, LM with LoRA on q/k/v/o, caption loss over the report) at the LM's
    real depth, from one- and two-layer LMs at the real width; the output layer extended to the real vocabulary."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Gemma3ForCausalLM

    from brain3d_report.model import Projector

    sequence = 32 + PROMPT_TOKENS + report_tokens
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def build(layers: int, vocab: int):
        key = (layers, vocab, dtype, rank)
        if key not in _SMALL_LMS:
            torch.manual_seed(0)
            small = config.__class__(**{**config.to_dict(), "num_hidden_layers": layers, "vocab_size": vocab,
                                        "layer_types": config.layer_types[:layers]})
            small._attn_implementation = "sdpa"
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # built in its compute dtype: no fp32 copy of the layers in memory
            try:
                lm = Gemma3ForCausalLM(small)
            finally:
                torch.set_default_dtype(previous)
            lm.requires_grad_(False)
            lm = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), lm)
            _SMALL_LMS[key] = (lm, Projector(1152, small.hidden_size))
        return _SMALL_LMS[key]

    def measure(layers: int, vocab: int, checkpoint: bool) -> int:
        lm, projector = build(layers, vocab)
        if checkpoint:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_disable()
        lm.train()
        tokens = torch.randn(batch, 32, 1152)
        text = torch.randint(0, vocab, (batch, PROMPT_TOKENS + report_tokens))
        labels = torch.cat([torch.full((batch, 32 + PROMPT_TOKENS), -100), text[:, PROMPT_TOKENS:]], dim=1)

        def step():
            with _autocast(precision):
                embeds = torch.cat([projector(tokens).to(dtype), lm.get_input_embeddings()(text)], dim=1)
                logits = lm(inputs_embeds=embeds, logits_to_keep=report_tokens + 1).logits[:, :-1]
                return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[:, -report_tokens:].flatten())

        parameters = [*lm.parameters(), *projector.parameters()]
        return saved_bytes(step, parameters)

    small_vocab, large_vocab = VOCAB_MEASURED
    layer, rest = layer_and_rest(lambda n: measure(n, small_vocab, False))
    large = measure(1, large_vocab, False)
    gc.collect()
    per_vocab = (large - measure(1, small_vocab, False)) / (large_vocab - small_vocab)
    gc.collect()
    rest_real = rest + per_vocab * (config.vocab_size - small_vocab)
    depth = config.num_hidden_layers
    out = {"sequence": sequence, "per_layer": layer, "outside_layers": rest_real}
    if not checkpointing:
        out["activations"] = rest_real + depth * layer
        return out
    kept, kept_rest = layer_and_rest(lambda n: measure(n, small_vocab, True))
    kept_rest += per_vocab * (config.vocab_size - small_vocab)
    out.update({"per_layer_checkpointed": kept, "activations": kept_rest + depth * kept + layer})
    return out


# --- table -------------------------------------------------------------------------------------------------------

def at_batch(measure: Callable[[int], dict[str, float]], batch: int) -> dict[str, float]:
    """``measure(batch)`` from measurements at batches 1 and 2 only: saved activations are affine in the batch (a
    per-sample part and a shared part such as position tables), so batch B is m(1) + (B - 1) (m(2) - m(1)). Keeps
    the benchmark's own memory to what batch 2 of a two-layer model needs (a direct fp32 batch-4 run of the tower
    peaked at 16 GB of host memory)."""
    one = measure(1)
    if batch == 1:
        return one
    two = measure(2)
    return {key: one[key] + (batch - 1) * (two[key] - one[key]) for key in one}


def fits(total_bytes: float) -> dict[str, str]:
    return {card: "yes" if total_bytes <= capacity else "no" for card, capacity in CARDS.items()}


def contrastive_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    lm = lm_preset_name(args.lm)
    lm_bytes = four_bit_lm_bytes(lm_text_config(lm))["bytes"]
    vision = vision_parameters()
    states = vision * (4 + 4 + 8)  # fp32 weights, gradients, AdamW's two moments
    rows = []
    for precision in ("fp32", "bf16"):
        copies = vision * 2 if precision == "bf16" else 0  # autocast's bf16 copy of each weight, for the step
        for batch in args.batches:
            for checkpointing in (False, True):
                act = at_batch(lambda b, p=precision, c=checkpointing: contrastive_activations(
                    args.volume_size, args.depth_patch, b, p, c), batch)
                total = act["activations"] + states + copies + lm_bytes
                rows.append({"stage": "contrastive", "precision": precision, "batch": batch,
                             "checkpointing": "on" if checkpointing else "off",
                             "activations GiB (measured)": round(act["activations"] / GIB, 2),
                             "per layer MiB (measured)": round(act["per_layer"] / 2**20, 1),
                             "encoder weights+grads+AdamW (+bf16 copies) GiB": round((states + copies) / GIB, 2),
                             f"4-bit {lm} GiB": round(lm_bytes / GIB, 2),
                             "total GiB": round(total / GIB, 2), **fits(total)})
    return rows


def lora_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    lm = lm_preset_name(args.lm)
    config = lm_text_config(lm)
    lm_bytes = four_bit_lm_bytes(config)["bytes"]
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    width, heads, kv, head_dim = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                  config.head_dim)
    shapes = {"q_proj": (width, heads * head_dim), "k_proj": (width, kv * head_dim), "v_proj": (width, kv * head_dim),
              "o_proj": (heads * head_dim, width)}
    lora = config.num_hidden_layers * sum(4 * (fan_in + fan_out) for fan_in, fan_out in (shapes[n] for n in attention))
    projector = 1152 * width + width + width * width + width + 1
    trained = (lora + projector) * (4 + 4 + 8)
    frozen_vision = vision_parameters() * 4  # kept in fp32 beside the LM; volumes are encoded once, before the step
    rows = []
    for precision in ("bf16",):  # a 4-bit LM computes in bf16 (the seed's compute dtype)
        for batch in args.batches:
            for checkpointing in (False, True):
                act = at_batch(lambda b, p=precision, c=checkpointing: lora_activations(
                    config, b, p, c, args.report_tokens), batch)
                total = act["activations"] + trained + lm_bytes + frozen_vision
                rows.append({"stage": "lora", "precision": precision, "batch": batch,
                             "checkpointing": "on" if checkpointing else "off",
                             "activations GiB (measured)": round(act["activations"] / GIB, 2),
                             "per layer MiB (measured)": round(act["per_layer"] / 2**20, 1),
                             "LoRA+projector weights+grads+AdamW GiB": round(trained / GIB, 3),
                             f"4-bit {lm} GiB": round(lm_bytes / GIB, 2),
                             "frozen encoder GiB": round(frozen_vision / GIB, 2),
                             "total GiB": round(total / GIB, 2), **fits(total)})
    return rows


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    from brain3d_report.model import check_volume_fits

    check_volume_fits(args.volume_size, "medsiglip-448", args.depth_patch)
    torch.set_grad_enabled(True)
    rows = contrastive_rows(args) if args.stage == "contrastive" else lora_rows(args)
    print(markdown_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"stage": args.stage, "volume_size": args.volume_size, "rows": rows},
                                        indent=2) + "\n")
    assert math.isfinite(sum(r["total GiB"] for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
