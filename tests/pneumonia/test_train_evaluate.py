"""Pneumonia end to end on a phantom: train through the CLI, evaluate once on test, values checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pneumonia import evaluate


def test_phantom_run_learns_and_evaluates(trained_pneumonia_run):
    run_dir, npz = trained_pneumonia_run
    meta = json.loads((run_dir / "best" / "model.json").read_text())
    assert 0.0 < meta["thresholds"]["decision"] < 1.0 and meta["threshold_rule"] == "youden"
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    best = max(history, key=lambda h: h["val_auroc"])
    assert meta["val_metrics"]["val_auroc"] == best["val_auroc"]

    assert evaluate.main(["--run-dir", str(run_dir), "--n-boot", "200"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    predictions = pd.read_csv(run_dir / "predictions" / "test.csv")
    labels = np.load(npz)["test_labels"][:, 0]
    assert len(predictions) == len(labels) and (predictions["label"].to_numpy() == labels).all()
    assert results["auroc"] > 0.9, results
    assert abs(results["auroc"] - roc_auc_score(labels, predictions["prob_pneumonia"])) < 1e-12
    assert results["auroc_ci_low"] <= results["auroc"] <= results["auroc_ci_high"]
    predicted = (predictions["prob_pneumonia"] >= meta["thresholds"]["decision"]).astype(int)
    assert (predicted == predictions["predicted"]).all()
    assert abs(results["acc"] - (predicted == labels).mean()) < 1e-12
    # MedMNIST's own Evaluator on the same predictions: its AUROC and its accuracy at 0.5 are ours.
    from medmnist import Evaluator

    official = Evaluator("pneumoniamnist", "test", root=str(npz.parent)).evaluate(
        predictions["prob_pneumonia"].to_numpy()[:, None])
    assert abs(results["auroc"] - official.AUC) < 1e-12 and abs(results["acc_at_0.5"] - official.ACC) < 1e-12
    for name in ("confusion_test.png", "roc_test.png", "loss_curves.png"):
        assert (run_dir / "figures" / name).stat().st_size > 1000
    assert "auroc" in (run_dir / "results.md").read_text()


def test_training_never_reads_test_split(pneumonia_phantom, tmp_path, monkeypatch):
    """Training loads only train and val: a file without test arrays trains fine."""
    arrays = dict(np.load(pneumonia_phantom))
    for key in ("test_images", "test_labels"):
        arrays.pop(key)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "pneumoniamnist.npz", **arrays)
    from pneumonia import train

    code = train.main(["--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--arch",
                       "resnet-tiny", "--epochs", "1", "--train-limit", "64", "--batch-size", "32", "--no-progress"])
    assert code == 0 and (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_evaluation_killed_midway_keeps_the_previous_result_set(trained_pneumonia_run, tmp_path, monkeypatch):
    from common import plots

    run_dir = Path(shutil.copytree(trained_pneumonia_run[0], tmp_path / "run"))
    assert evaluate.main(["--run-dir", str(run_dir), "--n-boot", "30", "--gallery", "0"]) == 0
    names = ("results.json", "results.md", "results.csv", "predictions/test.csv")
    before = {name: (run_dir / name).read_bytes() for name in names}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "roc_curve", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["--run-dir", str(run_dir), "--n-boot", "60", "--gallery", "0"])
    assert {name: (run_dir / name).read_bytes() for name in names} == before
    assert not (run_dir / ".pending").exists()
