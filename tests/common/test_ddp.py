"""Training scripts run unchanged under DDP: two CPU processes (gloo) via torchrun share each epoch's batches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.phantoms.cxr import write_medmnist


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_two_process_training(tmp_path):
    write_medmnist(tmp_path / "data", n=200, seed=1)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    base = ["-m", "pneumonia.train", "--data-root", str(tmp_path / "data"), "--arch", "resnet-tiny", "--epochs", "1",
            "--batch-size", "16", "--no-progress", "--device", "cpu"]
    # Two CPU processes (gloo); hiding CUDA keeps a GPU machine from giving both ranks the same device.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([torchrun, "--nproc_per_node", "2", *base, "--output-dir", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 5  # 140 training images / 2 processes / batch 16, rounded up
    assert (tmp_path / "ddp" / "best" / "model.safetensors").is_file()
    assert done.stdout.count("best val_auroc") == 2 and len(set(done.stdout.strip().splitlines())) == 1
