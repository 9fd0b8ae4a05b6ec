"""Tokens per volume and peak memory of one stage-3 (LoRA) step of the 3D report model at batch 1.

    python -m benchmarks.brain3d_memory --device cpu                       # tiny twins (siglip-tiny, tiny-gemma3)
    python -m benchmarks.brain3d_memory --device cuda --vision medsiglip-448 --lm medgemma-4b --quantization 4bit \\
        --volume-size 64 126 126

For each setting (gradient checkpointing off and on, the volume encoded in the step; and the volume encoded once
beforehand, as stages 2 and 3 do with their frozen encoder: ``encode_frozen``) it builds the model, adds the LoRA
adapters, runs one forward + backward of the captioning loss on a random volume and a 128-token report, and prints
a table: visual
tokens before and after compression, trainable parameters, step seconds and peak memory (CUDA: the allocator's
peak; CPU: the growth of the process's peak resident set, a coarser figure). The real sizes need a GPU and the hub
(MedGemma is gated); the tiny twins run anywhere.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Sequence

import torch

from brain3d_report.model import build_model, trainable_parameters
from brain3d_report.train import add_lora, encode_frozen, prompt_tokens
from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import pick_device
from common.errors import cli_entry
from common.tables import markdown_table


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(device=True, precision=True, cache_dir=True, quantization=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", default="siglip-tiny")
    parser.add_argument("--lm", default="tiny-gemma3")
    parser.add_argument("--volume-size", type=positive_int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--report-tokens", type=positive_int, default=128)
    return parser


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_step(args: argparse.Namespace, device: torch.device, checkpointing: bool,
             encoded_once: bool = False) -> dict[str, object]:
    model = build_model(args.vision, args.lm, quantization=args.quantization, device=device,
                        precision=args.precision, cache_dir=args.cache_dir)
    add_lora(model, 4, 8, 0.0)
    trainable = trainable_parameters(model, "lora")
    grid = model.vision.token_grid(args.volume_size)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    volume = torch.rand(1, 1, *args.volume_size, device=device)
    if encoded_once:
        volume = encode_frozen(model, volume, device).to(device)
    prompt = prompt_tokens(model.tokenizer).to(device)
    report = torch.randint(5, 100, (1, args.report_tokens), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else _peak_rss_mib()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model.caption_loss(volume, prompt, report)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (allocator peak)"
    else:
        peak = f"+{_peak_rss_mib() - before:.0f} MiB (peak RSS growth)"
    return {"vision": args.vision, "lm": args.lm, "volume": "x".join(map(str, args.volume_size)),
            "checkpointing": "on" if checkpointing else "off",
            "encoder": "once, before the step" if encoded_once else "in the step",
            "visual tokens": grid[0] * grid[1] * grid[2], "after compression": model.num_latents,
            "trainable": sum(p.numel() for p in trainable.values()), "step s": f"{time.perf_counter() - start:.2f}",
            "peak memory": peak}


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    rows = [one_step(args, device, checkpointing) for checkpointing in (False, True)]
    rows.append(one_step(args, device, False, encoded_once=True))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
