"""A pneumonia run killed mid-epoch and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from common.rundir import load_model_files
from pneumonia import train


def _args(data_root, out, *extra):
    return ["--data-root", str(data_root), "--output-dir", str(out), "--arch", "resnet-tiny", "--epochs", "2",
            "--train-limit", "96", "--batch-size", "16", "--no-progress", "--seed", "4",
            "--device", "cpu", "--precision", "fp32", *extra]


class _Planted:
    """A pickle that would create a file if anything unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _history(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def test_kill_mid_epoch_then_resume(pneumonia_phantom, tmp_path, monkeypatch):
    data_root = pneumonia_phantom.parent
    assert train.main(_args(data_root, tmp_path / "full")) == 0

    calls = {"n": 0}
    original = train.PneumoniaTask.training_loss

    def dies_at_batch_10(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 10:  # epoch 2, batch 4: after the step-8 checkpoint, before any graceful save
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(train.PneumoniaTask, "training_loss", dies_at_batch_10)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(data_root, tmp_path / "killed", "--checkpoint-every", "4"))
    monkeypatch.setattr(train.PneumoniaTask, "training_loss", original)
    assert len(_history(tmp_path / "killed")) == 1

    marker = tmp_path / "code-ran"
    last = tmp_path / "killed" / "checkpoints" / "last"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):  # what Accelerate would read
        (last / name).write_bytes(pickle.dumps(_Planted(str(marker))))
    config_before = (tmp_path / "killed" / "config.yaml").read_bytes()
    assert train.main(_args(data_root, tmp_path / "killed", "--checkpoint-every", "4", "--resume", "--lr", "0.1")) == 2
    assert (tmp_path / "killed" / "config.yaml").read_bytes() == config_before  # a refused resume changes nothing
    assert train.main(_args(data_root, tmp_path / "killed", "--checkpoint-every", "4", "--resume")) == 0
    assert not marker.exists()
    assert _history(tmp_path / "full") == _history(tmp_path / "killed")
    full, full_meta = load_model_files(tmp_path / "full" / "best")
    resumed, resumed_meta = load_model_files(tmp_path / "killed" / "best")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert full_meta["thresholds"] == resumed_meta["thresholds"]
