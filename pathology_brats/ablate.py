"""Image only, caption only and fused, trained on the same split: one table of the challenge's scores.

Example (CPU, phantom):
    python -m pathology_brats.ablate --data-root data/histology_phantom \\
        --captions data/histology_phantom/captions.jsonl --output-dir runs/brats_path/ablation \\
        --encoder gigapath-tiny --text-encoder minilm

Each row is a run under ``--output-dir`` (``image``, ``text``, ``fused``) with the same seed, split and settings,
evaluated on the same held-out test tiles. Finished runs are reused and interrupted ones resumed. Flags after
``--`` go to every training run (e.g. ``-- --epochs 5``). ``ablation.json`` maps each row to its scores.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.cli import MedvlArgumentParser, base_parser, parse_args, require
from common.errors import cli_entry
from common.run_guard import guard_command
from common.rundir import atomic_write_json, atomic_write_text, result_set
from common.runs import train_or_resume
from common.tables import ci_cell, markdown_table
from pathology_brats import evaluate, train
from pathology_brats.challenge_metrics import SCORER_KEYS
from pathology_brats.model import MODALITIES
from pathology_brats.shared import (
    add_captions_arg,
    add_data_root_arg,
    add_encoder_arg,
    add_feature_cache_arg,
    add_labels_csv_arg,
    add_n_boot_arg,
    add_schema_arg,
    add_text_encoder_arg,
)


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root_arg(parser, help="ROOT/<CLS>/*.jpg, or the labels CSV's images")
    add_labels_csv_arg(parser)
    add_captions_arg(parser, help="captions JSONL (default: <data-root>/captions.jsonl)")
    add_schema_arg(parser)
    add_encoder_arg(parser)
    add_text_encoder_arg(parser, help="caption encoder of every run")
    add_feature_cache_arg(parser)
    add_n_boot_arg(parser)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra flags for every training run")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "labels_csv", "captions", "feature_cache",
                  "cache_dir"), lock="output_dir", create=True)
    require(args, output_dir="where the three runs and the table are written", data_root="the tiles")
    out = Path(args.output_dir)
    shared = ["--data-root", str(args.data_root), "--schema", args.schema, "--encoder", args.encoder,
              "--text-encoder", args.text_encoder, "--seed", str(args.seed), "--device", args.device,
              "--precision", args.precision, "--no-progress"]
    shared += ["--captions", str(args.captions)] if args.captions else []
    shared += ["--labels-csv", str(args.labels_csv)] if args.labels_csv else []
    shared += ["--feature-cache", str(args.feature_cache)] if args.feature_cache else []
    shared += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    extra = [a for a in args.train_args if a != "--"]
    keys = SCORER_KEYS[args.schema]
    rows, summary = [], {}
    for modality in MODALITIES[1:] + MODALITIES[:1]:  # image, text, fused
        run = out / modality
        train_or_resume(train, [*shared, "--modality", modality, "--output-dir", str(run), *extra], run)
        results = evaluate.evaluate_run(run, n_boot=args.n_boot, device=args.device, seed=args.seed,
                                        cache_dir=args.cache_dir, feature_cache=args.feature_cache)
        summary[modality] = {k: results[k] for k in results if any(k.startswith(key) for key in keys)}
        rows.append({"modality": modality, **{k: ci_cell(results, k) for k in keys}})
    text = (f"# BraTS-Path {args.schema} ablation ({args.encoder}, {args.text_encoder}; test tiles, 95% bootstrap "
            f"CI)\n\n{markdown_table(rows)}")
    with result_set(out) as staging:  # the table and its numbers replace the old pair together
        atomic_write_text(staging / "ablation.md", text)
        atomic_write_json(staging / "ablation.json", summary)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
