"""common.app through gradio_client: every tab's endpoint on a server started here, real files where present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.app import declared, discover

gradio_client = pytest.importorskip("gradio_client")

NIH = "cxr_samples/00000001_000.png"
SIIM = "cxr_dicom/siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FLAIR = "brats2015/test/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz"


@pytest.fixture(scope="module")
def client(app_server):
    url, _ = app_server
    return gradio_client.Client(url, verbose=False, download_files=False)


def _file(path: Path):
    return gradio_client.handle_file(str(path))


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def test_the_pipelines_are_found_through_the_declared_group_only():
    names = [spec.name for spec in discover(declared())]
    assert names == ["brain3d_report", "cxr_localize", "mavl_chexpert", "pathology_brats", "pneumonia"]
    source = (Path(__file__).resolve().parents[2] / "common" / "app.py").read_text()
    assert not any(name in source for name in names)


def test_chest_xray_tabs_on_real_files(client, shared_data, tmp_path):
    nih, siim = _file(shared_data / NIH), _file(shared_data / SIIM)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {f"/predict_{n}" for n in ("pneumonia", "cxr_localize", "mavl_chexpert", "pathology_brats",
                                      "brain3d_report")} <= set(endpoints)
    # No run named: the first one found under --runs (the demo's for `make app`).
    status, label, result, gallery, files = client.predict(None, nih, "", api_name="/predict_pneumonia")
    assert status.startswith("done"), status
    assert {c["label"] for c in label["confidences"]} == {"pneumonia", "not pneumonia"} and "label" in result
    assert any(Path(f["path"] if isinstance(f, dict) else f).name == "predictions.csv" for f in files)
    status, label, result, gallery, files = client.predict(None, siim, "Right lower lobe opacity.",
                                                           api_name="/predict_cxr_localize")
    assert status.startswith("done") and not label, status  # a mask, no probabilities: the panel is hidden
    assert "mass_right_lung" in result and len(gallery) == 2  # mask and overlay
    status, label, result, gallery, files = client.predict(None, nih, "", api_name="/predict_mavl_chexpert")
    assert status.startswith("done") and len(label["confidences"]) >= 5, status


def test_histology_tab_with_and_without_a_caption(client, histology_run):
    tile = sorted((histology_run[1] / "CT").glob("*.jpg"))[0]
    status, label, result, gallery, files = client.predict(None, _file(tile), "", api_name="/predict_pathology_brats")
    assert status.startswith("done") and "no caption" in result, (status, result)
    status, label, result, *_ = client.predict(None, _file(tile), "Sheets of crowded pleomorphic atypical cells.",
                                               api_name="/predict_pathology_brats")
    assert status.startswith("done") and "class" in result and len(label["confidences"]) == 9


def _image(value) -> np.ndarray:
    return np.asarray(Image.open(value["path"] if isinstance(value, dict) else value))


def test_brain_tab_report_and_slice_slider(client, shared_data):
    status, label, result, gallery, files, slices = client.predict(None, [_file(shared_data / FLAIR)], "",
                                                                   api_name="/predict_brain3d_report")
    assert status.startswith("done") and "report" in result, status
    grey = _image(slices).astype(int)  # gradio sends a (lossy) webp: grey means the channels agree
    assert not label and (grey.ndim == 2 or np.abs(grey[..., 0] - grey[..., 2]).max() <= 12)  # no overlay
    assert "explain_phrase" not in result


def test_brain_tab_lime_overlay_follows_the_slice_slider(client, shared_data):
    status, label, result, gallery, files, slices = client.predict(None, [_file(shared_data / FLAIR)],
                                                                   "left frontal", api_name="/predict_brain3d_report")
    assert status.startswith("done") and "left frontal" in result, (status, result)
    names = {Path(f["path"] if isinstance(f, dict) else f).name for f in files}
    assert {"lime.png", "slices.png", "predictions.csv"} <= names
    middle = _image(slices)
    assert middle.ndim == 3 and (middle[..., 0] != middle[..., 2]).any()  # the heat map coloured over the grey
    lower = _image(client.predict(30, api_name="/slices_brain3d_report"))
    assert lower.shape == middle.shape and not np.array_equal(lower, middle)


def test_bad_uploads_are_one_line_and_the_server_keeps_serving(client, shared_data, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for path, api in ((broken, "/predict_pneumonia"), (notes, "/predict_mavl_chexpert")):
        status, *_ = client.predict(None, _file(path), "", api_name=api)
        assert status.startswith("error: ") and path.name in status and "\n" not in status, status
    status, *_ = client.predict(None, _file(shared_data / NIH), "  ", api_name="/predict_cxr_localize")
    assert status.startswith("error: ") and "empty" in status
    nifti = shutil.copy(shared_data / FLAIR, tmp_path / "flair.nii.gz")
    status, *_ = client.predict(None, _file(nifti), "", api_name="/predict_pneumonia")
    assert status.startswith("error: ") and "NIfTI" in status
    status, *_ = client.predict(None, _file(shared_data / NIH), "", api_name="/predict_pneumonia")
    assert status.startswith("done")
