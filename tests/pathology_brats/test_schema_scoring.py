"""Schemas (codes, integer labels, penalty) and the challenge scorer's keys per year."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from common.errors import ConfigError
from pathology_brats.challenge_metrics import SCORER_KEYS, challenge_scores
from pathology_brats.schema import get_schema


@pytest.mark.parametrize("year, code, label, penalty, count", [
    ("2024", "IC", 5, 6, 6), ("2025", "PL", 8, 9, 9), ("2025", "ct", 0, 9, 9), ("2026", "NOTA", 9, 10, 10),
    ("2026", "DM", 1, 10, 10), ("2025", "3", 3, 9, 9), ("2025", 7.0, 7, 9, 9),
])
def test_schema_labels(year, code, label, penalty, count):
    schema = get_schema(year)
    assert schema.label(code) == label and schema.penalty == penalty and len(schema.classes) == count
    assert schema.num_scored_classes == penalty + 1


@pytest.mark.parametrize("year, bad", [("2025", "NOTA"), ("2024", "LI"), ("2025", 9), ("2025", "2.5"),
                                       ("2026", -1)])
def test_labels_outside_the_schema_are_refused(year, bad):
    with pytest.raises(ValueError, match=f"not a class of the {year} schema"):
        get_schema(year).label(bad)


def test_unknown_year():
    with pytest.raises(ConfigError, match="--schema"):
        get_schema("2023")


def test_2025_scores_and_the_penalty_label():
    schema = get_schema("2025")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 9, 400)
    p = np.where(rng.random(400) < 0.7, y, rng.integers(0, 9, 400))
    p[:20] = schema.penalty  # unreadable images
    scores = challenge_scores(y, p, "2025")
    assert tuple(scores) == SCORER_KEYS["2025"]
    accuracy = skm.accuracy_score(y, p)
    assert scores["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p))
    assert scores["f1_global"] == pytest.approx(accuracy) == scores["recall_global"]
    assert scores["specificity_global"] == pytest.approx(1 - (1 - accuracy) / 9)  # 10 scored classes


def test_2026_keys_are_macro_and_weighted():
    y = np.array([0, 0, 1, 1, 2, 2, 9, 9])
    p = np.array([0, 1, 1, 1, 2, 0, 9, 10])
    scores = challenge_scores(y, p, "2026")
    assert tuple(scores) == SCORER_KEYS["2026"]
    assert scores["f1_per_class_average"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert scores["recall_per_class_average"] == pytest.approx(skm.recall_score(y, p, average="macro", zero_division=0))
