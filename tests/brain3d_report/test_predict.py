"""brain3d_report.predict: a real BraTS FLAIR as NIfTI and as a DICOM series give the same report."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brain3d_report import predict
from common.reader import Volume, read_volume, write_dicom_series
from tests.brain3d_report.test_generate_evaluate import tiny_run_dirs

BRATS_FLAIR = "brats2015/test/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz"


def test_nifti_and_dicom_series_of_one_volume(tmp_path_factory, shared_data, tmp_path):
    run = tiny_run_dirs(tmp_path_factory)["r2"]
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
