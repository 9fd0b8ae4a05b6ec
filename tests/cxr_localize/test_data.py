"""Report cleaning, left/right swapping, the patient split, and every bad-input path of the loader."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import DataError
from common.splits import check_no_leakage
from cxr_localize import pretrain, train
from cxr_localize.data import (
    EMPTY_TEXT,
    load_iu,
    named_side,
    read_tables,
    report_text,
    split_assignments,
    strip_boilerplate,
    swap_left_right,
)


def test_strip_boilerplate_keeps_findings_only():
    text = ("The heart is normal in size. There is no pulmonary edema. No pneumothorax or pleural effusion. "
            "Patchy opacity in the left lower lobe. Lungs are clear without focal consolidation. "
            "There is a calcified granuloma in the right apex. No interval change in the right apical nodule.")
    assert strip_boilerplate(text) == ("Patchy opacity in the left lower lobe. There is a calcified granuloma in the "
                                       "right apex. No interval change in the right apical nodule.")
    assert strip_boilerplate("The lungs are clear. Heart size normal.") == ""


@pytest.mark.parametrize(("text", "swapped"), [
    ("Left-sided opacity in the right lower lobe.", "Right-sided opacity in the left lower lobe."),
    ("Right apex nodule; LEFT base clear.", "Left apex nodule; RIGHT base clear."),
    ("Trachea deviated leftward, bright spot, rightly so.", "Trachea deviated rightward, bright spot, rightly so."),
    ("Bilateral effusions.", "Bilateral effusions."),
])
def test_swap_left_right(text, swapped):
    assert swap_left_right(text) == swapped
    assert swap_left_right(swap_left_right(text)) == text


def test_named_side():
    assert named_side("Opacity in the left-sided base.") == "left"
    assert named_side("Right upper lobe mass.") == "right"
    assert named_side("Left and right effusions.") is None
    assert named_side("Bibasilar atelectasis.") is None


def test_report_text_one_rule_for_missing_text():
    assert report_text("Nodule in the left apex. Lungs otherwise clear.", "Left apical nodule.") == \
        "Nodule in the left apex."
    assert report_text("Nodule in the left apex.", "Left apical nodule.", "findings+impression") == \
        "Nodule in the left apex. Left apical nodule."
    assert report_text(float("nan"), "Right base opacity.") == "Right base opacity."
    assert report_text("The lungs are clear.", "Right base opacity.") == "Right base opacity."
    assert report_text(None, float("nan")) == EMPTY_TEXT


def test_patient_split_keeps_each_uid_in_one_split(small_iu):
    _, projections = read_tables(small_iu)
    assert projections["uid"].duplicated().any(), "the phantom should have patients with two films"
    by_patient = split_assignments(projections, "patient", seed=0)
    check_no_leakage(projections["uid"], by_patient.to_numpy(), "split")
    leaks = [split_assignments(projections, "image", seed=s).to_numpy() for s in range(5)]
    with pytest.raises(DataError, match="appears in splits"):
        for assignment in leaks:
            check_no_leakage(projections["uid"], assignment, "split")


def test_loader_reads_the_phantom(small_iu):
    data = load_iu(small_iu, image_size=32, splits=("train", "val", "test"))
    assert data.images.shape[1:] == (32, 32) and data.masks.dtype == bool and data.lungs is not None
    assert all(named_side(t) for t in data.texts)
    assert 0 < data.masks.mean() < 0.05


def _train_file(root):
    _, projections = read_tables(root)
    split = split_assignments(projections, "patient", seed=0)
    train_rows = projections[split.to_numpy() == "train"]
    return train_rows.iloc[0], train_rows.iloc[-1]


def _run_train(root, tmp_path, *extra):
    return train.main(["--data-root", str(root), "--output-dir", str(tmp_path / "run"), "--text-encoder", "tiny-clip",
                       "--encoder-weights", "none", "--image-size", "32", *extra])


def _break(kind: str, root):
    first, last = _train_file(root)
    image_path = root / "images" / "images_normalized" / first["filename"]
    mask_path = root / "masked" / first["filename"]
    if kind == "column":
        frame = pd.read_csv(root / "indiana_reports.csv").drop(columns=["findings"])
        frame.to_csv(root / "indiana_reports.csv", index=False)
        return root / "indiana_reports.csv", "missing column(s) findings"
    if kind == "mask_size":
        Image.fromarray(np.zeros((40, 50), np.uint8)).save(mask_path)
        return mask_path, "mask is 50x40 but its image is 64x64"
    if kind == "mask_values":
        mask = np.array(Image.open(mask_path))
        mask[:4, :4] = 128
        Image.fromarray(mask).save(mask_path)
        return mask_path, "mask is not binary"
    if kind == "image":
        image_path.write_bytes(b"not a png")
        return image_path, "image does not decode"
    reports = pd.read_csv(root / "indiana_reports.csv")
    reports[reports["uid"] != int(last["uid"])].to_csv(root / "indiana_reports.csv", index=False)
    return root / "indiana_projections.csv", f"uid {last['uid']}"


@pytest.mark.parametrize("kind", ["column", "mask_size", "mask_values", "image", "no_report"])
def test_bad_input_exits_2_naming_the_file(kind, iu_copy, tmp_path, capsys):
    path, message = _break(kind, iu_copy)
    assert _run_train(iu_copy, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}") and message in err and len(err.splitlines()) == 1


def test_pretrain_names_an_image_that_does_not_decode(iu_copy, tmp_path, capsys):
    path, _ = _break("image", iu_copy)
    code = pretrain.main(["--data-root", str(iu_copy), "--output-dir", str(tmp_path / "p1"), "--encoder-weights",
                          "none", "--image-size", "32"])
    assert code == 2 and f"error: {path}: image does not decode" in capsys.readouterr().err


def test_skip_bad_skips_and_counts(iu_copy, caplog):
    rows = read_tables(iu_copy)[1]
    split = split_assignments(rows, "patient", seed=0).to_numpy()
    train_rows = rows[split == "train"].reset_index(drop=True)
    names = train_rows["filename"].tolist()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(iu_copy / "masked" / names[0])
    mask = np.array(Image.open(iu_copy / "masked" / names[1]))
    mask[0, 0] = 7
    Image.fromarray(mask).save(iu_copy / "masked" / names[1])
    (iu_copy / "images" / "images_normalized" / names[2]).write_bytes(b"broken")
    dropped = train_rows[~train_rows["filename"].isin(names[:3])]["uid"].iloc[-1]
    reports = pd.read_csv(iu_copy / "indiana_reports.csv")
    reports[reports["uid"] != int(dropped)].to_csv(iu_copy / "indiana_reports.csv", index=False)
    n_dropped = int((train_rows["uid"] == dropped).sum())
    with caplog.at_level(logging.WARNING, logger="medvl.cxr_localize"):
        data = load_iu(iu_copy, image_size=32, splits=("train",), skip_bad=True)
    assert dict(data.skipped) == {"bad mask": 2, "bad image": 1, "uid without report": n_dropped}
    assert len(data) == len(train_rows) - 3 - n_dropped
    assert f"skipped {3 + n_dropped} bad row(s)" in caplog.text


def test_real_iu_reports_are_cleaned(shared_data):
    reports, projections = read_tables(shared_data / "iu_xray")
    assert set(projections["uid"]) <= set(reports["uid"])
    texts = [report_text(f, i) for f, i in zip(reports["findings"], reports["impression"])]
    by_uid = dict(zip(reports["uid"], texts))
    assert by_uid["1"] == EMPTY_TEXT
    assert "irregular opacities in the left lung apex" in by_uid["4"]
    assert "cardiomediastinal silhouette is normal" not in by_uid["4"]
    assert 0.2 < sum(t == EMPTY_TEXT for t in texts) / len(texts) < 0.5
