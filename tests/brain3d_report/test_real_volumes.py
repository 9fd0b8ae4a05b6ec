"""Real tumour volumes (six BraTS 2015 cases in ../shared/data/brats2015: z-scored FLAIR with a constant negative
background, label map, brain mask, stored L,P,S): they load, the tumour lands on its side, the orientation a file is
stored in does not change the model's input, and generate / explain take them with --input. Skipped where the data
are absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brain3d_report import explain, generate
from brain3d_report.data import brain_mask, check_voxels, load_volume

FLAIR = "Flair_subtrMeanDivStd.nii.gz"
SIZE = (16, 32, 32)  # the tiny run's volume size
CHECK_SIZE = (32, 64, 64)
"""Volume size of the side and orientation checks: a 240 x 240 x 155 scan resizes (anti-aliased) in about 6 s at
this size on a shared CPU core, 11 s at SIZE, whose Gaussian is wider."""
CASES = ("test/brats_2013_pat0001_1", "test/brats_2013_pat0002_1")  # tumour in the right / left hemisphere


@pytest.fixture(scope="module")
def brats(shared_data) -> Path:
    root = shared_data / "brats2015"
    if not root.is_dir():
        pytest.skip("../shared/data/brats2015 is not present")
    return root


def _case_dirs(brats: Path) -> list[Path]:
    return sorted(p for p in brats.glob("*/*") if (p / FLAIR).is_file())


@pytest.mark.slow  # twelve 36 MB gzipped NIfTI files read
def test_the_brain_of_every_zscored_case_is_its_brain_mask(brats):
    """The background of a z-scored volume is a negative constant, not 0: the brain rule finds the brain mask."""
    cases = _case_dirs(brats)
    assert len(cases) == 6
    for case in cases:
        flair = np.asarray(nib.load(case / FLAIR).dataobj)
        mask = np.asarray(nib.load(case / "brainmask.nii.gz").dataobj) > 0
        assert flair.min() < 0 and (flair <= 0).mean() > 0.5  # half the brain is below 0 as well
        np.testing.assert_array_equal(brain_mask(flair).numpy(), mask, err_msg=str(case))
        check_voxels(flair)  # not refused as "no brain"


def _world_side(label_image: nib.Nifti1Image, mask_image: nib.Nifti1Image) -> str:
    """The tumour's side from its label map in world (RAS) coordinates: its centroid against the brain's."""
    def centroid_x(image, voxels):
        return float((image.affine @ np.r_[np.argwhere(voxels).mean(0), 1.0])[0])

    tumour = centroid_x(label_image, np.asarray(label_image.dataobj) > 0)
    brain = centroid_x(mask_image, np.asarray(mask_image.dataobj) > 0)
    return "right" if tumour > brain else "left"  # RAS: x grows towards the patient's right


def _preprocessed_side(label_image: nib.Nifti1Image, mask_image: nib.Nifti1Image, folder: Path) -> str:
    """The half of the preprocessed grid (H < H/2: the patient's left) holding most of the tumour, through the real
    preprocessing: a NIfTI with the case's header whose brain is 0.5 and tumour 1.0."""
    marker = np.where(np.asarray(label_image.dataobj) > 0, 1.0, 0.5) * (np.asarray(mask_image.dataobj) > 0)
    path = folder / "marker.nii.gz"
    nib.save(nib.Nifti1Image(marker.astype(np.float32), label_image.affine, label_image.header), path)
    volume = load_volume(path, CHECK_SIZE)[0]
    tumour = (volume > 0.5).float()
    half = volume.shape[1] // 2
    left, right = float(tumour[:, :half].sum()), float(tumour[:, half:].sum())
    assert left + right > 0
    return "left" if left > right else "right"


@pytest.mark.slow  # three real scans preprocessed (about 20 s)
def test_the_tumour_lands_in_the_half_of_its_side(brats, tmp_path):
    """Side from the label map in world coordinates equals the half it lands in after preprocessing, for a left and
    a right case; mirrored data (the same header, the x voxel axis reversed) moves the tumour to the other side in
    both."""
    sides = []
    for name, mirror in ((CASES[0], False), (CASES[1], False), (CASES[0], True)):
        label = nib.load(brats / name / "OTMultiClass.nii.gz")
        mask = nib.load(brats / name / "brainmask.nii.gz")
        if mirror:
            label = nib.Nifti1Image(np.asarray(label.dataobj)[::-1].copy(), label.affine, label.header)
            mask = nib.Nifti1Image(np.asarray(mask.dataobj)[::-1].copy(), mask.affine, mask.header)
        world = _world_side(label, mask)
        assert _preprocessed_side(label, mask, tmp_path) == world, (name, mirror)
        sides.append(world)
    assert sides == ["right", "left", "left"]  # one case per side, and the mirrored case swapped


@pytest.mark.slow  # two real scans preprocessed (about 13 s)
def test_another_storage_orientation_preprocesses_to_the_same_tensor(brats, tmp_path):
    """The same volume stored A,S,R with the data permuted and flipped (affine adjusted) gives the same input."""
    original = nib.load(brats / CASES[0] / FLAIR)
    target = nib.orientations.axcodes2ornt(("A", "S", "R"))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(original.affine), target)
    reoriented = original.as_reoriented(transform)
    assert nib.aff2axcodes(reoriented.affine) == ("A", "S", "R")
    assert reoriented.shape == (240, 155, 240)
    path = tmp_path / "reoriented.nii.gz"
    nib.save(reoriented, path)
    torch.testing.assert_close(load_volume(path, CHECK_SIZE), load_volume(brats / CASES[0] / FLAIR, CHECK_SIZE),
                               rtol=0, atol=1e-6)


@pytest.mark.slow  # a real scan preprocessed twice, generation and 10 LIME samples (about 25 s)
def test_generate_and_explain_take_a_real_zscored_volume(brats, brain_tiny_runs, tmp_path, capsys):
    flair = brats / CASES[1] / FLAIR
    run = Path(shutil.copytree(brain_tiny_runs["r2"], tmp_path / "run"))
    assert generate.main(["--run-dir", str(run), "--input", str(flair), "--device", "cpu", "--greedy",
                          "--max-new-tokens", "8"]) == 0
    records = [json.loads(line) for line in (run / "predictions" / "inputs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["Flair_subtrMeanDivStd"] and isinstance(records[0]["report"], str)

    assert explain.main(["--run-dir", str(run), "--input", str(flair), "--phrase", "left frontal", "--samples", "10",
                         "--supervoxels", "8", "--batch-size", "5", "--device", "cpu"]) == 0
    assert "base log-likelihood" in capsys.readouterr().out
    stem = run / "explain" / "Flair_subtrMeanDivStd_left-frontal"
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["source"] == str(flair) and record["side"] is None
    heat = nib.load(stem.with_suffix(".nii.gz"))
    np.testing.assert_allclose(heat.affine, explain.preprocessed_affine(flair, SIZE), atol=1e-5)
    volume = load_volume(flair, SIZE)[0].numpy()
    labels = explain.supervoxels(volume, 8, 0.1)
    assert (labels >= 0).sum() == (volume > 0).sum()  # supervoxels cover the brain, never the z-scored background
    weights = np.asarray(record["weights"])
    np.testing.assert_allclose(np.asarray(heat.dataobj), np.where(labels >= 0, weights[labels.clip(0)], 0),
                               rtol=1e-6, atol=1e-7)


def _bad_file(kind: str, folder: Path) -> tuple[Path, str]:
    path = folder / f"{kind}.nii.gz"
    if kind == "4d":
        nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(12, 12, 12, 2)).astype(np.float32),
                                 np.eye(4)), path)
        return path, "is 4-D"
    if kind == "zero-affine":
        volume = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
        header = nib.Nifti1Image(volume, np.eye(4)).header.copy()
        header["srow_x"] = header["srow_y"] = header["srow_z"] = 0
        header["qform_code"], header["sform_code"] = 0, 1
        nib.save(nib.Nifti1Image(volume, None, header=header), path)
        return path, "zero or singular"
    # no brain: a z-scored background with a handful of voxels above it
    volume = np.full((24, 24, 24), -3.5, dtype=np.float32)
    volume[10:12, 10:12, 10:12] = 1.0
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    return path, "no brain"


@pytest.mark.parametrize("kind", ["4d", "zero-affine", "no-brain"])
@pytest.mark.parametrize("tool", ["generate", "explain"])
def test_bad_real_inputs_end_in_one_line_and_exit_2(brain_tiny_runs, tmp_path, capsys, kind, tool):
    path, words = _bad_file(kind, tmp_path)
    run = Path(shutil.copytree(brain_tiny_runs["r2"], tmp_path / "run"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    argv = ["--run-dir", str(run), "--input", str(path), "--device", "cpu"]
    module = generate if tool == "generate" else explain
    assert module.main(argv + (["--phrase", "left"] if tool == "explain" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}:") and words in err[0], err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written
