"""Training scripts run unchanged under DDP: ``accelerate launch`` with two CPU processes (gloo) shares each
epoch's batches and ends close to one process taking the same global batches, for pneumonia and cxr_localize.

The two runs see the same samples in the same steps (the sampler shards one permutation; DDP averages the two
half-batch gradients into the full-batch one). They differ only where per-process statistics differ, the
BatchNorm layers over half the batch, so the metrics agree within a tolerance, not exactly.

The launched processes never see a GPU (``CUDA_VISIBLE_DEVICES`` is empty), run on a free port, and ignore the
launching shell's Accelerate and torch.distributed settings, so the test means the same on a CUDA machine, beside
another distributed job, and under a user's ``accelerate config``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.phantoms.cxr import write_medmnist
from cxr_localize import train as cxr_train
from pneumonia import train

ACCELERATE = Path(sys.executable).parent / "accelerate"

PNEUMONIA_TOLERANCE = {"val_auroc": 0.05, "val_loss": 0.05}
"""Largest accepted |two processes - one process| after 2 epochs; measured on 2 CPU cores: 0.012 and 0.001."""

CXR_TOLERANCE = {"val_dice": 0.03, "val_loss": 0.03}
"""The same for cxr_localize after 2 epochs; measured on 2 CPU cores: 0.003 and 0.010."""

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path: Path, module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch --num_processes 2 -m module args`` on two CPU processes, isolated from the caller."""
    config = tmp_path / "accelerate.yaml"  # explicit, so a user's default accelerate config is never read
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                      "num_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\ngpu_ids: all\nuse_cpu: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k not in LAUNCHER_VARIABLES}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    command = [str(ACCELERATE), "launch", "--config_file", str(config), "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "-m", module, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _compare(ddp: list[dict], single: list[dict], tolerance: dict[str, float]) -> None:
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    for key, limit in tolerance.items():
        assert abs(ddp[-1][key] - single[-1][key]) <= limit, (key, ddp[-1][key], single[-1][key])


needs_accelerate = pytest.mark.skipif(not ACCELERATE.is_file(), reason="no accelerate launcher beside python")


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
@needs_accelerate
def test_pneumonia_two_processes_match_one_process(tmp_path):
    write_medmnist(tmp_path / "data", n=200, seed=1)
    common = ["--data-root", str(tmp_path / "data"), "--arch", "resnet-tiny", "--epochs", "2", "--no-augment",
              "--no-progress", "--device", "cpu", "--precision", "fp32", "--seed", "3", "--lr", "3e-3"]
    done = _launch(tmp_path, "pneumonia.train", [*common, "--batch-size", "16", "--output-dir", str(tmp_path / "ddp")])
    best = re.findall(r"best val_auroc (\S+) at epoch (\d+)", done.stdout)  # the ranks' lines may interleave
    assert len(best) == 2 and best[0] == best[1], done.stdout
    assert train.main([*common, "--batch-size", "32", "--output-dir", str(tmp_path / "single")]) == 0

    ddp, single = _records(tmp_path / "ddp"), _records(tmp_path / "single")
    assert [r["step"] for r in ddp] == [5, 10]  # 140 images / global batch 32
    _compare(ddp, single, PNEUMONIA_TOLERANCE)
    assert ddp[-1]["val_auroc"] > 0.8 and single[-1]["val_auroc"] > 0.8


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
@needs_accelerate
def test_cxr_localize_two_processes_match_one_process(small_iu, tmp_path):
    common = ["--data-root", str(small_iu), "--encoder-weights", "none", "--encoder", "resnet18",
              "--decoder-channels", "16", "16", "8", "8", "8", "--image-size", "32", "--epochs", "2", "--no-augment",
              "--text-encoder", "tiny-clip", "--no-progress", "--device", "cpu", "--precision", "fp32", "--seed", "2"]
    _launch(tmp_path, "cxr_localize.train", [*common, "--batch-size", "4", "--output-dir", str(tmp_path / "ddp")])
    assert cxr_train.main([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "single")]) == 0

    ddp, single = _records(tmp_path / "ddp"), _records(tmp_path / "single")
    assert len(ddp) == 2 and ddp[-1]["step"] > 2
    _compare(ddp, single, CXR_TOLERANCE)
