"""The ablation table on one split: phase 1 with BCE only, + LRF tail, + LRF seed, and fusion over the tail model.

Example (CPU, phantom):
    python -m mavl_chexpert.ablate --data-root data/chexpert_phantom --output-dir runs/mavl/ablation \\
        --backbone vit-tiny --text-encoder minilm

Each row is a run directory under ``--output-dir`` (``image_none``, ``image_tail``, ``image_seed``,
``fusion_tail``), trained with the same seed, patient split and settings, then evaluated on the test set with
thresholds from validation. Finished runs are reused and interrupted ones resumed, so a killed ablation continues
where it stopped. Flags after ``--`` go to every phase-1 run (e.g. ``-- --epochs 5``); ``--fusion-args`` to phase 3.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path

from common.cli import MedvlArgumentParser, base_parser, parse_args, require
from common.errors import cli_entry
from common.run_guard import guard_command
from common.rundir import atomic_write_json, atomic_write_text, result_set
from common.runs import train_or_resume
from common.tables import ci_cell, markdown_table
from mavl_chexpert import evaluate, train_fusion, train_image
from mavl_chexpert.shared import add_backbone_arg, add_data_root_arg, add_n_boot_arg, add_text_encoder_arg

ROWS = (("image_none", "phase 1: BCE only", "none"), ("image_tail", "phase 1: BCE + LRF tail (LRFL)", "tail"),
        ("image_seed", "phase 1: BCE + LRF seed (top singular values)", "seed"))
FUSION_ROW = ("fusion_tail", "phase 3: fusion over phase 1 tail")
COLUMNS = ("auroc_macro", "f1_macro", "f1_micro", "hamming_loss")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root_arg(parser, help="the CheXpert-v1.0-small folder")
    add_backbone_arg(parser, presets_only=True)
    add_text_encoder_arg(parser)
    add_n_boot_arg(parser)
    parser.add_argument("--fusion-args", default="", help="extra flags for train_fusion, as one quoted string")
    parser.add_argument("image_args", nargs=argparse.REMAINDER,
                        help="after --: extra flags for every train_image run (e.g. -- --epochs 5)")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "cache_dir"), lock="output_dir", create=True)
    require(args, output_dir="where the ablation runs and table are written",
            data_root="the CheXpert-v1.0-small folder")
    extra = [a for a in args.image_args if a != "--"]
    out = Path(args.output_dir)
    shared = ["--seed", str(args.seed), "--device", args.device, "--precision", args.precision, "--no-progress"]
    rows = []
    for name, label, variant in ROWS:
        run = out / name
        train_or_resume(train_image, ["--data-root", str(args.data_root), "--output-dir", str(run), "--backbone",
                             args.backbone, "--lrf-variant", variant, *shared, *extra], run)
        rows.append((name, label, run))
    fusion = out / FUSION_ROW[0]
    cache = ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    train_or_resume(train_fusion, ["--data-root", str(args.data_root), "--image-run", str(out / "image_tail"),
                          "--output-dir", str(fusion), "--text-encoder", args.text_encoder, *shared, *cache,
                          *shlex.split(args.fusion_args)], fusion)
    rows.append((FUSION_ROW[0], FUSION_ROW[1], fusion))
    table, summary = [], {}
    for name, label, run in rows:
        results = evaluate.evaluate_run(run, "test", n_boot=args.n_boot, device=args.device, seed=args.seed)
        summary[name] = {k: results.get(k) for k in results if any(k.startswith(c) for c in COLUMNS)}
        table.append({"row": label, "run": name, **{c: ci_cell(results, c) for c in COLUMNS}})
    text = (f"# MAVL CheXpert ablation ({args.backbone}, test split, thresholds from validation; 95% bootstrap CI)"
            f"\n\n{markdown_table(table)}")
    with result_set(out) as staging:  # the table and its numbers replace the old pair together
        atomic_write_text(staging / "ablation.md", text)
        atomic_write_json(staging / "ablation.json", summary)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
