"""A toy pipeline written the way ARCHITECTURE.md tells a newcomer to add one, end to end on the shared floor.

If this file needs more than the steps in ARCHITECTURE.md, the guide is wrong: keep them in step.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from common.cli import MedvlArgumentParser, base_parser, config_text, parse_args, positive_int
from common.engine import add_train_args, check_run_setup, config_from_args, fit
from common.errors import DataError, cli_entry
from common.metrics.classification import binary_metrics
from common.rundir import atomic_write_text, read_jsonl, result_set
from common.runs import load_run, model_record, save_run_model
from common.tables import metrics_with_ci, write_results

# --- toy/model.py ---------------------------------------------------------------------------------------------


class ToyNet(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def build_from_record(meta: dict) -> ToyNet:
    return ToyNet(**meta["kwargs"])


# --- toy/data.py ------------------------------------------------------------------------------------------------

def toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two features; the label is which side of a circle the point lies on (needs the hidden layer)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen)
    return x, (x.pow(2).sum(1) > 1.2).float()


# --- toy/train.py -----------------------------------------------------------------------------------------------

class ToyTask:
    metric_names = ("auroc", "loss")

    def __init__(self, meta: dict):
        self.meta = meta

    def training_loss(self, model, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(model(x).float(), y)

    def validate(self, model, loader, device):
        logits = torch.cat([model(x).float() for x, _ in loader]).cpu()
        labels = torch.cat([y for _, y in loader]).cpu()
        scores = torch.sigmoid(logits).numpy()
        return {"auroc": binary_metrics(labels.numpy(), scores)["auroc"],
                "loss": F.binary_cross_entropy_with_logits(logits, labels).item()}

    def save_best(self, model, metrics, directory: Path) -> None:
        save_run_model(directory, model, {**self.meta, "val_metrics": metrics})


def get_train_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True)
    parser = MedvlArgumentParser(parents=[parent])
    parser.add_argument("--width", type=positive_int, default=16)
    parser.add_argument("--n", type=positive_int, default=400)
    add_train_args(parser, epochs=8, batch_size=32, lr=1e-2, monitor="val_auroc", mode="max")
    return parser


@cli_entry
def train_main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_train_parser(), argv)
    check_run_setup(config_from_args(args), args.output_dir)
    x, y = toy_data(args.n, seed=1)
    cut = int(0.8 * args.n)
    torch.manual_seed(args.seed)
    model = ToyNet(args.width)
    meta = model_record(pipeline="toy", stage="train", preset="toynet", kwargs={"width": args.width},
                        labels=["inside", "outside"], preprocessing={}, thresholds={"decision": 0.5},
                        monitor=args.monitor, data={"n": args.n})
    fit(model, torch.optim.AdamW(model.parameters(), lr=args.lr), TensorDataset(x[:cut], y[:cut]),
        TensorDataset(x[cut:], y[cut:]), ToyTask(meta), config_from_args(args), args.output_dir,
        run_files={"config.yaml": config_text(args)})
    return 0


# --- toy/evaluate.py --------------------------------------------------------------------------------------------

@cli_entry
def evaluate_main(argv: Sequence[str] | None = None) -> int:
    parser = MedvlArgumentParser(parents=[base_parser(seed=True, device=True)])
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parse_args(parser, argv)
    loaded = load_run(args.run_dir, "toy", build_from_record, stage="train")
    x, y = toy_data(200, seed=2)  # the held-out test set
    with torch.no_grad():
        scores = torch.sigmoid(loaded.model(x)).numpy()
    threshold = loaded.meta["thresholds"]["decision"]
    results = metrics_with_ci(lambda a: binary_metrics(a["y"], a["score"], threshold),
                              {"y": y.numpy(), "score": scores}, keys=("auroc", "acc"), n_boot=100, seed=args.seed)
    with result_set(args.run_dir) as staging:
        lines = "".join(f"{i},{int(t)},{s:.6f}\n" for i, (t, s) in enumerate(zip(y.numpy(), scores)))
        atomic_write_text(staging / "predictions" / "test.csv", "index,label,score\n" + lines)
        write_results(staging, results, "toy, test split")
    return 0


# --- tests/toy ----------------------------------------------------------------------------------------------------

def test_toy_pipeline_learns_evaluates_and_resumes(tmp_path):
    run = tmp_path / "run"
    common = ["--output-dir", str(run), "--device", "cpu", "--precision", "fp32", "--no-progress"]
    assert train_main([*common, "--max-steps", "20"]) == 0
    assert train_main([*common, "--resume"]) == 0
    assert evaluate_main(["--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["auroc"] > 0.85 and results["auroc_ci_low"] <= results["auroc"] <= results["auroc_ci_high"]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 9))
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["pipeline"] == "toy" and meta["kwargs"] == {"width": 16} and meta["val_metrics"]["val_auroc"] > 0.85

    uninterrupted = tmp_path / "straight"
    assert train_main(["--output-dir", str(uninterrupted), "--device", "cpu", "--precision", "fp32",
                       "--no-progress"]) == 0
    a = load_run(run, "toy", build_from_record).model.state_dict()
    b = load_run(uninterrupted, "toy", build_from_record).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_loader_for_every_pipeline(tmp_path):
    meta = model_record(pipeline="toy", stage="train", preset="toynet", kwargs={"width": 4}, labels=[],
                        preprocessing={}, thresholds={}, monitor=None, data={})
    save_run_model(tmp_path / "best", ToyNet(4), meta)
    assert isinstance(load_run(tmp_path, "toy", build_from_record).model, ToyNet)
    with pytest.raises(DataError, match="pipeline is 'toy': not a pneumonia model"):
        load_run(tmp_path, "pneumonia", build_from_record)
    with pytest.raises(DataError, match="stage is 'train'"):
        load_run(tmp_path, "toy", build_from_record, stage="pretrain")
    with pytest.raises(DataError, match="weights do not fit"):
        load_run(tmp_path, "toy", lambda m: ToyNet(5))
    with pytest.raises(DataError, match="kwargs do not fit"):
        load_run(tmp_path, "toy", lambda m: ToyNet(**m["kwargs"], depth=2))
    with pytest.raises(DataError, match="missing key 'stage'"):
        save_run_model(tmp_path / "other", ToyNet(4), {k: v for k, v in meta.items() if k != "stage"})
    assert np.isnan(binary_metrics([1, 1], [0.2, 0.9])["auroc"])
