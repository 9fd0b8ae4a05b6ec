"""The three brain report stages with the real pretrained Gemma 3 270M (``--lm gemma3-270m``) on the brain phantom.

    # CPU, a short schedule (every code path of the real LM; the numbers say little at this length):
    python -m benchmarks.brain3d_gemma3 --work-dir runs/bench/gemma3 --cases 12 --epochs 1 1 1
    # GPU, the full schedule (each stage's seed recipe, configs/brain3d_report/medgemma.<stage>.yaml; MedSigLIP
    # needs the hub or its cache):
    python -m benchmarks.brain3d_gemma3 --work-dir runs/bench/gemma3-gpu --device cuda --cases 120 \\
        --volume-size 32 64 64 --epochs 8 10 15 --vision medsiglip-448

Runs ``brain3d_report.train`` for ``contrastive``, ``warmup`` and ``lora`` (each through the one training loop, as a
user would), then ``generate`` on ``--split`` with and without ``--shuffle-volumes`` (the control that pairs each
report with another case's volume) and ``evaluate``, and prints two tables: seconds per optimizer step of each stage
(wall time of its epochs from the run's ``metrics.jsonl`` over its steps, validation included; model loading
excluded) and the laterality table (``lat_f1``, ``lat_f1_shuffled``, ``healthy_specificity``, ...). The phantom is
written into the work directory unless ``--data-root`` names one. Needs the ``gemma3`` extra.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from common.cli import MedvlArgumentParser, nonnegative_int, parse_args, positive_int
from common.errors import ConfigError, cli_entry
from common.tables import markdown_table

STAGES = ("contrastive", "warmup", "lora")
SEED_RECIPES = Path(__file__).resolve().parents[1] / "configs" / "brain3d_report"
"""Each stage's seed schedule, `medgemma.<stage>.yaml` (the real models' settings in it are overridden here)."""
LATERALITY_KEYS = ("lat_f1", "lat_f1_shuffled", "lat_f1_seed", "healthy_specificity", "tumour_sensitivity",
                   "anat_f1", "path_f1")


def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(prog="python -m benchmarks.brain3d_gemma3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the phantom, runs and predictions go")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="an existing brain phantom or dataset (default: write a phantom into WORK_DIR/phantom)")
    parser.add_argument("--cases", type=positive_int, default=12,
                        help="tumour cases of the written phantom (12 or more: the 70/10/20 split needs a val case)")
    parser.add_argument("--phantom-size", type=positive_int, nargs=3, default=(32, 32, 32), metavar=("D", "H", "W"),
                        help="voxels of the written phantom")
    parser.add_argument("--volume-size", type=positive_int, nargs=3, default=(16, 32, 32), metavar=("D", "H", "W"),
                        help="model input size (--volume-size of train)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (passed to every step)")
    parser.add_argument("--vision", default="siglip-tiny", help="vision tower preset (medsiglip-448 on a GPU)")
    parser.add_argument("--lm", default="gemma3-270m", help="language model preset")
    parser.add_argument("--quantization", default="none", help="none, 4bit or 8bit for the LM")
    parser.add_argument("--epochs", type=positive_int, nargs=3, default=None, metavar=("C", "W", "L"),
                        help="epochs of the contrastive, warmup and lora stages (default: each stage's seed recipe)")
    parser.add_argument("--max-text-len", type=positive_int, default=128, help="report tokens kept in training")
    parser.add_argument("--max-new-tokens", type=positive_int, default=96, help="tokens generated per report")
    parser.add_argument("--split", default="test", help="the split generated and scored (val while tuning)")
    parser.add_argument("--train-args", default="",
                        help="further train flags for every stage, one shell-quoted string (e.g. '--grad-accum 2')")
    parser.add_argument("--cache-dir", type=Path, default=None, help="medvl / Hugging Face cache root")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the phantom, every stage and decoding")
    return parser


def stage_speed(run: Path) -> dict:
    """Steps, epochs and seconds per optimizer step of a finished run, from its ``metrics.jsonl``."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [row for row in rows if "step" in row and "elapsed_s" in row]
    if not rows:
        return {"epochs": 0, "steps": 0, "s_per_step": float("nan")}
    steps, elapsed = rows[-1]["step"], rows[-1]["elapsed_s"]
    return {"epochs": len(rows), "steps": steps, "s_per_step": round(elapsed / max(1, steps), 2)}


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(code)  # the step printed its own one-line error


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    if args.work_dir is None:
        raise ConfigError("--work-dir", "required: where the phantom, runs and predictions go")
    from brain3d_report import evaluate, generate, train

    work = Path(args.work_dir)
    data_root = args.data_root
    if data_root is None:
        from common.phantoms.brain import write_brain

        data_root = work / "phantom"
        if not (data_root / "truth.json").exists():
            write_brain(data_root, n=args.cases, seed=args.seed, size=tuple(args.phantom_size))
    common = ["--data-root", str(data_root), "--volume-size", *map(str, args.volume_size), "--device", args.device,
              "--max-text-len", str(args.max_text_len), "--seed", str(args.seed), "--no-progress",
              "--volume-cache", str(work / "volumes"), *shlex.split(args.train_args)]
    if args.cache_dir is not None:
        common += ["--cache-dir", str(args.cache_dir)]
    speed, previous = [], None
    for number, stage in enumerate(STAGES):
        run = work / f"r{number + 1}-{stage}"
        # the seed's schedule of the stage (its recipe); the flags here and --train-args override it
        argv_stage = ["--config", str(SEED_RECIPES / f"medgemma.{stage}.yaml"), "--stage", stage, "--output-dir",
                      str(run), *common]
        if args.epochs is not None:
            argv_stage += ["--epochs", str(args.epochs[number])]  # whole epochs: a later stage starts from the best
        if previous is None:
            argv_stage += ["--vision", args.vision, "--lm", args.lm, "--quantization", args.quantization]
        else:
            argv_stage += ["--init", str(previous)]
        start = time.perf_counter()
        _check(train.main(argv_stage), stage)
        speed.append({"stage": stage, **stage_speed(run), "wall_s": round(time.perf_counter() - start, 1)})
        previous = run
    runtime = ["--device", args.device, "--volume-cache", str(work / "volumes")] + (
        ["--cache-dir", str(args.cache_dir)] if args.cache_dir else [])
    for shuffled in (False, True):
        _check(generate.main(["--run-dir", str(previous), "--split", args.split, "--greedy", "--overwrite",
                              "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), *runtime,
                              *(["--shuffle-volumes"] if shuffled else [])]), "generate")
    _check(evaluate.main(["--run-dir", str(previous), "--split", args.split, "--n-boot", "200",
                          "--bertscore", "none", "--no-meteor"]), "evaluate")
    name = "metrics_full.json" if args.split == "test" else f"metrics_full_{args.split}.json"
    scores = json.loads((previous / name).read_text())
    print(f"\nseconds per optimizer step, --lm {args.lm} --vision {args.vision} on {args.device}:")
    print(markdown_table(speed), end="")
    print(f"\nlaterality on the {args.split} split ({previous}):")
    print(markdown_table([{key: round(scores[key], 3) if isinstance(scores.get(key), float) else scores.get(key)
                           for key in LATERALITY_KEYS}]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
