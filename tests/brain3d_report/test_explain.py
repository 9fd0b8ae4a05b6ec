"""3D LIME: the machinery recovers what a scorer depends on, the phantom's tumour hemisphere, the world geometry.

What these tests prove, and what they do not:
- ``explain_volume`` finds the region a scorer is known to depend on (a box of the volume), so supervoxels, masks,
  fill, kernel weights, ridge fit and the painted heat map fit together.
- On the phantom, with a side-agnostic lesion detector as the target (FLAIR signal brighter than the mirror image
  across the midline), most of the heat map's positive mass lies in the hemisphere that ``truth.json`` names, for
  most tumour cases, whether the file was stored RAS or LPS. This checks LIME and the left/right convention of the
  preprocessed grid (H < H/2 is the patient's left) against the phantom's truth. It does not show that a trained
  report model looks at the tumour: the tiny random LM of a test cannot name sides; that is a property of a
  trained run (``make demo``).
- The CLI runs end to end on a tiny trained run: its target is the phrase's log-likelihood under the model
  (checked against the model's own caption loss), its NIfTI holds the supervoxel weights on the preprocessed grid
  with an affine that maps each voxel to the world position of the same point of the original scan.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brain3d_report import explain, train
from brain3d_report.data import load_cases, load_volume, make_dataset
from common.runs import load_run
from tests.brain3d_report.test_generate_evaluate import tiny_run_dirs


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    return tiny_run_dirs(tmp_path_factory)


def _blob_volume(shape=(16, 32, 32), seed: int = 0) -> torch.Tensor:
    """A brain-like ellipsoid of smooth random texture in [0.3, 0.7] on a zero background, (1, D, H, W)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.85
    texture = 0.5 + 0.2 * np.tanh(np.cumsum(rng.normal(0, 0.3, shape), axis=2) / 3)
    return torch.from_numpy(np.where(inside, texture, 0.0).astype(np.float32))[None]


def test_lime_recovers_the_region_a_scorer_depends_on():
    volume = _blob_volume()
    box = (slice(4, 12), slice(4, 14), slice(10, 24))

    def target(batch: torch.Tensor) -> torch.Tensor:  # depends on the box only
        return batch[:, 0, box[0], box[1], box[2]].flatten(1).mean(1)

    found = explain.explain_volume(volume, target, n_samples=120, n_segments=48, batch_size=120, seed=0)
    array = volume[0].numpy()
    inside = np.zeros(array.shape, dtype=bool)
    inside[box] = True
    fill = array[found.labels >= 0].mean()
    # The target is linear in the masks: switching supervoxel s off moves it by sum over s & box of (v - fill) / |box|.
    expected = np.array([(array[inside & (found.labels == s)] - fill).sum() / inside.sum()
                         for s in range(len(found.weights))])
    assert np.corrcoef(found.weights, expected)[0, 1] > 0.98
    touching = np.isin(found.labels, [s for s in range(len(found.weights)) if (inside & (found.labels == s)).any()])
    positive = np.clip(found.heat, 0, None)
    assert positive[touching].sum() / positive.sum() > 0.97
    assert found.targets[0] == pytest.approx(float(target(volume[None])[0]))  # sample 0 is the unperturbed volume
    assert (found.heat[found.labels < 0] == 0).all()


def _mirror_lesion(batch: torch.Tensor) -> torch.Tensor:
    """FLAIR signal above its mirror image across the midline (H axis) by more than 0.2, summed: no side built in."""
    return torch.relu(batch - batch.flip(3) - 0.2).flatten(1).sum(1)


def test_lime_heat_lies_in_the_phantom_tumour_hemisphere(tiny_run):
    truth = json.loads((tiny_run["data"] / "truth.json").read_text())["cases"]
    cases = [c for c in load_cases(tiny_run["data"], split=None) if truth[c.id]["side"] in ("left", "right")]
    volumes = make_dataset(cases, (16, 32, 32), tiny_run["cache"])
    fractions, stored = [], set()
    for k, case in enumerate(cases):
        found = explain.explain_volume(volumes[k]["image"], _mirror_lesion, n_samples=100, n_segments=64,
                                       batch_size=100, seed=0)
        left = found.hemisphere_mass()["left_fraction"]
        fractions.append(left if truth[case.id]["side"] == "left" else 1 - left)
        if fractions[-1] > 0.5:
            stored.add(truth[case.id]["stored_orientation"])
    assert len(cases) >= 10
    assert sum(f > 0.5 for f in fractions) >= 0.8 * len(cases), fractions
    assert np.mean(fractions) > 0.7, fractions
    assert stored == {"RAS", "LPS"}  # files stored both ways are read with the side where it is


@pytest.mark.parametrize("lps", [False, True])
def test_preprocessed_affine_maps_voxels_to_world_coordinates(tmp_path, lps):
    shape, spacing = (40, 48, 30), np.array([2.0, 1.5, 3.0])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-40.0, -70.0, -20.0]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = grid @ affine[:3, :3].T + affine[:3, 3]
    blob_mm = np.array([-12.0, -20.0, 25.0])  # x < 0: the patient's left
    # A blob of over 1% of the volume, so the p99 of the intensity scaling falls inside it and it alone is bright.
    data = 100 + 0.5 * grid[..., 0] + 900 * (np.linalg.norm(world - blob_mm, axis=-1) < 12)
    if lps:  # the same image stored as BraTS stores it
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
        data, affine = data[::-1, ::-1], affine @ flip
    path = tmp_path / "blob.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine), path)

    size = (16, 32, 32)
    volume = load_volume(path, size)[0].numpy()
    centre = np.argwhere(volume > 0.9).mean(0)
    mapped = explain.preprocessed_affine(path, size) @ np.append(centre, 1.0)
    voxel_mm = np.abs(np.linalg.svd(explain.preprocessed_affine(path, size)[:3, :3])[1]).max()
    assert np.linalg.norm(mapped[:3] - blob_mm) < 0.5 * voxel_mm
    assert centre[1] < size[1] / 2  # left of the midline in the preprocessed grid, as the model sees it


def test_phrase_log_likelihood_is_the_caption_loss_times_the_tokens(tiny_run):
    loaded = load_run(tiny_run["r2"], train.PIPELINE, train.model_builder())
    model = loaded.model
    case = load_cases(tiny_run["data"], split=tiny_run["r2"] / "split.csv").split("test")[0]
    volume = load_volume(case.flair, loaded.meta["preprocessing"]["volume_size"])[None]
    ids = explain.phrase_ids(model.tokenizer, "left frontal")
    with torch.no_grad():
        loss = model.caption_loss(volume, train.prompt_tokens(model.tokenizer), ids)
    value = explain.phrase_log_likelihood(model, volume.expand(2, -1, -1, -1, -1), ids)
    assert value.tolist() == pytest.approx([-loss.item() * ids.shape[1]] * 2, rel=1e-4)


def test_explain_cli_writes_the_heat_map_on_the_original_scan(tiny_run, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(tiny_run["r2"], tmp_path / "run"))
    case = load_cases(tiny_run["data"], split=run / "split.csv").split("test")[0]
    argv = ["--run-dir", str(run), "--case", case.id, "--phrase", "left frontal", "--samples", "12",
            "--supervoxels", "12", "--batch-size", "6", "--device", "cpu", "--volume-cache", str(tiny_run["cache"])]
    assert explain.main(argv) == 0
    assert "base log-likelihood" in capsys.readouterr().out
    stem = run / "explain" / f"{case.id}_left-frontal"
    record = json.loads(stem.with_suffix(".json").read_text())
    image = nib.load(str(stem.with_suffix(".nii.gz")))
    size = record["volume_size"]
    assert image.shape == tuple(size)
    np.testing.assert_allclose(image.affine, explain.preprocessed_affine(case.flair, size), atol=1e-5)

    volume = make_dataset([case], size, tiny_run["cache"])[0]["image"]
    labels = explain.supervoxels(volume[0].numpy(), 12, 0.1)
    weights = np.asarray(record["weights"])
    np.testing.assert_allclose(np.asarray(image.dataobj), np.where(labels >= 0, weights[labels.clip(0)], 0),
                               rtol=1e-6, atol=1e-7)
    model = load_run(run, train.PIPELINE, train.model_builder()).model
    direct = explain.phrase_log_likelihood(model, volume[None], explain.phrase_ids(model.tokenizer, "left frontal"))
    assert record["base_log_likelihood"] == pytest.approx(float(direct[0]), rel=1e-5)
    png = stem.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, flag", [(["--case", "BraTS20_Training_999", "--phrase", "left"], "--case"),
                                         (["--case", "BraTS20_Training_001", "--phrase", "  "], "--phrase")])
def test_bad_explain_inputs_end_in_one_line_and_exit_2(tiny_run, capsys, extra, flag):
    assert explain.main(["--run-dir", str(tiny_run["r2"]), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}:"), err
