"""How much the organisers' 2026 AUROC moves with the CPU's SIMD path, on one seeded submission.

    python -m benchmarks.brats_auroc_ties --rows 1000 --accuracy 0.45 --seeds 0 1 2

For each seed it writes a 2026 gold CSV (``Name,GT``) and a submission (3% of rows left out: penalty label 10),
then runs ``python -m pathology_brats.score`` once per ``ATEN_CPU_CAPABILITY`` (default, avx2, avx512: torch
falls back to the best the CPU has when one is missing) and prints every key. GaNDLF scores
``softmax(one_hot(prediction))`` in float32; the tied scores it means to produce come out an ulp apart depending
on the vector path, and torchmetrics' ROC splits the ties by that noise: ``auroc_per_class_weighted`` changes
with the path while ``auroc_per_class_weighted_exact`` and every other key stay put.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import MedvlArgumentParser, nonnegative_int, parse_args, positive_int, unit_interval
from common.errors import cli_entry

PATHS = ("default", "avx2", "avx512")


def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=positive_int, default=1000,
                        help="rows of each simulated submission and its gold table")
    parser.add_argument("--accuracy", type=unit_interval, default=0.45, help="share of rows predicted right")
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2],
                        help="seeds, one simulated case each")
    return parser


def write_case(folder: Path, rows: int, accuracy: float, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, rows)
    p = np.where(rng.random(rows) < accuracy, y, rng.integers(0, 10, rows))
    ids = [f"val_{i:05d}.png" for i in range(rows)]
    kept = rng.random(rows) >= 0.03
    gold, submission = folder / f"gold_{seed}.csv", folder / f"submission_{seed}.csv"
    pd.DataFrame({"Name": ids, "GT": y}).to_csv(gold, index=False)
    pd.DataFrame({"SubjectID": np.array(ids)[kept], "Prediction": p[kept]}).to_csv(submission, index=False)
    return submission, gold


def score_under(path: str, submission: Path, gold: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": path}
    subprocess.run([sys.executable, "-m", "pathology_brats.score", "--submission", str(submission), "--gold",
                    str(gold), "--schema", "2026", "--json", str(out)], env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in args.seeds:
            submission, gold = write_case(folder, args.rows, args.accuracy, seed)
            results = {path: score_under(path, submission, gold, folder / f"{seed}_{path}.json") for path in PATHS}
            keys = list(results[PATHS[0]])
            print(f"seed {seed}: " + "  ".join(f"{path}: auroc {results[path]['auroc_per_class_weighted']:.4f}"
                                              for path in PATHS)
                  + f"  exact {results[PATHS[0]]['auroc_per_class_weighted_exact']:.4f}")
            moved = [k for k in keys if len({results[path][k] for path in PATHS}) > 1]
            print(f"  keys that differ between paths: {', '.join(moved) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
