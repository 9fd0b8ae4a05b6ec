"""pathology_brats.predict: one row per tile as evaluate predicts it, DICOM tiles, captions, TTA, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.runs import load_run
from pathology_brats import predict
from pathology_brats.inference import tile_probabilities
from pathology_brats.model import build_run_model


def write_rgb_dicom(pixels: np.ndarray, path: Path) -> Path:
    """An uncompressed single-frame RGB DICOM (as a slide scanner's secondary capture would be)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "SM", "phantom"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def tiles(histology_run, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Three phantom tiles (one also as an RGB DICOM, one PNG), a broken file, and their captions."""
    from PIL import Image

    _, data, _ = histology_run
    folder = tmp_path_factory.mktemp("tiles") / "in"
    folder.mkdir()
    picked = [sorted((data / code).glob("*.jpg"))[0] for code in ("CT", "NC", "WM")]
    for path in picked:
        shutil.copy(path, folder / path.name)
    png = folder / (picked[1].stem + "_copy.png")
    Image.open(picked[1]).convert("RGB").save(png)
    write_rgb_dicom(np.asarray(Image.open(picked[2]).convert("RGB")), folder / "scan.dcm")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")
    captions = {json.loads(line)["image"]: json.loads(line)["caption"]
                for line in (data / "captions.jsonl").read_text().splitlines()}
    return folder, {p.name: captions[p.name] for p in picked}


def test_folder_matches_the_evaluate_path_with_captions_and_tta(histology_run, tiles, tmp_path, capsys):
    run, data, cache = histology_run
    folder, captions = tiles
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"image": f"somewhere/in/{name}", "caption": text})
                                                     + "\n" for name, text in captions.items()))
    out = tmp_path / "out"
    argv = ["--run-dir", str(run), "--input", str(folder), "--out", str(out), "--feature-cache", str(cache),
            "--captions", str(tmp_path / "captions.jsonl"), "--tta", "8", "--device", "cpu"]
    assert predict.main(argv) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("file")
    labels = json.loads((run / "best" / "model.json").read_text())["labels"]
    assert {"class", "caption", "error", *(f"prob_{c}" for c in labels)} <= set(table.columns)
    assert table.loc[str(folder / "broken.jpg"), "error"] and table.loc[str(folder / "broken.jpg"), "class"] == ""
    good = table[table["error"] == ""]
    assert len(good) == 5
    probs = good[[f"prob_{c}" for c in labels]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (good["class"] == [labels[i] for i in probs.argmax(1)]).all()
    # The same numbers as evaluate's and submit's path, called directly on the tiles with their captions.
    loaded = load_run(run, "pathology_brats", build_run_model)
    name = next(iter(captions))
    direct, _ = tile_probabilities(loaded, [folder / name], [captions[name]], "cpu", cache, None, tta=8)
    np.testing.assert_allclose(probs[list(good.index).index(str(folder / name))], direct[0], atol=1e-5)
    # The PNG copy and the DICOM have no caption: an empty one, and the row says so.
    assert good.loc[str(folder / "scan.dcm"), "caption"] == "" and "no caption" in good.loc[str(folder / "scan.dcm"),
                                                                                            "note"]
    assert "no caption" in capsys.readouterr().err
    assert (out / "figures" / "scan" / "tile.png").is_file() and (out / "figures" / "scan" / "classes.png").is_file()
    # The RGB DICOM reads as the JPEG it was made from (up to JPEG decoding, which is the same here: same pixels).
    wm = next(n for n in captions if "_WM_" in n)
    dicom_only, _ = tile_probabilities(loaded, [out / "figures" / "scan" / "tile.png"], [""], "cpu", cache, None)
    jpeg_only, _ = tile_probabilities(loaded, [folder / wm], [""], "cpu", cache, None)
    np.testing.assert_allclose(dicom_only, jpeg_only, atol=1e-4)
    # Resumable; other options into the same --out are refused.
    assert predict.main(argv) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6
    assert predict.main([*argv[:-4], "--tta", "1", "--device", "cpu"]) == 2
    assert "another run or other options" in capsys.readouterr().err


def test_single_bad_file_and_a_run_of_another_pipeline(histology_run, tiles, tmp_path, capsys):
    run, _, cache = histology_run
    folder, _ = tiles
    out = tmp_path / "out"
    assert predict.main(["--run-dir", str(run), "--input", str(folder / "broken.jpg"), "--out", str(out),
                         "--feature-cache", str(cache), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.jpg" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    other = Path(shutil.copytree(run / "best", tmp_path / "other" / "best"))
    meta = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**meta, "pipeline": "pneumonia"}))
    assert predict.main(["--run-dir", str(other.parent), "--input", str(folder), "--out", str(tmp_path / "o2"),
                         "--device", "cpu"]) == 2
    assert "pathology_brats" in capsys.readouterr().err and not (tmp_path / "o2").exists()
