"""--mask-threshold: masks of another size or not strictly binary, resized as the original notebook and binarised."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from cxr_localize import evaluate, train
from cxr_localize.data import MASK_DIR, load_iu

TINY = ["--encoder-weights", "none", "--encoder", "resnet18", "--decoder-channels", "16", "16", "8", "8", "8",
        "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu",
        "--precision", "fp32", "--text-encoder", "tiny-clip"]


def _notebook_mask(mask: Image.Image, side: int) -> np.ndarray:
    """The original notebook's mask transform, literally: ``T.Resize((side, side))`` then ``T.ToTensor()``."""
    return T.Compose([T.Resize((side, side)), T.ToTensor()])(mask)[0].numpy()


def _first_masked(root):
    return sorted(p.name for p in (root / MASK_DIR).iterdir())[0]


def _index(samples, name):
    return samples.filenames.index(name)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_a_smaller_mask_is_resized_as_the_notebook_did(threshold, iu_copy):
    name = _first_masked(iu_copy)
    original = Image.open(iu_copy / MASK_DIR / name)
    assert original.size == (64, 64)
    small = original.resize((50, 40), Image.Resampling.NEAREST)
    small.save(iu_copy / MASK_DIR / name)
    samples = load_iu(iu_copy, image_size=64, mask_threshold=threshold)
    got = samples.masks[_index(samples, name)]
    reference = _notebook_mask(small, 64)
    assert 0 < ((reference > 0) & (reference < 1)).mean()  # the resize made grey edges to binarise
    np.testing.assert_array_equal(got, reference >= threshold)


def test_a_zero_one_mask_reads_as_its_zero_255_twin(iu_copy):
    name = _first_masked(iu_copy)
    small = np.zeros((40, 40), bool)
    small[10:30, 8:24] = True  # 20 x 16 of 40 x 40: 32 x 25.6 pixels of 64 x 64
    found = []
    for scale in (1, 255):
        Image.fromarray(small.astype(np.uint8) * scale).save(iu_copy / MASK_DIR / name)
        samples = load_iu(iu_copy, image_size=64, mask_threshold=0.5)
        found.append(samples.masks[_index(samples, name)])
    assert abs(found[0].sum() - 32 * 25.6) < 0.05 * 32 * 25.6
    np.testing.assert_array_equal(found[0], found[1])


def test_grey_values_are_binarised_at_the_threshold(iu_copy):
    name = _first_masked(iu_copy)
    grey = np.zeros((64, 64), np.uint8)
    grey[5:15, 5:15], grey[20:30, 20:30], grey[40:50, 40:50] = 60, 130, 250
    Image.fromarray(grey).save(iu_copy / MASK_DIR / name)
    for threshold, kept in ((0.2, 300), (0.5, 200), (0.9, 100)):
        samples = load_iu(iu_copy, image_size=64, mask_threshold=threshold)
        mask = samples.masks[_index(samples, name)]
        np.testing.assert_array_equal(mask, grey >= threshold * 255)
        assert mask.sum() == kept
    other = sorted(p.name for p in (iu_copy / MASK_DIR).iterdir())[1]  # binary, of its image's size: exact path
    np.testing.assert_array_equal(samples.masks[_index(samples, other)],
                                  np.asarray(Image.open(iu_copy / MASK_DIR / other)) > 0)


def test_training_and_evaluation_read_resized_masks_alike(iu_copy, tmp_path, capsys):
    for path in (iu_copy / MASK_DIR).iterdir():
        Image.open(path).resize((48, 48), Image.Resampling.NEAREST).save(path)
    run = tmp_path / "run"
    assert train.main(["--data-root", str(iu_copy), "--output-dir", str(run), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mask is 48x48 but its image is 64x64" in err and "--mask-threshold" in err
    assert not run.exists()
    assert train.main(["--data-root", str(iu_copy), "--output-dir", str(run), *TINY, "--mask-threshold", "0.5"]) == 0
    assert json.loads((run / "best" / "model.json").read_text())["data"]["mask_threshold"] == 0.5
    assert evaluate.main(["--run-dir", str(run), "--n-boot", "10", "--n-figures", "0"]) == 0
    assert json.loads((run / "results.json").read_text())["dice"] >= 0


@pytest.mark.parametrize("value", ["0", "1.5", "half"])
def test_a_bad_threshold_is_one_line(value, iu_copy, tmp_path, capsys):
    assert train.main(["--data-root", str(iu_copy), "--output-dir", str(tmp_path / "r"), *TINY,
                       "--mask-threshold", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --mask-threshold")
    assert not (tmp_path / "r").exists()

