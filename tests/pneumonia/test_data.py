"""The MedMNIST loader on the real file and on phantoms; the phantom CLI writes the real format."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from common.phantoms.__main__ import main as phantoms_main
from pneumonia.data import PneumoniaDataset, load_medmnist, to_tensor

EMBEDDED = Path(__file__).resolve().parents[2] / "data" / "samples" / "medmnist"


@pytest.mark.parametrize("where", ["embedded", "shared"])
def test_real_pneumoniamnist_counts_and_checksum_warning(where, request, caplog):
    # The embedded copy ships in the repository, so only the ../shared copy may be absent.
    root = EMBEDDED if where == "embedded" else request.getfixturevalue("shared_data") / "medmnist"
    with caplog.at_level(logging.WARNING, logger="medvl.pneumonia"):
        data = load_medmnist(root, 28)
    assert data.counts() == {"train": {"normal": 1214, "pneumonia": 3494}, "val": {"normal": 135, "pneumonia": 389},
                             "test": {"normal": 234, "pneumonia": 390}}
    assert "MD5 238a40f8f78b9a61dfdd21e86aac35f9 differs" in caplog.text


def test_phantom_cli_writes_medmnist_format(tmp_path, caplog):
    assert phantoms_main(["cxr", "--format", "medmnist", "--out", str(tmp_path), "--n", "40", "--size", "64"]) == 0
    with caplog.at_level(logging.WARNING, logger="medvl.pneumonia"):
        data = load_medmnist(tmp_path, 64)
    assert "split sizes differ" in caplog.text
    assert {s: len(v) for s, v in data.labels.items()} == {"train": 28, "val": 4, "test": 8}
    # The learnable truth: pneumonia images are brighter inside the lungs on average.
    images, labels = data.images["train"].astype(float), data.labels["train"]
    centre = images[:, 16:44, 10:54].mean(axis=(1, 2))
    assert centre[labels == 1].mean() > centre[labels == 0].mean()
    assert phantoms_main(["cxr", "--format", "dicom", "--out", str(tmp_path)]) == 2


def test_phantom_is_seeded(tmp_path):
    for name in ("a", "b"):
        phantoms_main(["cxr", "--format", "medmnist", "--out", str(tmp_path / name), "--n", "20", "--seed", "9"])
    a, b = (np.load(tmp_path / n / "pneumoniamnist.npz") for n in ("a", "b"))
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_normalisation_and_dataset_values():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    tensor = to_tensor(images)
    assert tensor.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(tensor[0, 0].numpy(), [[-1.0, 1.0], [-0.6, -0.2]], atol=1e-6)
    image, label = PneumoniaDataset(images, np.array([1]))[0]
    assert label.item() == 1.0 and float(image.max()) == 1.0
