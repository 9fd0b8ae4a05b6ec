"""GaNDLF-named metrics: each key against sklearn (or by hand) on seeded predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from common.metrics.gandlf import gandlf_metrics


def _predictions(n=300, classes=6, accuracy=0.6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    wrong = (y + rng.integers(1, classes, n)) % classes
    return y, np.where(rng.random(n) < accuracy, y, wrong)


def _specificity(y, p, c):
    tn = np.sum((y != c) & (p != c))
    fp = np.sum((y != c) & (p == c))
    return tn / (tn + fp)


def test_every_key_matches_sklearn():
    y, p = _predictions()
    got = gandlf_metrics(y, p, 6)
    support = np.bincount(y, minlength=6)
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p))
    for name, fn in (("f1", skm.f1_score), ("precision", skm.precision_score), ("recall", skm.recall_score)):
        assert got[f"{name}_global"] == pytest.approx(fn(y, p, average="micro"))
        assert got[f"{name}_per_class_average"] == pytest.approx(fn(y, p, average="macro"))
        assert got[f"{name}_per_class_weighted"] == pytest.approx(fn(y, p, average="weighted"))
    assert got["accuracy_global"] == pytest.approx(skm.accuracy_score(y, p))
    assert got["accuracy_per_class_average"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    spec = np.array([_specificity(y, p, c) for c in range(6)])
    assert got["specificity_per_class_average"] == pytest.approx(spec.mean())
    assert got["specificity_per_class_weighted"] == pytest.approx(np.average(spec, weights=support))
    exact = np.array([skm.roc_auc_score(y == c, p == c) for c in range(6)])  # hard predictions, ties kept whole
    assert got["auroc_per_class_average_exact"] == pytest.approx(exact.mean())
    assert got["auroc_per_class_weighted_exact"] == pytest.approx(np.average(exact, weights=support))
    # GaNDLF scores float32 softmax(one_hot): ties split by rounding noise, so sklearn must see the same floats
    scores = torch.softmax(torch.nn.functional.one_hot(torch.as_tensor(p), 6).float(), dim=1).numpy()
    organisers = np.array([skm.roc_auc_score(y == c, scores[:, c]) for c in range(6)])
    assert got["auroc_per_class_average"] == pytest.approx(organisers.mean(), abs=1e-6)
    assert got["auroc_per_class_weighted"] == pytest.approx(np.average(organisers, weights=support), abs=1e-6)


def test_the_penalty_class_counts_in_the_micro_specificity():
    """BraTS-Path 2024 (6 classes + penalty label 6): specificity_global = 1 - (1 - accuracy) / 6."""
    y, p = _predictions(accuracy=0.392, seed=3)
    got = gandlf_metrics(y, p, 7)
    assert got["specificity_global"] == pytest.approx(1 - (1 - skm.accuracy_score(y, p)) / 6)
    assert gandlf_metrics(y, p, 6)["specificity_global"] == pytest.approx(1 - (1 - skm.accuracy_score(y, p)) / 5)
    assert got["f1_global"] == got["recall_global"] == got["accuracy_global"]  # micro averages coincide


def test_out_of_range_labels_are_refused():
    with pytest.raises(ValueError, match="0..5"):
        gandlf_metrics([0, 1, 6], [0, 1, 2], 6)
