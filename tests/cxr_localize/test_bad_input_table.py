"""Bad inputs of cxr_localize's scripts (projection tables, pretrain flags, a model.json that does not fit its
weights): exit code 2, one line naming the file or flag, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.runs import model_record, save_run_model
from cxr_localize import evaluate as cxr_evaluate
from cxr_localize import pretrain as cxr_pretrain
from cxr_localize import train as cxr_train


def _projections(rows: str):
    def case(root, tmp):
        path = root / "indiana_projections.csv"
        if rows == "header":
            path.write_text("uid,filename,projection\n")
            return [str(path), "only a header"]
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines + [lines[1]]) + "\n")
        return [str(path), "is listed twice (lines 2 and"]
    return case


@pytest.mark.parametrize("script", ["pretrain", "train"])
@pytest.mark.parametrize("breakage", ["header", "duplicate"])
def test_cxr_projection_tables(script, breakage, iu_copy, tmp_path, assert_one_error_line):
    needles = _projections(breakage)(iu_copy, tmp_path)
    main = cxr_pretrain.main if script == "pretrain" else cxr_train.main
    argv = ["--data-root", str(iu_copy), "--output-dir", str(tmp_path / "run"), "--encoder-weights", "none",
            "--image-size", "32", "--no-progress"]
    assert main(argv + (["--text-encoder", "minilm"] if script == "train" else [])) == 2
    assert_one_error_line(needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--image-size", "100"), ("--image-size", "0"), ("--mask-ratio", "1"),
                                         ("--mask-ratio", "nan"), ("--limit", "0"), ("--decoder-channels", "8")])
def test_cxr_pretrain_flags(flag, value, iu_copy, tmp_path, assert_one_error_line):
    argv = ["--data-root", str(iu_copy), "--output-dir", str(tmp_path / "run"), "--encoder-weights", "none", flag,
            value]
    assert cxr_pretrain.main(argv) == 2
    assert_one_error_line([flag])


def _fake_cxr_run(root: Path, run: Path, fusion_in_json: str) -> Path:
    """A phase-2 run directory whose model.json says ``fusion_in_json`` while the weights are a FiLM model."""
    from cxr_localize.model import ReportUNet

    model = ReportUNet(8, "resnet18", None, "film", (16, 16, 8, 8, 8))
    meta = model_record(pipeline="cxr_localize", stage="train", preset="resnet18",
                        kwargs={"text_dim": 8, "fusion": fusion_in_json, "decoder_channels": [16, 16, 8, 8, 8]},
                        labels=[], preprocessing={"image_size": 64}, thresholds={"mask": 0.5}, monitor="val_dice",
                        data={"root": str(root), "projection": "Frontal", "split_level": "patient", "split_seed": 0},
                        text_encoder="minilm", text_source="findings", text_whitening="scale")
    save_run_model(run / "best", model, meta)
    return run / "best"


def test_cxr_model_json_that_does_not_fit_its_weights(iu_copy, tmp_path, assert_one_error_line):
    torch.manual_seed(0)
    best = _fake_cxr_run(iu_copy, tmp_path / "run", "concat")
    assert cxr_evaluate.main(["--run-dir", str(tmp_path / "run")]) == 2
    assert_one_error_line([str(best / "model.safetensors"), "do not fit"])
    meta = json.loads((best / "model.json").read_text())
    meta["kwargs"].pop("text_dim")
    (best / "model.json").write_text(json.dumps(meta))
    assert cxr_evaluate.main(["--run-dir", str(tmp_path / "run")]) == 2
    assert_one_error_line([str(best / "model.json"), "text_dim"])
    meta["kwargs"]["text_dim"] = 8
    meta["data"].pop("split_seed")
    (best / "model.json").write_text(json.dumps(meta))
    assert cxr_evaluate.main(["--run-dir", str(tmp_path / "run")]) == 2
    assert_one_error_line([str(best / "model.json"), "data.split_seed"])
