"""Both phases end to end on the phantom: learning, untouched test labels, exact resume, zero-shot, the ablation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from mavl_chexpert import ablate, evaluate, train_fusion, train_image
from tests.mavl_chexpert.conftest import IMAGE_ARGS

CLASSES = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion")


def _weights(run: Path) -> dict:
    return load_file(str(run / "best" / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)


@pytest.mark.parametrize("which", ["image", "fusion"])
def test_phases_learn_and_report_what_the_predictions_say(which, image_run, fusion_run, tmp_path):
    run = Path(shutil.copytree(image_run if which == "image" else fusion_run, tmp_path / "run"))
    results = evaluate.evaluate_run(run, n_boot=30, device="cpu")
    # Chance is 0.5; a 12-epoch tiny ViT on 170 images gets 0.66 (image) and 0.62 (fusion on its embeddings) on the
    # phantom whose findings leave one aspect free (Atelectasis anywhere in the lung is the hardest, near chance).
    assert results["auroc_macro"] > 0.58, results["auroc_macro"]
    assert results["auroc_consolidation"] > 0.72  # measured 0.87 and 0.81: the dense, blurred upper patch
    predictions = pd.read_csv(run / "predictions" / "test.csv")
    for key in CLASSES:
        assert results[f"auroc_{key}"] == pytest.approx(roc_auc_score(predictions[f"label_{key}"],
                                                                       predictions[f"prob_{key}"]))
    saved = json.loads((run / "results.json").read_text())
    meta = json.loads((run / "best" / "model.json").read_text())
    assert set(meta["thresholds"]) == set(CLASSES)
    assert {k: saved[f"threshold_{k}"] for k in CLASSES} == pytest.approx(meta["thresholds"])
    assert saved["auroc_macro_ci_low"] <= saved["auroc_macro"] <= saved["auroc_macro_ci_high"]
    assert {"f1_macro", "f1_micro", "hamming_loss", "auroc_pleural_effusion"} <= set(saved)


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
def test_training_never_reads_the_test_labels(image_run, chexpert_phantom, tmp_path):
    data = Path(shutil.copytree(chexpert_phantom, tmp_path / "CheXpert-v1.0-small"))
    test = pd.read_csv(data / "valid.csv")
    rng = np.random.default_rng(0)
    for column in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"):
        test[column] = rng.permutation(test[column].to_numpy())
    test.to_csv(data / "valid.csv", index=False)
    run = tmp_path / "run"
    assert train_image.main(["--data-root", str(data), "--output-dir", str(run), *IMAGE_ARGS]) == 0
    stored = json.loads((image_run / "best" / "model.json").read_text())["thresholds"]
    assert json.loads((run / "best" / "model.json").read_text())["thresholds"] == stored
    assert _same_weights(run, image_run)
    # Evaluation applies them as they are; only --oracle-thresholds tunes on the test set, and apart.
    honest = evaluate.evaluate_run(run, data_root=data, n_boot=10, device="cpu")
    assert {k: honest[f"threshold_{k}"] for k in CLASSES} == pytest.approx(stored)
    oracle = evaluate.evaluate_run(run, data_root=data, oracle=True, n_boot=10, device="cpu")
    assert oracle["thresholds_from"].startswith("ORACLE") and (run / "oracle" / "results.md").is_file()
    assert json.loads((run / "results.json").read_text())["thresholds_from"].startswith("validation")
    assert "ORACLE" in (run / "oracle" / "results.md").read_text().splitlines()[0]


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
def test_image_phase_resumes_mid_epoch_to_the_same_model(image_run, chexpert_phantom, tmp_path):
    run = tmp_path / "run"
    argv = ["--data-root", str(chexpert_phantom), "--output-dir", str(run), *IMAGE_ARGS]
    assert train_image.main([*argv, "--max-steps", "8"]) == 0  # inside epoch 2 of 12 (6 steps per epoch)
    assert (run / "checkpoints" / "last" / "task.safetensors").is_file()  # the epoch's LRF basis
    assert train_image.main([*argv, "--resume"]) == 0
    assert _same_weights(run, image_run)
    assert (run / "metrics.jsonl").read_text() .count("\n") == (image_run / "metrics.jsonl").read_text().count("\n")
    assert json.loads((run / "best" / "model.json").read_text())["thresholds"] == \
        json.loads((image_run / "best" / "model.json").read_text())["thresholds"]


def test_fusion_resumes_to_the_same_model_and_reuses_the_text_cache(fusion_run, image_run, chexpert_phantom,
                                                                    tmp_path, monkeypatch):
    run = tmp_path / "run"
    argv = ["--data-root", str(chexpert_phantom), "--image-run", str(image_run), "--output-dir", str(run),
            "--text-encoder", "minilm", "--no-progress", "--device", "cpu", "--precision", "fp32"]
    assert train_fusion.main([*argv, "--max-steps", "20"]) == 0
    assert (run / "text_embeddings.safetensors").is_file()
    from mavl_chexpert import text

    def no_encoder(*args, **kwargs):
        raise AssertionError("the cached description embeddings should have been reused")

    monkeypatch.setattr(text, "load_text_encoder", no_encoder)
    assert train_fusion.main([*argv, "--resume"]) == 0
    assert _same_weights(run, fusion_run)


def test_held_out_labels_reach_no_loss_in_either_phase(holdout_image_run, holdout_fusion_run, chexpert_phantom,
                                                      tmp_path):
    meta = json.loads((holdout_image_run / "best" / "model.json").read_text())
    assert meta["labels"] == ["Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"]
    assert meta["holdout_classes"] == ["Consolidation"] and meta["kwargs"]["num_classes"] == 4
    assert _weights(holdout_image_run)["head.weight"].shape[0] == 4
    fusion_meta = json.loads((holdout_fusion_run / "best" / "model.json").read_text())
    assert fusion_meta["holdout_classes"] == ["Consolidation"] and len(fusion_meta["labels"]) == 5
    # Scrambling the held-out column of train.csv changes nothing either phase learns.
    data = Path(shutil.copytree(chexpert_phantom, tmp_path / "CheXpert-v1.0-small"))
    frame = pd.read_csv(data / "train.csv")
    frame["Consolidation"] = np.random.default_rng(0).permutation(frame["Consolidation"].to_numpy())
    frame.to_csv(data / "train.csv", index=False)
    short = ["--epochs", "1"]
    runs = {}
    for name, root in (("original", chexpert_phantom), ("scrambled", data)):
        image, fusion = tmp_path / f"{name}_image", tmp_path / f"{name}_fusion"
        assert train_image.main(["--data-root", str(root), "--output-dir", str(image), *IMAGE_ARGS, *short,
                                 "--holdout-classes", "Consolidation"]) == 0
        assert train_fusion.main(["--data-root", str(root), "--image-run", str(image), "--output-dir", str(fusion),
                                  "--text-encoder", "tiny-bert", "--fusion", "mavl", "--no-progress", *short,
                                  "--device", "cpu", "--precision", "fp32"]) == 0
        runs[name] = (image, fusion)
    assert _same_weights(runs["original"][0], runs["scrambled"][0])
    assert _same_weights(runs["original"][1], runs["scrambled"][1])


def test_unseen_disease_is_reported_with_its_swapped_description_control(holdout_fusion_run, tmp_path):
    run = Path(shutil.copytree(holdout_fusion_run, tmp_path / "run"))
    results = evaluate.evaluate_run(run, n_boot=30, device="cpu")
    saved = json.loads((run / "results.json").read_text())
    unseen = saved["unseen"]["Consolidation"]
    predictions = pd.read_csv(run / "predictions" / "test.csv")
    y = predictions["label_consolidation"]
    assert unseen["auroc"] == pytest.approx(roc_auc_score(y, predictions["prob_consolidation"]))
    assert unseen["auroc_swapped"] == pytest.approx(roc_auc_score(y, predictions["prob_swapped_consolidation"]))
    assert unseen["auroc_ci_low"] <= unseen["auroc"] <= unseen["auroc_ci_high"]
    # The fusion has no per-disease weights: with another disease's sentences the held-out column *is* that
    # disease's column, and the swap partner is the disease whose sentences differ most (the phantom's Effusion
    # shares no aspect value with Consolidation).
    partner = unseen["swapped_with"]
    assert partner == "Pleural Effusion"
    assert np.allclose(predictions["prob_swapped_consolidation"], predictions["prob_pleural_effusion"], atol=1e-5)
    assert set(unseen["auroc_swapped_each"]) == {"Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"}
    # Seen classes make the macro average; the unseen one is kept apart.
    seen = ["atelectasis", "cardiomegaly", "edema", "pleural_effusion"]
    assert saved["auroc_macro"] == pytest.approx(np.mean([saved[f"auroc_{k}"] for k in seen]))
    assert "auroc_consolidation" not in saved and "pred_consolidation" not in predictions
    assert results["unit"] == "study" and "Unseen diseases" in (run / "results.md").read_text()


def test_studies_are_scored_by_their_most_suspicious_view(fusion_run, chexpert_phantom, tmp_path):
    run = Path(shutil.copytree(fusion_run, tmp_path / "run"))
    frontal = pd.read_csv(chexpert_phantom / "valid.csv").query("`Frontal/Lateral` == 'Frontal'")
    studies = frontal["Path"].str.extract(r"(patient\d+/study\d+)")[0]
    assert studies.value_counts().max() > 1  # the phantom has studies with two frontal views
    by_image = evaluate.evaluate_run(run, n_boot=10, device="cpu", unit="image")
    images = pd.read_csv(run / "predictions" / "test.csv")
    by_study = evaluate.evaluate_run(run, n_boot=10, device="cpu")
    per_study = pd.read_csv(run / "predictions" / "test.csv")
    assert (by_image["unit"], by_image["n_units"]) == ("image", len(frontal))
    assert (by_study["unit"], by_study["n_units"]) == ("study", studies.nunique())
    assert len(per_study) == studies.nunique()
    expected = images.groupby("study")[[f"prob_{k}" for k in CLASSES]].max()
    got = per_study.set_index("study")[[f"prob_{k}" for k in CLASSES]]
    assert np.allclose(got.loc[expected.index].to_numpy(), expected.to_numpy())
    assert by_study["auroc_edema"] == pytest.approx(roc_auc_score(per_study["label_edema"], per_study["prob_edema"]))
    assert (per_study["views"] >= 1).all() and per_study["views"].sum() == len(frontal)


def test_official_test_csv_layout_is_scored_by_study(fusion_run, chexpert_phantom, tmp_path):
    """CheXpert's 500-study test labels: Path test/patientN/studyM/viewK_frontal.jpg, 0/1 labels, no view column."""
    data = Path(shutil.copytree(chexpert_phantom, tmp_path / "CheXpert-v1.0-small"))
    shutil.copytree(data / "valid", data / "test")
    frame = pd.read_csv(data / "valid.csv")
    frame["Path"] = frame["Path"].str.replace("CheXpert-v1.0-small/valid/", "test/", regex=False)
    official = frame[["Path", *[c for c in frame.columns if c not in ("Path", "Sex", "Age", "Frontal/Lateral",
                                                                      "AP/PA")]]]
    official.to_csv(tmp_path / "test_labels.csv", index=False)
    run = Path(shutil.copytree(fusion_run, tmp_path / "run"))
    results = evaluate.evaluate_run(run, data_root=data, test_csv=tmp_path / "test_labels.csv", n_boot=10,
                                    device="cpu")
    reference = evaluate.evaluate_run(run, data_root=data, n_boot=10, device="cpu")
    assert results["n_units"] == reference["n_units"]
    assert results["auroc_macro"] == pytest.approx(reference["auroc_macro"])


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
def test_ablation_table_has_every_row_with_intervals_and_reuses_finished_runs(chexpert_phantom, tmp_path):
    out = tmp_path / "ablation"
    argv = ["--data-root", str(chexpert_phantom), "--output-dir", str(out), "--backbone", "vit-tiny",
            "--text-encoder", "tiny-bert", "--n-boot", "20", "--device", "cpu", "--fusion-args", "--epochs 3",
            "--", "--epochs", "2"]
    assert ablate.main(argv) == 0
    rows = [line for line in (out / "ablation.md").read_text().splitlines() if line.startswith("| phase")]
    assert len(rows) == 4 and all(line.count("[") == 4 for line in rows)
    summary = json.loads((out / "ablation.json").read_text())
    assert set(summary) == {"image_none", "image_tail", "image_seed", "fusion_tail"}
    assert json.loads((out / "image_seed" / "best" / "model.json").read_text())["lrf"]["variant"] == "seed"
    stamp = (out / "image_tail" / "best" / "model.safetensors").stat().st_mtime_ns
    assert ablate.main(argv) == 0
    assert (out / "image_tail" / "best" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_tampered_lrf_basis_is_one_line_on_resume(chexpert_phantom, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    run = tmp_path / "run"
    argv = ["--data-root", str(chexpert_phantom), "--output-dir", str(run), *IMAGE_ARGS]
    assert train_image.main([*argv, "--max-steps", "2"]) == 0
    save_file({"w": torch.zeros(1)}, str(run / "checkpoints" / "last" / "task.safetensors"))
    capsys.readouterr()
    assert train_image.main([*argv, "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / 'checkpoints' / 'last' / 'task.safetensors'}: ")
    assert "does not fit this run" in lines[0] and "u_tail, v_tail" in lines[0]
