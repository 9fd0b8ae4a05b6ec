"""End to end on the phantom (the report must steer the mask), and resume after a stop gives the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.phantoms.iu import write_iu
from common.splits import load_split_csv
from cxr_localize import evaluate, pretrain, train

E2E_SIZE = ["--image-size", "96"]


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
def test_phantom_to_evaluation_uses_the_text(tmp_path):
    data = write_iu(tmp_path / "iu", n=120, seed=0, size=96)
    phase1, run = tmp_path / "pretrain", tmp_path / "train"
    assert pretrain.main(["--data-root", str(data), "--output-dir", str(phase1), "--encoder-weights", "none",
                          "--epochs", "1", "--no-progress", *E2E_SIZE]) == 0
    assert (phase1 / "best" / "model.safetensors").is_file() and (phase1 / "figures" / "reconstructions.png").is_file()
    assert {"psnr", "ssim"} <= set(json.loads((phase1 / "results.json").read_text()))
    assert train.main(["--data-root", str(data), "--output-dir", str(run), "--encoder-init", str(phase1),
                       "--text-encoder", "minilm", "--epochs", "12", "--batch-size", "8", "--no-progress",
                       *E2E_SIZE]) == 0
    assert evaluate.main(["--run-dir", str(run), "--n-boot", "50"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert {"dice", "iou", "pixel_acc", "dice_shuffled", "dice_lr_swapped", "mass_named_side",
            "mass_named_side_lr_swapped", "dice_ci_low", "dice_ci_high"} <= set(results)
    assert results["dice"] > results["dice_shuffled"] + 0.1
    assert results["mass_named_side"] > results["mass_named_side_lr_swapped"] + 0.2
    split = load_split_csv(run / "split.csv")
    assert split.groupby("group")["split"].nunique().max() == 1
    assert (run / "figures" / "test_panels.png").is_file() and (run / "figures" / "text_tests.png").is_file()
    assert "Does the report steer the mask?" in (run / "results.md").read_text()


def _tiny_args(data: Path, phase: str) -> list[str]:
    args = ["--data-root", str(data), "--encoder-weights", "none", "--encoder", "resnet18", "--decoder-channels",
            "16", "16", "8", "8", "8", "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--limit", "12",
            "--no-progress", "--device", "cpu", "--precision", "fp32"]
    return args + (["--text-encoder", "tiny-clip"] if phase == "train" else [])


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]


@pytest.mark.parametrize("phase", ["pretrain", "train"])
def test_resume_after_stop_reaches_the_same_result(phase, small_iu, tmp_path):
    main = {"pretrain": pretrain.main, "train": train.main}[phase]
    args = _tiny_args(small_iu, phase)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*args, "--output-dir", str(full)]) == 0
    assert main([*args, "--output-dir", str(part), "--max-steps", "3"]) == 0
    assert len(_records(part)) < 2
    assert main([*args, "--output-dir", str(part), "--resume"]) == 0
    assert _records(part) == _records(full)
    a, b = load_file(str(full / "best" / "model.safetensors")), load_file(str(part / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
