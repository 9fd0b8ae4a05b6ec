"""The brain phantom: side and lobe readable from the volume (through the header), reports that follow the truth."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brain3d_report.data import report_side
from common.phantoms import __main__ as phantoms
from common.phantoms.brain import ARCHIVE_FILE, LOBE_BOXES_MM, LOBES, MIN_SIZE, report_archive, write_brain

SIZE = (40, 48, 32)  # the shared brain_phantom's (tests/conftest.py)


@pytest.fixture(scope="module")
def phantom(brain_phantom) -> tuple[Path, dict]:
    return brain_phantom


def _volume(root: Path, case_id: str, healthy: bool) -> nib.Nifti1Image:
    return nib.load(root / "healthy" / f"{case_id}.nii.gz" if healthy else root / case_id / f"{case_id}_flair.nii.gz")


def _bright(volume: np.ndarray) -> np.ndarray:
    """Voxels well above normal grey matter: edema and tumour rim (a fixed rule, not fitted to the data)."""
    return volume > 1.45 * np.median(volume[volume > 0])


def _brighter_half(volume: np.ndarray) -> str:
    """``left`` or ``right``: the half of array axis 0 with more bright voxels, read as if axis 0 ran left->right."""
    bright = _bright(volume)
    half = volume.shape[0] // 2
    return "right" if bright[half:].sum() > bright[:half].sum() else "left"


def test_side_is_read_from_the_volume_through_its_header(phantom):
    root, truth = phantom
    lateral = {k: c for k, c in truth["cases"].items() if c["side"] in ("left", "right")}
    assert len(lateral) >= 14 and {c["side"] for c in lateral.values()} == {"left", "right"}
    stored = {c["stored_orientation"] for c in lateral.values()}
    assert stored == {"LPS", "RAS"}
    for case_id, case in lateral.items():
        image = _volume(root, case_id, False)
        assert nib.aff2axcodes(image.affine) == tuple(case["stored_orientation"])
        assert _brighter_half(np.asarray(nib.as_closest_canonical(image).dataobj, float)) == case["side"], case_id
        # Without the header the array's first axis runs right->left in LPS files: the side reads reversed there.
        raw = _brighter_half(np.asarray(image.dataobj, float))
        assert (raw == case["side"]) == (case["stored_orientation"] == "RAS"), case_id


def test_lobe_is_where_the_bright_tissue_is(phantom):
    root, truth = phantom
    box_centres = {lobe: np.array([np.mean(r) for r in box]) for lobe, box in LOBE_BOXES_MM.items()}
    hits = total = 0
    for case_id, case in truth["cases"].items():
        if case["side"] not in ("left", "right"):
            continue
        image = nib.as_closest_canonical(_volume(root, case_id, False))
        voxels = np.argwhere(_bright(np.asarray(image.dataobj, float)))
        centre = (voxels @ image.affine[:3, :3].T + image.affine[:3, 3]).mean(0)
        assert np.sign(centre[0]) == (-1 if case["side"] == "left" else 1)
        folded = np.array([abs(centre[0]), centre[1], centre[2]])
        guess = min(LOBES, key=lambda lobe: np.linalg.norm(folded - box_centres[lobe]))
        hits += guess == case["lobes"][0]
        total += 1
    assert hits / total >= 0.9


def test_healthy_volumes_have_no_tumour_and_bilateral_cases_two(phantom):
    root, truth = phantom
    healthy = [k for k, c in truth["cases"].items() if c["healthy"]]
    assert len(healthy) == 4 and all(truth["cases"][k]["side"] == "none" for k in healthy)
    for case_id in healthy:
        assert _bright(np.asarray(_volume(root, case_id, True).dataobj, float)).sum() == 0, case_id
        assert not (root / case_id).exists()  # controls come without report files, as the seed's
    bilateral = [k for k, c in truth["cases"].items() if c["side"] == "bilateral"]
    assert bilateral
    for case_id in bilateral:
        volume = np.asarray(nib.as_closest_canonical(_volume(root, case_id, False)).dataobj, float)
        bright, half = _bright(volume), volume.shape[0] // 2
        assert bright[:half].sum() > 0 and bright[half:].sum() > 0, case_id


def test_reports_follow_the_truth(phantom):
    root, truth = phantom
    for case_id, case in truth["cases"].items():
        if case["healthy"]:
            continue
        text = (root / case_id / f"{case_id}_flair_text.txt").read_text()
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert report_side(text) == case["side"], case_id
        assert set(case["lobes"]) <= words and not (set(LOBES) - set(case["lobes"])) & words, case_id
        if case["side"] in ("left", "right"):
            assert ({"left", "right"} - {case["side"]}).isdisjoint(words), case_id
        findings = case["findings"]
        assert ("mass effect" in text) == findings["mass_effect"], case_id
        assert ("Necrosis is present" in text) == findings["necrosis"], case_id
        assert f"{findings['diameter_cm']:.1f} cm" in text and findings["size"] in words, case_id
    reports = {(root / k / f"{k}_flair_text.txt").read_text() for k, c in truth["cases"].items() if not c["healthy"]}
    assert len(reports) == sum(not c["healthy"] for c in truth["cases"].values())  # no two reports alike


def test_report_archive_speaks_the_grammar_about_no_case(phantom):
    root, truth = phantom
    archive = json.loads((root / ARCHIVE_FILE).read_text())
    drawn = report_archive(seed=3)
    assert archive == [text for text in drawn if text in set(archive)] and 1990 <= len(archive) <= len(drawn) == 2000
    assert report_archive(50, seed=3) != report_archive(50, seed=4)
    cases = {(root / k / f"{k}_flair_text.txt").read_text().strip() for k, c in truth["cases"].items()
             if not c["healthy"]}
    assert not cases & set(archive)  # a draw equal to a case's report is left out
    assert set(drawn) - set(archive) <= cases
    sides = [report_side(text) for text in archive]
    assert sides.count("bilateral") == 200  # a tenth, as among the cases
    assert abs(sides.count("left") - sides.count("right")) <= 1
    for text in archive:  # the same sentences as the cases' reports: opening, size, edema, necrosis, ventricles
        assert re.search(r"\d\.\d cm in its largest diameter", text) and "Edema" in text and "Ventricular" in text


def test_deterministic_for_a_seed(tmp_path):
    size = (MIN_SIZE, MIN_SIZE, MIN_SIZE)
    first, again, other = (write_brain(tmp_path / name, n=3, seed=seed, size=size, n_healthy=1).parent
                           for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 3 * 2 + 1 + 1 + 1  # cases (volume, report), a control, truth.json, report_archive.json
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (first / files[0]).read_bytes() != (other / files[0]).read_bytes()


@pytest.mark.parametrize("argv, flag", [
    (["--size", "16", "48", "48"], "--size"),
    (["--size", "48", "48"], "--size"),
    (["--n", "4"], "--n"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, flag):
    assert phantoms.main(["brain", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}:")
    assert not (tmp_path / "out").exists()
