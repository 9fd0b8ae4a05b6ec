"""cxr_localize.predict: a mask at the input's size for a real radiograph and a report; bad text refused."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_localize import predict, train

SIIM = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture(scope="module")
def localize_run(small_iu, tmp_path_factory):
    run = tmp_path_factory.mktemp("cxr_localize_predict") / "run"
    assert train.main(["--data-root", str(small_iu), "--encoder-weights", "none", "--encoder", "resnet18",
                       "--decoder-channels", "16", "16", "8", "8", "8", "--image-size", "32", "--epochs", "1",
                       "--batch-size", "4", "--limit", "12", "--no-progress", "--device", "cpu", "--precision",
                       "fp32", "--text-encoder", "tiny-clip", "--output-dir", str(run)]) == 0
    return run


def test_mask_at_input_size_for_png_and_dicom(localize_run, shared_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(shared_data / "cxr_tbx11k" / "tb_tb0005.png", folder / "tb.png")
    shutil.copy(shared_data / "cxr_dicom" / SIIM, folder / "siim.dcm")
    out = tmp_path / "out"
    assert predict.main(["--run-dir", str(localize_run), "--input", str(folder), "--report",
                         "Opacity in the left lower lobe.", "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert {"file", "report", "named_side", "mass_right_lung", "mass_left_lung"} <= set(table.columns)
    assert set(table["named_side"]) == {"left"}
    for name, size in (("tb", (512, 512)), ("siim", (1024, 1024))):
        assert np.asarray(Image.open(out / "figures" / name / "mask.png")).shape == size
        assert (out / "figures" / name / "overlay.png").is_file()


def test_reports_csv_and_empty_text(localize_run, shared_data, tmp_path, capsys):
    image = shared_data / "cxr_samples" / "00000001_000.png"
    (tmp_path / "reports.csv").write_text("image,report\n00000001_000.png,Right upper lobe nodule.\n")
    out = tmp_path / "out"
    assert predict.main(["--run-dir", str(localize_run), "--input", str(image), "--reports",
                         str(tmp_path / "reports.csv"), "--out", str(out)]) == 0
    assert pd.read_csv(out / "predictions.csv")["named_side"][0] == "right"
    capsys.readouterr()
    assert predict.main(["--run-dir", str(localize_run), "--input", str(image), "--report", "  ", "--out",
                         str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report" in err[0] and "empty" in err[0]
    assert not (tmp_path / "o2").exists()
