"""Both phases run unchanged as two CPU processes (gloo): LRF's per-epoch basis and every fusion variant under DDP."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
@pytest.mark.skipif(shutil.which("torchrun", path=str(TORCHRUN.parent)) is None, reason="no torchrun")
def test_phases_run_under_ddp(chexpert_phantom, tmp_path):
    # Hiding CUDA keeps a GPU machine from giving both ranks the same device.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    common = ["--no-progress", "--device", "cpu", "--precision", "fp32"]

    def launch(module: str, *argv: str) -> str:
        done = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "-m", module, *argv, *common],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        # Both ranks print their summary (the two lines may interleave in the shared pipe) with the same best value.
        best = re.findall(r"best val_auroc_macro (\S+) at epoch (\d+)", done.stdout)
        assert len(best) == 2 and best[0] == best[1], done.stdout
        return done.stdout

    launch("mavl_chexpert.train_image", "--data-root", str(chexpert_phantom), "--output-dir", str(tmp_path / "img"),
           "--backbone", "vit-tiny", "--epochs", "2", "--batch-size", "16")
    from safetensors.torch import load_file

    basis = load_file(str(tmp_path / "img" / "checkpoints" / "last" / "task.safetensors"))
    # the whole split's basis (not a shard's), its tail beyond the default rank 38 of the 96-d features
    assert basis["u_tail"].shape[0] > 100 and basis["v_tail"].shape == (96, 96 - 38)
    assert int(basis["count"]) == basis["u_tail"].shape[0]
    # Fine-tuning through the ViT with attention over aspects: every trainable parameter must get a gradient.
    launch("mavl_chexpert.train_fusion", "--image-run", str(tmp_path / "img"), "--output-dir", str(tmp_path / "fus"),
           "--text-encoder", "tiny-bert", "--epochs", "1", "--finetune-backbone", "--aggregation", "attention")
