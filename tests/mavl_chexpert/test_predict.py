"""mavl_chexpert.predict on real radiographs with the image and fusion runs of the shared fixtures."""

from __future__ import annotations

import shutil

import pandas as pd

from mavl_chexpert import predict


def test_fusion_run_on_real_radiographs(fusion_run, shared_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    sources = [shared_data / "cxr_samples" / "00000001_000.png", shared_data / "cxr_tbx11k" / "tb_tb0007.png"]
    for path in sources:
        shutil.copy(path, folder / path.name)
    out = tmp_path / "out"
    assert predict.main(["--run-dir", str(fusion_run), "--input", str(folder), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    probs = [c for c in table.columns if c.startswith("prob_")]
    assert probs and all(table[c].between(0, 1).all() for c in probs)
    for column in probs:
        key = column[len("prob_"):]
        assert set(table[f"label_{key}"]) <= {0, 1}
        assert table[f"aspect_{key}"].map(lambda s: isinstance(s, str) and len(s) > 10).all()
    assert (out / "figures" / "tb_tb0007" / "findings.png").is_file()


def test_image_run_and_a_single_dicom(image_run, shared_data, tmp_path):
    dicom = shared_data / "cxr_dicom" / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    out = tmp_path / "out"
    assert predict.main(["--run-dir", str(image_run), "--input", str(dicom), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 1 and not any(c.startswith("aspect_") for c in table.columns)
