"""pneumonia.predict on real radiographs and DICOMs: one row per file, bad files listed, resumable, exit codes."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from pneumonia import predict

SIIM = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture(scope="module")
def run_with_index(trained_pneumonia_run):
    from pneumonia import retrieval

    run_dir, _ = trained_pneumonia_run
    if not (run_dir / "retrieval" / "cosine.faiss").is_file():
        assert retrieval.main(["build", "--run-dir", str(run_dir), "--index", "cosine"]) == 0
    return run_dir


def test_folder_of_real_files(run_with_index, shared_data, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("00000001_000.png", "00027426_000.png"):
        shutil.copy(shared_data / "cxr_samples" / name, folder / name)
    shutil.copy(shared_data / "cxr_tbx11k" / "tb_tb0005.png", folder / "tb_tb0005.png")
    shutil.copy(shared_data / "cxr_dicom" / SIIM, folder / "siim.dcm")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    assert predict.main(["--run-dir", str(run_with_index), "--input", str(folder), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["file"]) == [str(p) for p in sorted(folder.iterdir())]
    assert {"file", "prob_pneumonia", "label", "error", "neighbour_ids"} <= set(table.columns)
    bad = table[table["error"].notna()]
    assert sorted(bad["file"].map(lambda f: f.rsplit("/", 1)[-1])) == ["broken.png", "notes.txt"]
    good = table[table["error"].isna()]
    assert good["prob_pneumonia"].between(0, 1).all() and set(good["label"]) <= {"normal", "pneumonia"}
    assert (out / "figures" / "siim" / "gradcam.png").is_file()
    assert (out / "figures" / "siim" / "neighbours.png").is_file()
    rows = json.loads((out / "predictions.json").read_text())
    assert len(rows[0]["neighbour_ids"]) == 5
    # resumable: a rerun predicts nothing again; a new file is added
    shutil.copy(shared_data / "cxr_tbx11k" / "health_h0001.png", folder / "health_h0001.png")
    capsys.readouterr()
    assert predict.main(["--run-dir", str(run_with_index), "--input", str(folder), "--out", str(out)]) == 0
    assert "1 file(s) predicted" not in capsys.readouterr().out
    assert len(pd.read_csv(out / "predictions.csv")) == 7
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 7


def test_both_photometric_forms_give_one_probability(trained_pneumonia_run, shared_data, tmp_path):
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(shared_data / "cxr_dicom" / SIIM)
    pixels = ds.pixel_array
    ds.PhotometricInterpretation, ds.file_meta.TransferSyntaxUID = "MONOCHROME1", ExplicitVRLittleEndian
    ds.PixelData = (pixels.max() + pixels.min() - pixels).astype(pixels.dtype).tobytes()
    ds.save_as(tmp_path / "mono1.dcm", enforce_file_format=True)
    run_dir, _ = trained_pneumonia_run
    probs = []
    for source in (shared_data / "cxr_dicom" / SIIM, tmp_path / "mono1.dcm"):
        out = tmp_path / source.stem
        assert predict.main(["--run-dir", str(run_dir), "--input", str(source), "--out", str(out)]) == 0
        probs.append(float(pd.read_csv(out / "predictions.csv")["prob_pneumonia"][0]))
    assert probs[0] == pytest.approx(probs[1], abs=1e-6)


def test_bad_inputs_exit_2_and_keep_out(trained_pneumonia_run, tmp_path, capsys):
    run_dir, _ = trained_pneumonia_run
    (tmp_path / "bad.png").write_bytes(b"junk")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [(["--input", str(tmp_path / "bad.png")], "bad.png"),
             (["--input", str(tmp_path / "missing.png")], "missing.png"),
             (["--input", str(tmp_path / "empty_dir")], "empty_dir")]
    (tmp_path / "empty_dir").mkdir()
    for extra, culprit in cases:
        capsys.readouterr()
        assert predict.main(["--run-dir", str(run_dir), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and culprit in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_run_of_another_pipeline_is_refused(tmp_path, capsys):
    from common.rundir import META_FILE

    best = tmp_path / "run" / "best"
    best.mkdir(parents=True)
    (best / META_FILE).write_text(json.dumps({"format": "medvl-model-1", "pipeline": "cxr_localize"}))
    (tmp_path / "x.png").write_bytes(b"")
    code = predict.main(["--run-dir", str(tmp_path / "run"), "--input", str(tmp_path / "x.png"), "--out",
                         str(tmp_path / "o")])
    assert code == 2
    assert not (tmp_path / "o").exists()


def test_vlm_adds_the_report(trained_pneumonia_run, shared_data, tmp_path):
    """``--vlm tiny-gemma3`` (random weights, a few tokens): pneumonia.report's prompt and parser on a real image."""
    run_dir, _ = trained_pneumonia_run
    out = tmp_path / "out"
    assert predict.main(["--run-dir", str(run_dir), "--input", str(shared_data / "cxr_samples" / "00000001_000.png"),
                         "--out", str(out), "--device", "cpu", "--vlm", "tiny-gemma3", "--max-new-tokens", "4"]) == 0
    row = json.loads((out / "predictions.json").read_text())[0]
    assert isinstance(row["report"], str) and row["parsed_verdict"] in ("normal", "pneumonia", "unclear")
    assert row["vlm"] == "tiny-gemma3 (random weights)" and row["prompt"] == "clinical-role" and "prob_pneumonia" in row
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(table.columns[:2]) == ["file", "prob_pneumonia"] and "report" in table.columns
