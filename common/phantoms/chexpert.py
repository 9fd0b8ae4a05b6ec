"""CheXpert-v1.0-small phantom whose findings are combinations of shared visual aspects, in studies of several views.

    python -m common.phantoms cxr --format chexpert --out data/chexpert_phantom --n 500 --seed 0

Layout written (as the Kaggle copy of CheXpert-v1.0-small)::

    train.csv    Path, Sex, Age, Frontal/Lateral, AP/PA + the 14 observations (1.0, 0.0, -1.0 or blank)
    valid.csv    the same columns, other patients, labels 0/1 only (as the radiologist-consensus validation set)
    train/patient00001/study1/view1_frontal.jpg   8-bit grey JPGs; a study may add view2_frontal.jpg and a
    valid/patient64541/study1/view1_frontal.jpg   lateral view (viewN_lateral.jpg); every view of a study shows
                                                  the same findings and carries the same labels
    descriptions.json   each finding's aspects in words: {finding: {definition, aspects: {aspect: sentence}}}
    phantom_truth.csv   per image: the strength of each drawn finding and its varying aspects' values
                        (location, pattern, border; phantom only)

``Path`` values start with ``CheXpert-v1.0-small/`` as in the real CSVs, whatever ``--out`` is called.

Nine findings, the five competition ones and Pneumonia, Lung Lesion, Pneumothorax and Pleural Other, are drawn by
one renderer from aspect values (``FINDINGS``): location (upper or lower lung zone), opacity (dense or faint),
pattern (round patch or thin horizontal band), border (sharp or blurred), fluid (a basal fluid meniscus or none) and
extent (one lung or both; drawn, not described). ``descriptions.json`` states exactly what is drawn, one fixed
sentence per value, for all nine. For a finding held out of training to be recognisable from the sentences of its
values, four things must hold (``tests/common/test_chexpert_phantom.py`` checks them): every value it states is
stated by another finding (its sentences were trained); every pair of its values is drawn together on another
finding (a value seen only beside the opposite of another would be learnt as that combination: "dense and lower"
where "dense" was meant); no other finding can be drawn with all of its values (it is told apart); and every value
it states is stated by two or more other findings that differ elsewhere (a sentence that one seen finding alone
states is trained as that finding's detector: with the five competition findings only, Consolidation's "upper" and
"blurred" were Edema's alone, and its held-out validation AUROC was 0.58 on a 1,000-patient draw). Some
findings leave one aspect free, drawn at random per study and described as varying: Atelectasis's and Pleural
Other's location, Cardiomegaly's border, Consolidation's pattern. Atelectasis, Consolidation, Pneumonia, Lung
Lesion, Pneumothorax and Pleural Other meet all four; Cardiomegaly misses the second (no other finding is lower and
round), and Edema and Pleural Effusion, the only faint findings with fluid, miss it for those values. A pipeline
trains on the extra four by naming them among its labels; with the competition five only, they are
drawn but unlabelled for it.

A label of -1 (uncertain) means the finding is drawn faintly; a blank means the finding was not mentioned (no
drawing). The other five columns are filled plausibly (No Finding when nothing is present, Lung Opacity with any
parenchymal finding, Support Devices drawn as a line-like tube, Enlarged Cardiomediastinum with some
Cardiomegaly, Fracture at random); only the nine findings are drawn.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from common.phantoms.cxr import _ellipse, radiograph
from common.rundir import atomic_write_bytes, atomic_write_text

DEFAULT_N = 500
"""Training patients written by default; validation patients are 40% more (as 200 of CheXpert's valid.csv)."""
DEFAULT_SIZE = 128
"""Side of the written JPGs (CheXpert-v1.0-small images are about 320 x 390; loaders resize)."""
ROOT_NAME = "CheXpert-v1.0-small"

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
EXTRA_FINDINGS = ("Pneumonia", "Lung Lesion", "Pneumothorax", "Pleural Other")
"""Observations drawn from aspects beside the competition five (``--labels`` names them to train on them)."""
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")

ASPECT_SENTENCES: dict[str, dict[str | None, str]] = {
    "location": {"upper": "The opacity lies in the upper zone of the lung, below the apex.",
                 "lower": "The opacity lies in the lower zone of the lung, just above the diaphragm.",
                 None: "It may lie in the upper or in the lower zone of the lung."},
    "opacity": {"dense": "It is dense and bright, as white as soft tissue.",
                "faint": "It is faint and hazy, a ground glass density through which the lung still shows."},
    "pattern": {"round": "It forms a rounded patch.",
                "linear": "It forms a thin horizontal line, a flat band across the lung.",
                None: "Its shape varies, a rounded patch or a thin band."},
    "border": {"sharp": "Its borders are sharp and well defined.",
               "blurred": "Its borders are blurred and fade gradually into the surrounding lung.",
               None: "Its borders may be sharp or blurred."},
    "fluid": {"fluid": "Fluid layers at the lung base with a meniscus, blunting the costophrenic angle."},
}
"""One sentence per aspect value (``None``: the aspect varies); a finding's description is the sentences of its
values. Fluid is described where it is drawn; extent (one lung or both) is drawn and not described."""
VARYING = {"location": ("upper", "lower"), "pattern": ("round", "linear"), "border": ("sharp", "blurred")}
"""The values an aspect a finding does not fix is drawn from, per study."""

FINDINGS: dict[str, dict[str, str | None]] = {
    "Atelectasis": {"location": None, "opacity": "dense", "pattern": "linear", "border": "sharp",
                    "extent": "one lung", "fluid": "none"},
    "Cardiomegaly": {"location": "lower", "opacity": "dense", "pattern": "round", "border": None,
                     "extent": "both lungs", "fluid": "none"},
    "Consolidation": {"location": "upper", "opacity": "dense", "pattern": None, "border": "blurred",
                      "extent": "one lung", "fluid": "none"},
    "Edema": {"location": "upper", "opacity": "faint", "pattern": "round", "border": "blurred",
              "extent": "both lungs", "fluid": "fluid"},
    "Pleural Effusion": {"location": "lower", "opacity": "faint", "pattern": "linear", "border": "sharp",
                         "extent": "one lung", "fluid": "fluid"},
    "Pneumonia": {"location": "lower", "opacity": "dense", "pattern": "linear", "border": "blurred",
                  "extent": "one lung", "fluid": "none"},
    "Lung Lesion": {"location": "upper", "opacity": "dense", "pattern": "round", "border": "sharp",
                    "extent": "one lung", "fluid": "none"},
    "Pneumothorax": {"location": "upper", "opacity": "faint", "pattern": "linear", "border": "sharp",
                     "extent": "one lung", "fluid": "none"},
    "Pleural Other": {"location": None, "opacity": "faint", "pattern": "linear", "border": "blurred",
                      "extent": "one lung", "fluid": "none"},
}
"""Each drawn finding as a combination of aspect values (``None``: varies per study, from ``VARYING``): the five
competition findings and four more observations, so that every value a competition finding states is also stated
by two or more other findings."""
DESCRIBED = ("location", "opacity", "pattern", "border", "fluid")
"""Aspects stated in ``descriptions.json``, in this order (fluid only where drawn)."""

_PREVALENCE = {"Atelectasis": 0.2, "Cardiomegaly": 0.2, "Consolidation": 0.2, "Edema": 0.2,
               "Pleural Effusion": 0.2, "Pneumonia": 0.15, "Lung Lesion": 0.15, "Pneumothorax": 0.15,
               "Pleural Other": 0.15}
_PARENCHYMAL = ("Edema", "Consolidation", "Atelectasis", "Pneumonia", "Lung Lesion")
"""Findings that make ``Lung Opacity`` positive."""
_UNCERTAIN = 0.1
"""Share of training findings whose label is -1 (drawn faintly)."""
_SECOND_FRONTAL = 0.2
"""Share of studies with a second frontal view."""
_LATERAL_FRACTION = 0.4
"""Share of studies with a lateral view."""
_EXPLICIT_NEGATIVE = 0.3
"""Share of absent findings written as 0.0 rather than left blank."""
_DENSITY = {"dense": 0.4, "faint": 0.18}
_FLUID_DENSITY = 0.3


def describe(finding: str) -> dict:
    """``{definition, aspects}`` of one finding: the sentences of its aspect values (``descriptions.json``)."""
    values = FINDINGS[finding]
    fixed = [values[a] for a in ("opacity", "pattern") if values[a]]
    where = f" in the {values['location']} zone" if values["location"] else ""
    extras = [f"{values['border']} borders"] if values["border"] else []
    extras += ["a basal fluid meniscus"] if values["fluid"] == "fluid" else []
    varying = {"location": "location", "pattern": "shape", "border": "border"}
    free = [varying[a] for a in VARYING if values[a] is None]
    definition = (f"A {' '.join(fixed)} opacity{where} of {values['extent']}"
                  f"{', with ' + ' and '.join(extras) if extras else ''}"
                  f"{'; its ' + ' and '.join(free) + ' varies' if free else ''}.")
    aspects = {a: ASPECT_SENTENCES[a][values[a]] for a in DESCRIBED if values[a] in ASPECT_SENTENCES[a]}
    return {"definition": definition, "aspects": aspects}


def drawn_values(finding: str, rng: np.random.Generator) -> dict[str, str]:
    """The finding's values with each varying aspect drawn (once per study, so its views agree)."""
    return {a: v if v is not None else str(rng.choice(VARYING[a])) for a, v in FINDINGS[finding].items()}


def _lesion(image: np.ndarray, lung: np.ndarray, values: dict[str, str], strength: float, centre_jitter: tuple,
            rng: np.random.Generator) -> np.ndarray:
    """One lung's share of a finding: a patch or band in the named zone, dense or faint, sharp or blurred."""
    size = image.shape[0]
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    top, bottom = rows.min() / size, rows.max() / size
    centre_x = cols.mean() / size + centre_jitter[1]
    fraction = 0.25 if values["location"] == "upper" else 0.72
    centre_y = top + (bottom - top) * fraction + centre_jitter[0]
    if values["pattern"] == "round":
        shape = _ellipse(size, centre_y, centre_x, 0.085 * rng.uniform(0.9, 1.1), 0.075 * rng.uniform(0.9, 1.1))
    else:
        shape = _ellipse(size, centre_y, centre_x, 0.028, 0.14 * rng.uniform(0.9, 1.1),
                         angle=rng.uniform(-0.15, 0.15))
    region = shape.astype(np.float32)
    if values["border"] == "blurred":
        grown = ndimage.binary_dilation(shape, iterations=max(1, size // 64))
        region = ndimage.gaussian_filter(grown.astype(np.float32), sigma=size / 28)
        region = region / max(float(region.max()), 1e-6)
    else:
        region = ndimage.gaussian_filter(region, sigma=size / 256)
    region = region * ndimage.gaussian_filter(lung.astype(np.float32), sigma=size / 128)
    density = _DENSITY[values["opacity"]] * (0.45 + 0.55 * strength)
    return image + density * region.astype(np.float32)


def _fluid(image: np.ndarray, lung: np.ndarray, strength: float, lateral_at_left: bool) -> np.ndarray:
    """A basal fluid layer whose upper edge climbs towards the lateral chest wall (the meniscus sign)."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    bottom, height = rows.max() / size, (rows.max() - rows.min()) / size
    lateral_x = cols.min() / size if lateral_at_left else cols.max() / size
    depth = height * (0.08 + 0.1 * strength)
    rise = 0.9 * depth * np.clip(1 - np.abs(xx - lateral_x) / 0.15, 0, 1) ** 2
    fluid = lung & (yy >= bottom - depth - rise)
    return image + np.where(fluid, _FLUID_DENSITY * (0.45 + 0.55 * strength), 0.0).astype(np.float32)


def _support_device(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    out = image.copy()
    x = int(size * (0.5 + rng.normal(0, 0.02)))
    top, bottom = int(size * 0.05), int(size * rng.uniform(0.45, 0.6))
    out[top:bottom, max(0, x - 1) : x + 1] = 0.95
    return out


def _lateral(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A lateral view look-alike and its one lung field (both lungs project onto it)."""
    body = _ellipse(size, 0.55, 0.5 + rng.normal(0, 0.01), 0.5, 0.3 + rng.normal(0, 0.01))
    image = np.where(body, 0.6, 0.08).astype(np.float32)
    lung = _ellipse(size, 0.45, 0.5, 0.3, 0.2 + rng.normal(0, 0.01))
    image[lung] = 0.3
    image = ndimage.gaussian_filter(image, sigma=size / 100) + rng.normal(0, 0.025, image.shape).astype(np.float32)
    return np.clip(image, 0, 1), {"lateral": lung}


def draw_findings(size: int, strengths: dict[str, float], support_device: bool, rng: np.random.Generator,
                  sides: dict[str, str] | None = None, lateral: bool = False,
                  values: dict[str, dict[str, str]] | None = None) -> np.ndarray:
    """A radiograph with each finding of ``strengths`` (0 absent, ~0.3 faint, 1 clear) drawn from its aspects.

    ``sides`` fixes the lung (``left``/``right``) of one-lung findings and ``values`` the drawn values of each
    finding (``drawn_values``), so the views of one study agree; a lateral view has one lung field, onto which both
    lungs project.
    """
    image, lungs = _lateral(size, rng) if lateral else radiograph(size, rng)
    chosen_values = values or {}
    for name in FINDINGS:
        strength = strengths.get(name, 0.0)
        if strength <= 0:
            continue
        values = chosen_values.get(name) or drawn_values(name, rng)
        if lateral:
            chosen = ["lateral"]
        elif values["extent"] == "both lungs":
            chosen = ["left", "right"]
        else:
            chosen = [(sides or {}).get(name) or str(rng.choice(["left", "right"]))]
        jitter = (rng.normal(0, 0.015), rng.normal(0, 0.012))
        for side in chosen:
            image = _lesion(image, lungs[side], values, strength, jitter, rng)
            if values["fluid"] == "fluid":
                image = _fluid(image, lungs[side], strength, lateral_at_left=side in ("right", "lateral"))
    image = np.clip(image, 0, 1)
    if support_device:
        image = _support_device(image, rng)
    return image


def _draw_labels(rng: np.random.Generator, uncertain: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(labels of the 14 observations with NaN for blank, strengths of the drawn findings)."""
    labels: dict[str, float] = {}
    strengths: dict[str, float] = {}
    for name in FINDINGS:  # independent findings: no one finding gives another away
        present = rng.uniform() < _PREVALENCE[name]
        if present and uncertain and rng.uniform() < _UNCERTAIN:
            labels[name], strengths[name] = -1.0, rng.uniform(0.2, 0.4)
        elif present:
            labels[name], strengths[name] = 1.0, rng.uniform(0.7, 1.0)
        else:
            labels[name] = 0.0 if (not uncertain or rng.uniform() < _EXPLICIT_NEGATIVE) else np.nan
            strengths[name] = 0.0
    parenchymal = any(labels[n] == 1 for n in _PARENCHYMAL)
    labels["Lung Opacity"] = 1.0 if parenchymal else (0.0 if not uncertain else np.nan)
    enlarged = labels["Cardiomegaly"] == 1 and rng.uniform() < 0.3
    labels["Enlarged Cardiomediastinum"] = 1.0 if enlarged else (0.0 if not uncertain else np.nan)
    labels["Fracture"] = 1.0 if rng.uniform() < 0.03 else (0.0 if not uncertain else np.nan)
    labels["Support Devices"] = 1.0 if rng.uniform() < 0.3 else (0.0 if not uncertain else np.nan)
    anything = any(labels[n] in (1.0, -1.0) for n in OBSERVATIONS if n not in ("No Finding", "Support Devices"))
    labels["No Finding"] = np.nan if anything else 1.0
    if not uncertain and anything:
        labels["No Finding"] = 0.0
    return labels, strengths


def _jpg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), mode="L").save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _write_split(out_dir: Path, split: str, first_patient: int, patients: int, size: int,
                 rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    rows, truth = [], []
    training = split == "train"
    for k in range(patients):
        patient = f"patient{first_patient + k:05d}"
        sex = str(rng.choice(["Male", "Female"]))
        age = int(np.clip(rng.normal(60, 17), 18, 90))
        studies = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15])) if training else 1
        for study in range(1, studies + 1):
            labels, strengths = _draw_labels(rng, uncertain=training)
            device = labels["Support Devices"] == 1
            sides = {name: str(rng.choice(["left", "right"])) for name in FINDINGS}
            drawn = {name: drawn_values(name, rng) for name in FINDINGS}
            views = [("frontal", "Frontal")]
            if rng.uniform() < _SECOND_FRONTAL:
                views.append(("frontal", "Frontal"))
            if rng.uniform() < _LATERAL_FRACTION:
                views.append(("lateral", "Lateral"))
            for view_index, (view, kind) in enumerate(views, start=1):
                rel = Path(split) / patient / f"study{study}" / f"view{view_index}_{view}.jpg"
                image = draw_findings(size, strengths, device and kind == "Frontal", rng, sides,
                                      lateral=kind == "Lateral", values=drawn)
                atomic_write_bytes(out_dir / rel, _jpg(image))
                projection = str(rng.choice(["AP", "PA"], p=[0.7, 0.3])) if kind == "Frontal" else np.nan
                rows.append({"Path": f"{ROOT_NAME}/{rel.as_posix()}", "Sex": sex, "Age": age,
                             "Frontal/Lateral": kind, "AP/PA": projection, **labels})
                truth.append({"Path": f"{ROOT_NAME}/{rel.as_posix()}", "view": kind,
                              **{f"strength_{n}": strengths[n] for n in FINDINGS},
                              **{f"values_{n}": ",".join(drawn[n][a] for a in VARYING) if strengths[n] > 0 else ""
                                 for n in FINDINGS}})
    return rows, truth


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    return pd.DataFrame(rows, columns=list(columns)).to_csv(index=False)


def write_chexpert(out_dir: Path, n: int = DEFAULT_N, seed: int = 0, size: int = DEFAULT_SIZE) -> Path:
    """Write the phantom into ``out_dir`` (the ``CheXpert-v1.0-small`` folder itself) and return ``train.csv``."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    columns = META_COLUMNS + OBSERVATIONS
    train_rows, train_truth = _write_split(out_dir, "train", 1, n, size, rng)
    valid_patients = max(10, int(round(0.4 * n)))
    valid_rows, valid_truth = _write_split(out_dir, "valid", 64541, valid_patients, size, rng)
    atomic_write_text(out_dir / "valid.csv", _csv(valid_rows, columns))
    atomic_write_text(out_dir / "phantom_truth.csv", pd.DataFrame(train_truth + valid_truth).to_csv(index=False))
    atomic_write_text(out_dir / "descriptions.json",
                      json.dumps({name: describe(name) for name in FINDINGS}, indent=2) + "\n")
    return atomic_write_text(out_dir / "train.csv", _csv(train_rows, columns))


__all__ = ["write_chexpert", "draw_findings", "drawn_values", "describe", "FINDINGS", "ASPECT_SENTENCES", "VARYING",
           "DESCRIBED", "OBSERVATIONS",
           "COMPETITION", "EXTRA_FINDINGS", "META_COLUMNS", "ROOT_NAME", "DEFAULT_N", "DEFAULT_SIZE"]
