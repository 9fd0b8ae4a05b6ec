"""Segmentation metrics against reference libraries on seeded random masks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, jaccard_score

from common.metrics.segmentation import dice, iou, per_image_metrics, pixel_acc, segmentation_metrics


@pytest.fixture(scope="module")
def masks():
    rng = np.random.default_rng(0)
    target = rng.uniform(size=(6, 16, 16)) < 0.2
    probs = np.clip(target * 0.6 + rng.uniform(size=target.shape) * 0.6, 0, 1)
    return probs, target


def test_per_image_matches_sklearn(masks):
    probs, target = masks
    pred = probs >= 0.5
    for i in range(len(target)):
        t, p = target[i].ravel(), pred[i].ravel()
        assert dice(probs, target)[i] == pytest.approx(f1_score(t, p))
        assert iou(probs, target)[i] == pytest.approx(jaccard_score(t, p))
        assert pixel_acc(probs, target)[i] == pytest.approx(accuracy_score(t, p))


def test_matches_torchmetrics(masks):
    torchmetrics = pytest.importorskip("torchmetrics")
    import torch

    probs, target = masks
    per = per_image_metrics(probs, target)
    for i in range(len(target)):
        p, t = torch.tensor(probs[i]), torch.tensor(target[i]).long()
        assert per["dice"][i] == pytest.approx(torchmetrics.functional.classification.binary_f1_score(p, t).item(),
                                               abs=1e-6)
        assert per["iou"][i] == pytest.approx(torchmetrics.functional.classification.binary_jaccard_index(p, t).item(),
                                              abs=1e-6)
        assert per["pixel_acc"][i] == pytest.approx(torchmetrics.functional.classification.binary_accuracy(p, t).item(),
                                                    abs=1e-6)


def test_batch_is_mean_and_edge_cases(masks):
    probs, target = masks
    summary = segmentation_metrics(probs, target)
    assert summary["dice"] == pytest.approx(dice(probs, target).mean())
    empty = np.zeros((8, 8), bool)
    assert per_image_metrics(empty, empty)["dice"][0] == 1.0
    assert per_image_metrics(empty, empty)["iou"][0] == 1.0
    full = np.ones((8, 8), bool)
    assert per_image_metrics(empty, full)["dice"][0] == 0.0
    half = np.zeros((8, 8), bool)
    half[:4] = True
    assert per_image_metrics(half, full)["dice"][0] == pytest.approx(2 * 32 / (32 + 64))
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((4, 4)), np.zeros((5, 5)))
