"""brain3d_report.predict: a real BraTS FLAIR as NIfTI and as a DICOM series give the same report."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brain3d_report import predict
from common.reader import Volume, read_volume, write_dicom_series

BRATS_FLAIR = "brats2015/test/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz"


def test_nifti_and_dicom_series_of_one_volume(shared_data, brain_tiny_runs, tmp_path):
    run = brain_tiny_runs["r2"]
    volume = read_volume(shared_data / BRATS_FLAIR)
    series = tmp_path / "in" / "pat0001_series"
    write_dicom_series(Volume(volume.data, volume.affine), series)
    (tmp_path / "in" / "pat0001.nii.gz").symlink_to(shared_data / BRATS_FLAIR)
    out = tmp_path / "out"
    assert predict.main(["--run-dir", str(run), "--input", str(tmp_path / "in"), "--out", str(out), "--device", "cpu",
                         "--max-new-tokens", "12"]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(table) == 2 and "error" not in table.columns
    assert table["report"][0] == table["report"][1] and table["report"][0]
    assert (out / "figures" / "pat0001_series" / "slices.png").is_file()
    converted = read_volume(out / "volumes" / "pat0001_series.nii.gz")
    np.testing.assert_allclose(converted.affine, volume.affine, atol=1e-4)


def test_explain_phrase_writes_the_lime_overlay_on_an_arbitrary_volume(shared_data, brain_tiny_runs, tmp_path,
                                                                       capsys):
    """``--explain`` runs brain3d_report.explain's LIME (tiny: 12 samples) on a volume outside the run's data."""
    import json

    import nibabel as nib
    run = brain_tiny_runs["r2"]
    out = tmp_path / "out"
    args = ["--run-dir", str(run), "--input", str(shared_data / BRATS_FLAIR), "--out", str(out), "--device", "cpu",
            "--max-new-tokens", "4", "--explain", "left frontal", "--explain-samples", "12", "--supervoxels", "16"]
    assert predict.main(args) == 0
    row = json.loads((out / "predictions.json").read_text())[0]
    assert row["explain_phrase"] == "left frontal" and row["explain_log_likelihood"] < 0
    figures = out / "figures" / "Flair_subtrMeanDivStd"
    assert (figures / "lime.png").is_file() and row["lime"] == str(figures / "lime.png")
    heat = nib.load(figures / "lime.nii.gz")
    assert heat.shape == (16, 32, 32) and np.abs(np.asarray(heat.dataobj)).max() > 0
    # The heat map's affine places the grid inside the input's world box (the explain CLI's own geometry).
    source = nib.load(shared_data / BRATS_FLAIR)
    corners = np.array([[0, 0, 0, 1], [*(np.array(source.shape) - 1), 1]]).T
    lo, hi = np.sort((source.affine @ corners)[:3], axis=1).T
    centre = heat.affine @ np.array([7.5, 15.5, 15.5, 1.0])
    assert np.all(centre[:3] >= lo - 1) and np.all(centre[:3] <= hi + 1)
    other = tmp_path / "other"
    assert predict.main([*args[:-6], "--explain", " ", "--out", str(other)]) == 2  # one line, nothing written
    assert "--explain: the phrase is empty" in capsys.readouterr().err and not other.exists()
