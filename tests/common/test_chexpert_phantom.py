"""The CheXpert phantom is compositional: findings are combinations of shared aspect values that the descriptions
state and the images show; studies hold several views with one set of labels."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd

from common.phantoms import chexpert
from common.phantoms.chexpert import ASPECT_SENTENCES, FINDINGS, draw_findings

BASE = {"location": "upper", "opacity": "dense", "pattern": "round", "border": "sharp", "extent": "one lung",
        "fluid": "none"}


def test_every_value_is_shared_and_findings_differ_in_at_least_two_aspects():
    for aspect, values in ASPECT_SENTENCES.items():
        for value in values:
            holders = [name for name, v in FINDINGS.items() if v[aspect] == value]
            assert len(holders) >= 2, (aspect, value, holders)
    for a, b in itertools.combinations(FINDINGS, 2):
        assert sum(FINDINGS[a][k] != FINDINGS[b][k] for k in ASPECT_SENTENCES) >= 2, (a, b)


def _drawn(monkeypatch, **change) -> np.ndarray:
    """What one finding adds to a radiograph: the same seed with and without it (the lung is fixed)."""
    monkeypatch.setattr(chexpert, "FINDINGS", {"X": {**BASE, **change}})
    with_finding = draw_findings(96, {"X": 1.0}, False, np.random.default_rng(3), sides={"X": "right"})
    without = draw_findings(96, {}, False, np.random.default_rng(3))
    return with_finding - without


def _centroid(diff: np.ndarray) -> tuple[float, float]:
    weights = np.clip(diff, 0, None)
    yy, xx = np.mgrid[0 : diff.shape[0], 0 : diff.shape[1]]
    return float((weights * yy).sum() / weights.sum()), float((weights * xx).sum() / weights.sum())


def _flatness(shape: np.ndarray) -> float:
    """Height over width of a drawn shape's bounding box."""
    rows, cols = np.flatnonzero(shape.any(1)), np.flatnonzero(shape.any(0))
    return (np.ptp(rows) + 1) / (np.ptp(cols) + 1)


def test_images_show_each_aspect_value(monkeypatch):
    upper, lower = _drawn(monkeypatch), _drawn(monkeypatch, location="lower")
    assert _centroid(upper)[0] < _centroid(lower)[0] - 10
    dense, faint = upper.max(), _drawn(monkeypatch, opacity="faint").max()
    assert dense > 1.8 * faint > 0.1
    assert _flatness(_drawn(monkeypatch, pattern="linear") > 0.1) < 0.5 < _flatness(upper > 0.1)
    blurred = _drawn(monkeypatch, border="blurred")
    edge = lambda d: ((d > 0.05 * d.max()) & (d < 0.7 * d.max())).sum() / (d > 0.05 * d.max()).sum()  # noqa: E731
    assert edge(blurred) > 2 * edge(upper)
    both = _drawn(monkeypatch, extent="both lungs")
    half = upper.shape[1] // 2
    assert upper[:, half:].sum() < 0.05 * upper.sum()  # the patient's right lung is on the image's left
    assert both[:, half:].sum() > 0.3 * both.sum()
    fluid = _drawn(monkeypatch, fluid="fluid")
    assert (fluid - upper)[60:].sum() > 5 and abs((fluid - upper)[:40]).sum() < 1e-3


def test_descriptions_state_the_drawn_values_and_studies_have_several_views(tmp_path):
    chexpert.write_chexpert(tmp_path, n=12, seed=0, size=48)
    descriptions = json.loads((tmp_path / "descriptions.json").read_text())
    assert set(descriptions) == set(chexpert.COMPETITION)
    for name, entry in descriptions.items():
        assert entry["aspects"] == {a: ASPECT_SENTENCES[a][v] for a, v in FINDINGS[name].items()}
        for value in FINDINGS[name].values():
            assert ("no fluid" if value == "none" else value) in entry["definition"]
    frame = pd.concat([pd.read_csv(tmp_path / "train.csv"), pd.read_csv(tmp_path / "valid.csv")])
    frame["study"] = frame["Path"].str.extract(r"(patient\d+/study\d+)")[0]
    views = frame.groupby("study")["Path"].count()
    assert views.max() >= 2 and (frame.groupby("study")["Frontal/Lateral"].nunique() == 2).any()
    labels = frame.groupby("study")[list(chexpert.COMPETITION)].nunique(dropna=False)
    assert (labels == 1).all().all()  # every view of a study carries the study's labels
