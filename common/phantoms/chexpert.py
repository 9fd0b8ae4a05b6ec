"""CheXpert-v1.0-small phantom: radiographs whose five competition findings each have their own visual signature.

    python -m common.phantoms cxr --format chexpert --out data/chexpert_phantom --n 500 --seed 0

Layout written (as the Kaggle copy of CheXpert-v1.0-small)::

    train.csv    Path, Sex, Age, Frontal/Lateral, AP/PA + the 14 observations (1.0, 0.0, -1.0 or blank)
    valid.csv    the same columns, other patients, labels 0/1 only (as the radiologist-consensus validation set)
    train/patient00001/study1/view1_frontal.jpg   8-bit grey JPGs; some studies add view2_lateral.jpg
    valid/patient64541/study1/view1_frontal.jpg
    phantom_truth.csv   per image: the strength of each drawn signature (phantom only)

``Path`` values start with ``CheXpert-v1.0-small/`` as in the real CSVs, whatever ``--out`` is called.

Signatures on ``common.phantoms.cxr.radiograph`` (the patient's left is the image's right):
    Cardiomegaly        a wide heart (cardiothoracic ratio above one half)
    Pleural Effusion    fluid at a lung base whose upper edge rises laterally (a meniscus), blunting the angle
    Edema               bilateral perihilar haze fading towards the periphery ("bat wing")
    Consolidation       a dense, homogeneous opacity filling one lung zone, with dark air bronchograms
    Atelectasis         a plate-like band opacity and volume loss (an elevated hemidiaphragm) in one lung

Several findings occur together (cardiomegaly raises the chance of edema and effusion). A label of -1 (uncertain)
means the signature is drawn faintly; a blank means the finding was not mentioned (no signature). The other nine
columns are filled plausibly (No Finding when nothing is present, Lung Opacity with any parenchymal finding,
Enlarged Cardiomediastinum with some cardiomegaly, Support Devices drawn as a line-like tube); only the five
competition findings are meant to be learned.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from common.phantoms.cxr import _ellipse, lung_zone_mask, radiograph
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
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")

_PREVALENCE = {"Atelectasis": 0.28, "Cardiomegaly": 0.25, "Consolidation": 0.22, "Edema": 0.25,
               "Pleural Effusion": 0.28}
_UNCERTAIN = 0.1
"""Share of training findings whose label is -1 (drawn faintly)."""
_LATERAL_FRACTION = 0.15
_EXPLICIT_NEGATIVE = 0.3
"""Share of absent findings written as 0.0 rather than left blank."""


def _cardiomegaly(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    width = 0.15 + 0.09 * strength + rng.normal(0, 0.006)
    heart = _ellipse(size, 0.63 + rng.normal(0, 0.01), 0.55 + rng.normal(0, 0.01), 0.15 + 0.03 * strength, width)
    out = image.copy()
    out[heart] = np.maximum(out[heart], 0.66 + rng.normal(0, 0.02))
    return out


def _effusion(image: np.ndarray, lungs: dict[str, np.ndarray], strength: float, rng: np.random.Generator):
    size = image.shape[0]
    out = image.copy()
    sides = [s for s in ("left", "right") if rng.uniform() < 0.6] or [str(rng.choice(["left", "right"]))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for side in sides:
        lung = lungs[side]
        rows = np.flatnonzero(lung.any(axis=1))
        cols = np.flatnonzero(lung.any(axis=0))
        bottom, height = rows.max() / size, (rows.max() - rows.min()) / size
        lateral_x = cols.min() / size if side == "right" else cols.max() / size
        depth = height * (0.12 + 0.22 * strength) * rng.uniform(0.85, 1.15)
        # The fluid's upper edge climbs towards the lateral chest wall (the meniscus sign).
        rise = 0.9 * depth * np.clip(1 - np.abs(xx - lateral_x) / 0.15, 0, 1) ** 2
        fluid = lung & (yy >= bottom - depth - rise)
        out = out + np.where(fluid, 0.34 * (0.45 + 0.55 * strength), 0.0).astype(np.float32)
    return np.clip(ndimage.gaussian_filter(out, sigma=size / 256), 0, 1)


def _edema(image: np.ndarray, lungs: dict[str, np.ndarray], strength: float, rng: np.random.Generator):
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    haze = np.zeros_like(image)
    for cx in (0.39, 0.61):
        cy = 0.5 + rng.normal(0, 0.015)
        haze += np.exp(-(((yy - cy) / 0.13) ** 2 + ((xx - cx) / 0.09) ** 2))
    texture = ndimage.gaussian_filter(rng.normal(0, 1, image.shape), sigma=size / 64)
    haze *= 1 + 0.3 * texture / (np.abs(texture).max() + 1e-6)
    lung_any = lungs["left"] | lungs["right"]
    haze = ndimage.gaussian_filter(haze * lung_any, sigma=size / 80)
    return np.clip(image + (0.1 + 0.18 * strength) * haze.astype(np.float32), 0, 1)


def _consolidation(image: np.ndarray, lungs: dict[str, np.ndarray], strength: float, rng: np.random.Generator):
    size = image.shape[0]
    side = str(rng.choice(["left", "right"]))
    zone = str(rng.choice(["upper", "middle", "lower"], p=[0.4, 0.35, 0.25]))
    region = lung_zone_mask(lungs[side], zone).astype(np.float32)
    region = ndimage.gaussian_filter(region, sigma=size / 70)
    bronchi = np.zeros_like(image)
    coords = np.argwhere(region > 0.5)
    for _ in range(3 if len(coords) else 0):
        y0, x0 = coords[rng.integers(len(coords))]
        angle = rng.uniform(-0.6, 0.6) + np.pi / 2
        for t in np.linspace(0, size * 0.08, 12):
            y, x = int(y0 + t * np.sin(angle)), int(x0 + t * np.cos(angle) * 0.5)
            if 0 <= y < size and 0 <= x < size:
                bronchi[y, x] = 1.0
    bronchi = ndimage.gaussian_filter(bronchi, sigma=size / 200) * region
    density = (0.26 + 0.24 * strength) * region - 0.12 * strength * bronchi / (bronchi.max() + 1e-6)
    return np.clip(image + density.astype(np.float32), 0, 1)


def _atelectasis(image: np.ndarray, lungs: dict[str, np.ndarray], strength: float, rng: np.random.Generator):
    size = image.shape[0]
    side = str(rng.choice(["left", "right"]))
    lung = lungs[side]
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    top, bottom = rows.min() / size, rows.max() / size
    centre_x = cols.mean() / size
    out = image.copy()
    # Volume loss: the hemidiaphragm rises, soft tissue replaces the lowest part of that lung.
    yy = np.mgrid[0:size, 0:size][0].astype(np.float32) / size
    lift = (bottom - top) * (0.06 + 0.1 * strength)
    out = np.where(lung & (yy >= bottom - lift), np.maximum(out, 0.56), out)
    band_y = top + (bottom - top) * rng.uniform(0.55, 0.72)
    band = _ellipse(size, band_y, centre_x + rng.normal(0, 0.015), 0.04, 0.14, angle=rng.uniform(-0.25, 0.25))
    band = ndimage.gaussian_filter((band & lung).astype(np.float32), sigma=size / 220)
    return np.clip(out + (0.3 + 0.26 * strength) * band, 0, 1)


def _support_device(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    out = image.copy()
    x = int(size * (0.5 + rng.normal(0, 0.02)))
    top, bottom = int(size * 0.05), int(size * rng.uniform(0.45, 0.6))
    out[top:bottom, max(0, x - 1) : x + 1] = 0.95
    return out


def _lateral(size: int, rng: np.random.Generator) -> np.ndarray:
    body = _ellipse(size, 0.55, 0.5 + rng.normal(0, 0.01), 0.5, 0.3 + rng.normal(0, 0.01))
    image = np.where(body, 0.6, 0.08).astype(np.float32)
    lung = _ellipse(size, 0.45, 0.5, 0.3, 0.2 + rng.normal(0, 0.01))
    image[lung] = 0.3
    image = ndimage.gaussian_filter(image, sigma=size / 100) + rng.normal(0, 0.025, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def draw_findings(size: int, strengths: dict[str, float], support_device: bool,
                  rng: np.random.Generator) -> np.ndarray:
    """A frontal radiograph with each finding of ``strengths`` (0 absent, ~0.3 faint, 1 clear) drawn on it."""
    image, lungs = radiograph(size, rng)
    if strengths.get("Cardiomegaly", 0) > 0:
        image = _cardiomegaly(image, strengths["Cardiomegaly"], rng)
    if strengths.get("Atelectasis", 0) > 0:
        image = _atelectasis(image, lungs, strengths["Atelectasis"], rng)
    if strengths.get("Consolidation", 0) > 0:
        image = _consolidation(image, lungs, strengths["Consolidation"], rng)
    if strengths.get("Edema", 0) > 0:
        image = _edema(image, lungs, strengths["Edema"], rng)
    if strengths.get("Pleural Effusion", 0) > 0:
        image = _effusion(image, lungs, strengths["Pleural Effusion"], rng)
    if support_device:
        image = _support_device(image, rng)
    return image


def _draw_labels(rng: np.random.Generator, uncertain: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(labels of the 14 observations with NaN for blank, signature strengths of the 5 findings)."""
    labels: dict[str, float] = {}
    strengths: dict[str, float] = {}
    cardio = rng.uniform() < _PREVALENCE["Cardiomegaly"]
    for name in COMPETITION:
        p = _PREVALENCE[name] * (1.6 if cardio and name in ("Edema", "Pleural Effusion") else 1.0)
        present = cardio if name == "Cardiomegaly" else rng.uniform() < p
        if present and uncertain and rng.uniform() < _UNCERTAIN:
            labels[name], strengths[name] = -1.0, rng.uniform(0.2, 0.4)
        elif present:
            labels[name], strengths[name] = 1.0, rng.uniform(0.7, 1.0)
        else:
            labels[name] = 0.0 if (not uncertain or rng.uniform() < _EXPLICIT_NEGATIVE) else np.nan
            strengths[name] = 0.0
    parenchymal = any(labels[n] == 1 for n in ("Edema", "Consolidation", "Atelectasis"))
    labels["Lung Opacity"] = 1.0 if parenchymal else (0.0 if not uncertain else np.nan)
    labels["Pneumonia"] = (-1.0 if uncertain and rng.uniform() < 0.5 else 1.0) if (
        labels["Consolidation"] == 1 and rng.uniform() < 0.4) else (0.0 if not uncertain else np.nan)
    labels["Enlarged Cardiomediastinum"] = 1.0 if cardio and rng.uniform() < 0.3 else (0.0 if not uncertain else np.nan)
    for name, p in (("Lung Lesion", 0.04), ("Pneumothorax", 0.05), ("Pleural Other", 0.02), ("Fracture", 0.03)):
        labels[name] = 1.0 if rng.uniform() < p else (0.0 if not uncertain else np.nan)
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
            views = [("frontal", "Frontal")]
            if rng.uniform() < _LATERAL_FRACTION:
                views.append(("lateral", "Lateral"))
            for view_index, (view, kind) in enumerate(views, start=1):
                rel = Path(split) / patient / f"study{study}" / f"view{view_index}_{view}.jpg"
                if kind == "Frontal":
                    image = draw_findings(size, strengths, device, rng)
                else:
                    image = _lateral(size, rng)
                atomic_write_bytes(out_dir / rel, _jpg(image))
                projection = str(rng.choice(["AP", "PA"], p=[0.7, 0.3])) if kind == "Frontal" else np.nan
                rows.append({"Path": f"{ROOT_NAME}/{rel.as_posix()}", "Sex": sex, "Age": age,
                             "Frontal/Lateral": kind, "AP/PA": projection, **labels})
                truth.append({"Path": f"{ROOT_NAME}/{rel.as_posix()}", "view": kind,
                              **{f"strength_{n}": (strengths[n] if kind == "Frontal" else 0.0) for n in COMPETITION}})
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
    return atomic_write_text(out_dir / "train.csv", _csv(train_rows, columns))


__all__ = ["write_chexpert", "draw_findings", "OBSERVATIONS", "COMPETITION", "META_COLUMNS", "ROOT_NAME", "DEFAULT_N",
           "DEFAULT_SIZE"]
