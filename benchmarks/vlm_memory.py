"""Memory of MedGemma-4B in bf16, 4-bit NF4 and 8-bit, measured on random weights of the published architecture.

    python -m benchmarks.vlm_memory --device cuda
    python -m benchmarks.vlm_memory --arch tiny-gemma3 --device cpu

The architecture comes from the ``vlm`` presets of ``common.presets`` (``medgemma-4b``: its published
configuration; ``--arch tiny-gemma3``: the tiny Gemma 3 of the tests). It is built on the meta device, filled
with random bf16 weights on the target device and saved once with ``save_pretrained`` to a temporary
directory; each precision then loads that checkpoint through ``common.hf.load_pretrained``, the same call a
hub id or a local MedGemma copy goes through. Random weights need no download and occupy exactly the bytes
of the real ones. Columns: parameters of the architecture; footprint = ``get_memory_footprint()`` (weights and
buffers as stored: packed 4-bit, int8); load time from the saved checkpoint; on CUDA also the device memory
allocated after loading and its peak while loading. A precision bitsandbytes cannot run here is a "skipped" row.
On CPU the bf16 step needs about 9 GB of RAM (twice that while saving).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Gemma3ForConditionalGeneration

from common import hf
from common.cli import MedvlArgumentParser, base_parser, parse_args
from common.device import pick_device
from common.errors import ConfigError, cli_entry
from common.presets import get_preset, preset_names
from common.rundir import atomic_write_text
from common.tables import markdown_table

ARCHS = tuple(preset_names("vlm"))
"""``--arch``: the ``vlm`` presets of ``common.presets`` (the real architecture and its tiny twin)."""
PRECISIONS = {"bf16": "none", "4bit": "4bit", "8bit": "8bit"}
GB = 1e9


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="medgemma-4b", choices=ARCHS,
                        help="VLM architecture measured (random weights)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="weight formats measured, one row each")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the temporary random checkpoint is written (default: the system temp dir)")
    return parser


def architecture(arch: str):
    """The model config of a ``vlm`` preset: the real one from its skeleton, a tiny one from its builder."""
    preset = get_preset(arch, "vlm", "--arch")
    if preset.build is not None:
        return preset.build(seed=0)[0].config
    with torch.device("meta"):
        return preset.skeleton().config


def write_random_checkpoint(config, directory: Path, device: torch.device, seed: int) -> int:
    """Save random bf16 weights of ``config`` to ``directory``; returns the parameter count.

    Built on the meta device and materialised on ``device`` directly, so no fp32 copy is ever made.
    """
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage; the checkpoint must hold one copy
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    _release(device)
    return count


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(checkpoint: Path, precision: str, device: torch.device) -> dict:
    """Load ``checkpoint`` at one precision through common.hf and read its memory."""
    row = {"precision": precision, "device": str(device)}
    _release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    try:
        model = hf.load_pretrained(Gemma3ForConditionalGeneration, checkpoint, quantization=PRECISIONS[precision],
                                   dtype=torch.bfloat16, device=device)
    except ConfigError as err:
        return {**row, "footprint GB": None, "note": f"skipped: {err.message}"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row["load time s"] = time.perf_counter() - start
    row["footprint GB"] = hf.model_memory_bytes(model) / GB
    if device.type == "cuda":
        row["allocated GB"] = (torch.cuda.memory_allocated(device) - before) / GB
        row["peak GB"] = (torch.cuda.max_memory_allocated(device) - before) / GB
    del model
    _release(device)
    return row


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    device = pick_device(args.device)
    config = architecture(args.arch)
    with tempfile.TemporaryDirectory(prefix="vlm-memory-", dir=args.work_dir) as tmp:
        start = time.perf_counter()
        count = write_random_checkpoint(config, Path(tmp), device, args.seed)
        print(f"random {args.arch} checkpoint ({count:,} parameters) written in "
              f"{time.perf_counter() - start:.1f} s")
        rows = [{"parameters": f"{count:,}", **measure(Path(tmp), p, device)} for p in args.precisions]
    columns = ["precision", "parameters", "footprint GB", "load time s", "device"]
    if device.type == "cuda":
        columns += ["allocated GB", "peak GB"]
    if any("note" in row for row in rows):
        columns.append("note")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = f"## {args.arch} weight memory ({name})\n\n" + markdown_table(rows, columns)
    print(table)
    if args.output_dir is not None:
        atomic_write_text(Path(args.output_dir) / f"vlm_memory_{args.arch}_{device.type}.md", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
