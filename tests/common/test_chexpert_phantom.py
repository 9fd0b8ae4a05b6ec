"""The CheXpert phantom is compositional: findings are combinations of shared aspect values that the descriptions
state and the images show; studies hold several views with one set of labels."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd

from common.phantoms import chexpert
from common.phantoms.chexpert import ASPECT_SENTENCES, DESCRIBED, FINDINGS, VARYING, draw_findings

BASE = {"location": "upper", "opacity": "dense", "pattern": "round", "border": "sharp", "extent": "one lung",
        "fluid": "none"}


def _instances(name: str) -> list[dict]:
    """Every combination of values a finding can be drawn with (its varying aspects take each value)."""
    values = FINDINGS[name]
    free = [a for a in VARYING if values[a] is None]
    return [{**values, **dict(zip(free, combo))} for combo in itertools.product(*(VARYING[a] for a in free))]


HOLDABLE = ("Atelectasis", "Consolidation", "Pneumonia", "Lung Lesion", "Pneumothorax", "Pleural Other")
"""Findings built to be held out: they meet every condition of the module docstring."""


def test_a_held_out_finding_is_made_of_values_trained_on_other_findings():
    """The holdable findings meet all four conditions of the module docstring; every finding meets the first and
    third."""
    stated = lambda name: {a: v for a, v in FINDINGS[name].items() if a in DESCRIBED and v not in (None, "none")}  # noqa: E731
    for held in FINDINGS:
        others = [n for n in FINDINGS if n != held]
        drawn = [i for n in others for i in _instances(n)]
        for aspect, value in stated(held).items():  # its sentences are trained on another finding
            assert any(FINDINGS[n][aspect] == value for n in others), (held, aspect, value)
        for other in drawn:  # no other finding can be drawn as it is
            assert any(other[a] != v for a, v in stated(held).items()), (held, other)
        if held in HOLDABLE:
            for (a, v), (b, w) in itertools.combinations(stated(held).items(), 2):  # every pair drawn elsewhere
                assert any(i[a] == v and i[b] == w for i in drawn), (held, v, w)
            for aspect, value in stated(held).items():  # each sentence is no one other finding's detector
                assert sum(FINDINGS[n][aspect] == value for n in others) >= 2, (held, aspect, value)
    assert set(chexpert.COMPETITION) | set(chexpert.EXTRA_FINDINGS) == set(FINDINGS)


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
    assert set(descriptions) == set(FINDINGS)
    for name, entry in descriptions.items():
        values = FINDINGS[name]
        assert entry["aspects"] == {a: ASPECT_SENTENCES[a][values[a]] for a in DESCRIBED
                                    if values[a] in ASPECT_SENTENCES[a]}
        for aspect in ("location", "opacity", "pattern", "border"):
            if values[aspect] is not None:
                assert values[aspect] in entry["definition"]
        assert ("fluid" in entry["definition"]) == (values["fluid"] == "fluid")
    truth = pd.read_csv(tmp_path / "phantom_truth.csv", keep_default_na=False)
    drawn = truth.loc[(truth["strength_Atelectasis"] > 0) & (truth["view"] == "Frontal"), "values_Atelectasis"]
    assert {v.split(",")[0] for v in drawn} == {"upper", "lower"}  # its location varies from study to study
    assert {v.split(",")[1:] == ["linear", "sharp"] for v in drawn} == {True}  # what it fixes does not
    frame = pd.concat([pd.read_csv(tmp_path / "train.csv"), pd.read_csv(tmp_path / "valid.csv")])
    frame["study"] = frame["Path"].str.extract(r"(patient\d+/study\d+)")[0]
    views = frame.groupby("study")["Path"].count()
    assert views.max() >= 2 and (frame.groupby("study")["Frontal/Lateral"].nunique() == 2).any()
    labels = frame.groupby("study")[list(FINDINGS)].nunique(dropna=False)
    assert (labels == 1).all().all()  # every view of a study carries the study's labels
