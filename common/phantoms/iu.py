"""IU X-ray (OpenI / Kaggle layout) phantom for report-conditioned localisation.

    python -m common.phantoms cxr --format iu --out data/iu_phantom --n 200 --seed 0

Every frontal image holds two opacities of the same look in two different lung zones (side x upper/middle/lower);
the report names one of them and the mask outlines that one. The image alone cannot say which is meant, so a
model that ignores the report reaches at best Dice 2/3 by outlining both (1/2 on average by guessing one), and
a report naming another zone points at empty lung or at the wrong lesion. Half of the second lesions lie in the
same zone of the other lung and half in another zone of the same lung, so the side word alone and the zone word
alone each resolve only half the images.

Layout written (as the Kaggle copy of IU X-ray, plus two phantom-only extras)::

    indiana_reports.csv        uid, MeSH, Problems, image, indication, comparison, findings, impression
    indiana_projections.csv    uid, filename, projection
    images/images_normalized/  <uid>_IM-<uid>-<k>001.dcm.png  8-bit grey
    masked/                    the named lesion, 0/255, same file name
    lungs/                     lung labels, 0 outside, 1 the patient's right lung, 2 the left (phantom only)
    phantom_truth.csv          named and second lesion per image (phantom only)

Radiological convention: the patient's left lung is on the image's right. About 30% of patients have a second
frontal film (same lesions, new background), so patient-level and image-level splits differ; about 10% of
reports have no findings section and name the lesion in the impression only.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from common.phantoms.cxr import ZONES, lung_zone_mask, radiograph
from common.rundir import atomic_write_bytes, atomic_write_text

DEFAULT_N = 200
"""Patients written by default (the real IU X-ray masks cover 239 images)."""
DEFAULT_SIZE = 256
"""Side of the written PNGs; the loaders resize to their ``--image-size``."""

SIDES = ("left", "right")
LUNG_LABELS = {"right": 1, "left": 2}
SECOND_FILM_FRACTION = 0.3
MISSING_FINDINGS_FRACTION = 0.1

_FINDINGS = ("focal opacity", "nodular opacity", "patchy consolidation", "rounded density")
_ZONE_WORDS = {"upper": ("upper lung zone", "upper lobe", "apex"),
               "middle": ("mid lung zone", "midlung", "middle lung zone"),
               "lower": ("lower lung zone", "lower lobe", "lung base")}
_SHORT_ZONE = {"upper": "upper", "middle": "mid", "lower": "lower"}
_NORMAL_SENTENCES = (
    "The heart is normal in size.", "The cardiomediastinal silhouette is within normal limits.",
    "No pneumothorax or pleural effusion.", "There is no pulmonary edema.", "The lungs are otherwise clear.",
    "Visualized osseous structures are intact.", "No acute bony abnormality.",
)
_INDICATIONS = ("Cough.", "Fever and cough.", "Shortness of breath.", "Chest pain.", "Follow-up of lung nodule.")


def lesion_sentence(side: str, zone: str, finding: str, rng: np.random.Generator) -> str:
    """One findings sentence naming side and zone, in one of three phrasings (incl. ``Left-sided``)."""
    words = _ZONE_WORDS[zone][int(rng.integers(3))]
    style = int(rng.integers(3))
    if style == 0:
        return f"There is a {finding} in the {side} {words}."
    if style == 1:
        return f"{finding.capitalize()} is present in the {side} {words}."
    return f"{side.capitalize()}-sided {finding} in the {_SHORT_ZONE[zone]} zone."


def impression_text(side: str, zone: str, finding: str) -> str:
    return f"{side.capitalize()} {_SHORT_ZONE[zone]} zone {finding.split()[-1]}, follow-up advised."


def _lesion(image: np.ndarray, lung: np.ndarray, zone: np.ndarray, rng: np.random.Generator,
            strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Add a lobulated opacity centred inside ``zone``; its mask is the half-maximum region within the lung."""
    size = image.shape[0]
    radius = rng.uniform(0.035, 0.055) * size
    core = ndimage.binary_erosion(zone, iterations=max(1, int(radius * 0.6)))
    coords = np.argwhere(core if core.any() else zone)
    cy, cx = coords[rng.integers(len(coords))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    blob = np.zeros((size, size), np.float32)
    for _ in range(3):
        oy, ox = rng.normal(0, 0.35 * radius, 2)
        ry, rx = radius * rng.uniform(0.6, 1.0, 2)
        blob = np.maximum(blob, (((yy - cy - oy) / ry) ** 2 + ((xx - cx - ox) / rx) ** 2 <= 1).astype(np.float32))
    profile = ndimage.gaussian_filter(blob, sigma=radius / 4)
    profile *= ndimage.gaussian_filter(lung.astype(np.float32), sigma=1.0)
    profile /= max(float(profile.max()), 1e-6)
    mottle = ndimage.gaussian_filter(rng.normal(0, 1, image.shape), sigma=1.5).astype(np.float32)
    texture = 1.0 + 0.5 * mottle / (np.abs(mottle).max() + 1e-6)
    image = np.clip(image + strength * profile * texture, 0, 1)
    return image, (profile >= 0.5) & lung


def _second_zone(side: str, zone: str, rng: np.random.Generator) -> tuple[str, str]:
    """Half the time the mirror zone in the other lung (only the side word tells them apart), otherwise another
    zone of the same lung (only the zone word does)."""
    if rng.uniform() < 0.5:
        return ("right" if side == "left" else "left"), zone
    return side, str(rng.choice([z for z in ZONES if z != zone]))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _film(size: int, cells: list[tuple[str, str]], strengths: list[float],
          rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    image, lungs = radiograph(size, rng)
    masks = []
    for (side, zone), strength in zip(cells, strengths):
        image, mask = _lesion(image, lungs[side], lung_zone_mask(lungs[side], zone), rng, strength)
        masks.append(mask)
    labels = np.zeros((size, size), np.uint8)
    for side, value in LUNG_LABELS.items():
        labels[lungs[side]] = value
    return image, masks, labels


def write_iu(out_dir: Path, n: int = DEFAULT_N, seed: int = 0, size: int = DEFAULT_SIZE) -> Path:
    """Write ``n`` patients in the IU X-ray layout under ``out_dir`` and return ``out_dir``."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    reports, projections, truth = [], [], []
    for uid in range(1, n + 1):
        side, zone = str(rng.choice(SIDES)), str(rng.choice(ZONES))
        cells = [(side, zone), _second_zone(side, zone, rng)]
        finding = str(rng.choice(_FINDINGS))
        normal = list(rng.choice(_NORMAL_SENTENCES, size=int(rng.integers(1, 4)), replace=False))
        normal.insert(int(rng.integers(len(normal) + 1)), lesion_sentence(side, zone, finding, rng))
        findings = None if rng.uniform() < MISSING_FINDINGS_FRACTION else " ".join(normal)
        reports.append({"uid": uid, "MeSH": f"Opacity/lung/{zone}/{side}", "Problems": "Opacity",
                        "image": "Xray Chest PA and Lateral", "indication": str(rng.choice(_INDICATIONS)),
                        "comparison": "None.", "findings": findings,
                        "impression": impression_text(side, zone, finding)})
        strengths = list(rng.uniform(0.22, 0.32, 2))
        for film in range(2 if rng.uniform() < SECOND_FILM_FRACTION else 1):
            filename = f"{uid}_IM-{uid:04d}-{film + 1}001.dcm.png"
            image, masks, labels = _film(size, cells, strengths, rng)
            atomic_write_bytes(out_dir / "images" / "images_normalized" / filename,
                               _png((image * 255).round().astype(np.uint8)))
            atomic_write_bytes(out_dir / "masked" / filename, _png(masks[0].astype(np.uint8) * 255))
            atomic_write_bytes(out_dir / "lungs" / filename, _png(labels))
            projections.append({"uid": uid, "filename": filename, "projection": "Frontal"})
            truth.append({"filename": filename, "uid": uid, "side": side, "zone": zone, "finding": finding,
                          "second_side": cells[1][0], "second_zone": cells[1][1]})
    for name, rows in (("indiana_reports.csv", reports), ("indiana_projections.csv", projections),
                       ("phantom_truth.csv", truth)):
        atomic_write_text(out_dir / name, pd.DataFrame(rows).to_csv(index=False))
    return out_dir


__all__ = ["DEFAULT_N", "DEFAULT_SIZE", "LUNG_LABELS", "write_iu", "lesion_sentence", "impression_text"]
