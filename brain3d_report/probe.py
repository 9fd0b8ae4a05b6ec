"""Linear probe of tumour side on a run's pooled visual tokens: does the encoder see left from right?

Example:
    python -m brain3d_report.probe --run-dir runs/brain/r1

The run's model encodes every left- or right-sided tumour case of its split; a logistic regression (features
standardised on the training cases) is fitted on the training cases and scored on the test cases (``side_acc``).
The control fits the same probe with the training sides shuffled across volumes (``side_acc_shuffled``): it must
stay near chance, or the probe reads something other than the volume. Writes ``probe.json`` in the run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from brain3d_report.data import load_cases, make_dataset
from brain3d_report.shared import add_data_root_arg, add_volume_cache_arg
from brain3d_report.train import PIPELINE, model_builder
from common.cli import MedvlArgumentParser, base_parser, parse_args, require
from common.device import pick_device
from common.errors import DataError, cli_entry
from common.feature_cache import default_cache_root
from common.run_guard import guard_command
from common.rundir import atomic_write_json
from common.runs import load_run

SIDES = ("left", "right")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="a brain3d_report run (any stage)")
    add_data_root_arg(parser, help="default: the run's data root")
    add_volume_cache_arg(parser)
    parser.add_argument("--eval-split", default="test", choices=("val", "test"),
                        help="the split the side probe is scored on (it is fitted on the training split)")
    return parser


@torch.no_grad()
def pooled_features(model, volumes: torch.Tensor, device: torch.device, batch_size: int = 4) -> np.ndarray:
    model.eval()
    out = [model.pooled(volumes[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(volumes),
                                                                                             batch_size)]
    return torch.cat(out).numpy()


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy on the test cases of a logistic regression fitted on standardised training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    probe.fit(train_x, train_y)
    return float((probe.predict(test_x) == test_y).mean())


def side_probe(features: dict[str, np.ndarray], sides: dict[str, np.ndarray], seed: int = 0,
               eval_split: str = "test") -> dict[str, float | int]:
    """``side_acc`` and the shuffled-label control ``side_acc_shuffled`` (mean over 5 shuffles)."""
    train_x, train_y = features["train"], sides["train"]
    test_x, test_y = features[eval_split], sides[eval_split]
    for name, y in (("train", train_y), (eval_split, test_y)):
        if len(set(y.tolist())) < 2:
            raise DataError(name, f"the {name} split needs left- and right-sided tumours for a side probe")
    rng = np.random.default_rng(seed)
    shuffled = [fit_probe(train_x, rng.permutation(train_y), test_x, test_y) for _ in range(5)]
    majority = max(np.mean(test_y == s) for s in SIDES)
    return {"side_acc": fit_probe(train_x, train_y, test_x, test_y), "side_acc_shuffled": float(np.mean(shuffled)),
            "majority_acc": float(majority), "n_train": int(len(train_y)), "n_eval": int(len(test_y)),
            "eval_split": eval_split}


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("data_root", "volume_cache", "cache_dir"), lock="run_dir")
    require(args, run_dir="the run to probe")
    device = pick_device(args.device)
    loaded = load_run(args.run_dir, PIPELINE, model_builder(device, args.cache_dir), device=device)
    meta = loaded.meta
    data_root = args.data_root or Path(meta["data"]["root"])
    split_csv = Path(args.run_dir) / "split.csv"
    cases = load_cases(data_root, reports=meta["data"].get("reports"), split=str(split_csv))
    cache = args.volume_cache or default_cache_root(args.cache_dir, "volumes")
    size = meta["preprocessing"]["volume_size"]
    features, sides = {}, {}
    for name in ("train", args.eval_split):
        part = [c for c in cases.split(name) if c.side in SIDES]
        dataset = make_dataset(part, size, cache)
        volumes = torch.stack([dataset[i]["image"] for i in range(len(dataset))]) if part else torch.zeros(0)
        features[name] = pooled_features(loaded.model, volumes, device) if part else np.zeros((0, 1))
        sides[name] = np.array([c.side for c in part])
    result = side_probe(features, sides, args.seed, args.eval_split)
    atomic_write_json(Path(args.run_dir) / "probe.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
