"""BraTS-Path phantom: H&E-like RGB tiles, one texture per class, and noisy captions that complement the images.

    python -m common.phantoms histology --out data/histology_phantom --n 80 --schema 2025

Layout written (as BraTS-Path, plus the phantom's extras)::

    <CLS>/BraTSPath_<CLS>_<7 digits>.jpg   RGB tiles, a folder per class code of the schema
    labels.csv                              Input Path, Ground-Truth (the seed's Balanced_classes.csv columns)
    captions.jsonl                          {"image": file name, "caption": text}, one line per tile
    val/BraTSPath_Val_<7 digits>.jpg        unlabeled tiles for a submission (their classes in phantom_truth.csv)
    phantom_truth.csv                       per tile: class, look-alike group, caption correct or not

Textures on an eosin-pink background with haematoxylin-purple nuclei: cellular tumour (dense pleomorphic nuclei),
pseudopalisading necrosis (nuclei lined up around a pale centre), microvascular proliferation (vessel rings),
geographic necrosis (pale amorphous debris), infiltration into cortex (large neurons among scattered nuclei), white
matter (parallel pale fibres), leptomeningeal infiltration (a tissue edge with a cell band), dense macrophages
(foamy pale cells), lymphocytes (small dark round cells), and, in 2026, "none of the above" (normal-looking
neuropil).

Image and caption are built to complement each other, as the seed claims they do on the real data. Classes come in
look-alike pairs (cellular tumour / lymphocytes, geographic necrosis / macrophages, cortex / white matter): the
image shows the pair clearly but separates its two members only by a subtle, overlapping cue, while the caption
describes the member in its own words. Captions are wrong (describe another class) for ``WRONG_CAPTION`` of the
tiles, whatever the image shows. So the image alone confuses pairs, the caption alone is wrong a quarter of the time,
and only their combination resolves both.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from common.rundir import atomic_write_bytes, atomic_write_text

DEFAULT_N = 80
"""Tiles per class written by default; the validation folder gets half a class's worth of tiles in all."""
DEFAULT_SIZE = 128
"""Side of the written JPGs (BraTS-Path patches are 384 px; the encoder's transform resizes)."""
WRONG_CAPTION = 0.25
SCHEMA_CLASSES = {"2024": ("WM", "CT", "PN", "NC", "MP", "IC"),
                  "2025": ("CT", "PN", "MP", "NC", "IC", "WM", "LI", "DM", "PL"),
                  "2026": ("CT", "DM", "IC", "LI", "MP", "NC", "PL", "PN", "WM", "NOTA")}
"""Class codes of each challenge year, as the data format knows them (a pipeline's schema may hold the same)."""

PAIRS = (("CT", "PL"), ("NC", "DM"), ("IC", "WM"))
PHRASES = {
    "CT": ("sheets of crowded pleomorphic atypical cells", "densely packed hyperchromatic atypical nuclei"),
    "PL": ("clusters of small round lymphoid cells", "many small uniform round cells with scant cytoplasm"),
    "PN": ("cells lined up in a garland around a pale central zone", "a palisade of nuclei rimming a pale area"),
    "MP": ("thick-walled glomeruloid vessels with multilayered lining", "tufts of proliferating vessel walls"),
    "NC": ("pale structureless eosinophilic material with nuclear dust", "an acellular pale amorphous field"),
    "DM": ("sheets of large cells with foamy bubbly cytoplasm", "numerous vacuolated foamy histiocytes"),
    "IC": ("large neurons with scattered atypical cells in grey matter", "neuronal cell bodies among infiltrating "
           "cells"),
    "WM": ("parallel pale fibres with interspersed atypical cells", "aligned myelinated tracts with scattered "
           "cells"),
    "LI": ("a band of atypical cells along the tissue surface", "cells spreading along the outer surface layer"),
    "NOTA": ("unremarkable neuropil without distinctive features", "bland glial background without a pattern"),
}
_FILLER = ("The stain is haematoxylin and eosin.", "The tissue is well preserved.", "Sectioning is even.",
           "Some artefactual folding is present.", "The background is evenly stained.")

_EOSIN = np.array([0.93, 0.72, 0.84], dtype=np.float32)
_PALE = np.array([0.97, 0.87, 0.92], dtype=np.float32)
_HAEM = np.array([0.32, 0.18, 0.52], dtype=np.float32)


def _blobs(size: int, centres: np.ndarray, radii: np.ndarray, elongation: np.ndarray | None = None) -> np.ndarray:
    """Soft discs (or ellipses) at ``centres`` (N, 2) in pixels: a (size, size) map in [0, 1]."""
    out = np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii)):
        e = 1.0 if elongation is None else elongation[k]
        lo_y, hi_y = int(max(0, cy - 3 * r * e)), int(min(size, cy + 3 * r * e + 1))
        lo_x, hi_x = int(max(0, cx - 3 * r)), int(min(size, cx + 3 * r + 1))
        if lo_y >= hi_y or lo_x >= hi_x:
            continue
        d = ((yy[lo_y:hi_y, lo_x:hi_x] - cy) / e) ** 2 + (xx[lo_y:hi_y, lo_x:hi_x] - cx) ** 2
        out[lo_y:hi_y, lo_x:hi_x] = np.maximum(out[lo_y:hi_y, lo_x:hi_x], np.exp(-d / (2 * (r / 1.6) ** 2)))
    return out


def _random_centres(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, size, (count, 2))


def _nuclei(size: int, count: int, radius: tuple[float, float], rng: np.random.Generator,
            irregular: float = 0.0) -> np.ndarray:
    centres = _random_centres(size, count, rng)
    radii = rng.uniform(*radius, count) * size / 128
    elongation = 1 + irregular * rng.random(count)
    return _blobs(size, centres, radii, elongation)


def _compose(size: int, background: np.ndarray, nuclei: np.ndarray, rng: np.random.Generator,
             pale: np.ndarray | None = None) -> np.ndarray:
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 40).astype(np.float32)
    base = background[None, None, :] + 0.03 * texture[..., None]
    if pale is not None:
        base = base * (1 - pale[..., None]) + _PALE[None, None, :] * pale[..., None]
    image = base * (1 - nuclei[..., None]) + _HAEM[None, None, :] * nuclei[..., None]
    # Stain variation between slides: a random tint and intensity per tile.
    image = image * rng.uniform(0.92, 1.05, 3)[None, None, :]
    return np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)


def tile(code: str, size: int, rng: np.random.Generator, subtle: float) -> np.ndarray:
    """One (size, size, 3) tile of class ``code``; ``subtle`` in [0, 1] sets the cue that separates look-alikes."""
    s = size / 128
    if code in ("CT", "PL"):
        # One look: many dark nuclei. Cellular tumour's are a little larger and more irregular (overlapping ranges).
        big = subtle if code == "CT" else 1 - subtle
        nuclei = _nuclei(size, int(150 * s * s), (2.0 + 1.0 * big, 2.8 + 1.0 * big), rng, irregular=0.6 * big)
        return _compose(size, _EOSIN, nuclei, rng)
    if code in ("NC", "DM"):
        # One look: a pale field. Macrophages add faint round vacuolated cells; necrosis, faint debris.
        pale = np.clip(ndimage.gaussian_filter(rng.random((size, size)), size / 16) * 3 - 0.6, 0.4, 1)
        share = subtle if code == "DM" else 1 - subtle
        cells = _blobs(size, _random_centres(size, int(40 * s * s), rng), rng.uniform(5, 7, int(40 * s * s)) * s)
        debris = _nuclei(size, int(60 * s * s), (0.6, 1.1), rng)
        nuclei = 0.25 * share * cells + 0.5 * (1 - share) * debris + 0.35 * _nuclei(size, int(15 * s * s), (1.5, 2),
                                                                                       rng)
        return _compose(size, _EOSIN, np.clip(nuclei, 0, 1), rng, pale=pale * 0.85)
    if code in ("IC", "WM"):
        # One look: sparse nuclei on a fibrillar background. Cortex adds faint large neurons, white matter faint
        # parallel fibres.
        share = subtle if code == "IC" else 1 - subtle
        nuclei = _nuclei(size, int(35 * s * s), (1.8, 2.6), rng)
        neurons = _nuclei(size, int(6 * s * s), (4.5, 6.0), rng, irregular=0.8)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        fibres = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / (6 * s))
        pale = 0.35 * (1 - share) * fibres + 0.15
        return _compose(size, _EOSIN, np.clip(nuclei + 0.45 * share * neurons, 0, 1), rng, pale=pale)
    if code == "PN":
        centre = rng.uniform(0.35, 0.65, 2) * size
        radius = rng.uniform(0.22, 0.3) * size
        angles = rng.uniform(0, 2 * np.pi, int(70 * s))
        ring = np.stack([centre[0] + radius * np.sin(angles), centre[1] + radius * np.cos(angles)], 1)
        ring += rng.normal(0, 2 * s, ring.shape)
        nuclei = np.maximum(_blobs(size, ring, np.full(len(ring), 2.4 * s)), _nuclei(size, int(30 * s * s),
                                                                                    (2, 2.6), rng))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        pale = (np.hypot(yy - centre[0], xx - centre[1]) < radius * 0.8).astype(np.float32) * 0.9
        return _compose(size, _EOSIN, nuclei, rng, pale=ndimage.gaussian_filter(pale, 2 * s))
    if code == "MP":
        rings = np.zeros((size, size), np.float32)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        for _ in range(int(rng.integers(3, 6))):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(7, 13) * s
            d = np.hypot(yy - cy, xx - cx)
            rings = np.maximum(rings, np.exp(-((d - r) / (1.8 * s)) ** 2))
        nuclei = np.maximum(0.75 * rings, _nuclei(size, int(40 * s * s), (2, 2.6), rng))
        return _compose(size, np.array([0.9, 0.6, 0.75], np.float32), nuclei, rng)
    if code == "LI":
        yy = np.mgrid[0:size, 0:size][0].astype(np.float32)
        edge = rng.uniform(0.25, 0.4) * size
        outside = (yy < edge).astype(np.float32)
        band = np.exp(-((yy - edge - 6 * s) / (5 * s)) ** 2)
        nuclei = np.clip(band * _nuclei(size, int(250 * s * s), (2, 2.8), rng) * 1.5 + _nuclei(
            size, int(25 * s * s), (2, 2.6), rng), 0, 1) * (1 - outside)
        image = _compose(size, _EOSIN, nuclei, rng)
        return image * (1 - outside[..., None]) + 0.97 * outside[..., None]
    if code == "NOTA":
        return _compose(size, _EOSIN, _nuclei(size, int(20 * s * s), (1.8, 2.4), rng), rng, pale=np.full(
            (size, size), 0.3, np.float32))
    raise ValueError(f"no texture for class {code!r}")


def caption(code: str, classes: tuple[str, ...], rng: np.random.Generator) -> tuple[str, bool]:
    """A caption describing ``code`` in its own words, or (with probability ``WRONG_CAPTION``) another class."""
    correct = rng.random() >= WRONG_CAPTION
    described = code if correct else str(rng.choice([c for c in classes if c != code]))
    phrase = PHRASES[described][int(rng.integers(len(PHRASES[described])))]
    opening = ("The patch shows", "There are", "Visible are", "The field contains")[int(rng.integers(4))]
    filler = _FILLER[int(rng.integers(len(_FILLER)))]
    return f"{opening} {phrase}. {filler}", correct


def _jpg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8), mode="RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _partner(code: str) -> str | None:
    for a, b in PAIRS:
        if code in (a, b):
            return b if code == a else a
    return None


def write_histology(out_dir: Path, n: int = DEFAULT_N, seed: int = 0, size: int = DEFAULT_SIZE,
                    schema: str = "2025") -> Path:
    """Write the phantom into ``out_dir``; returns ``labels.csv``."""
    classes = SCHEMA_CLASSES[str(schema)]
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows, captions, truth = [], [], []
    number = 0
    for code in classes:
        for _ in range(n):
            number += 1
            name = f"BraTSPath_{code}_{number:07d}.jpg"
            subtle = float(np.clip(rng.normal(0.7, 0.25), 0, 1)) if _partner(code) else 1.0
            atomic_write_bytes(out_dir / code / name, _jpg(tile(code, size, rng, subtle)))
            text, correct = caption(code, classes, rng)
            rows.append({"Input Path": f"{code}/{name}", "Ground-Truth": code})
            captions.append(json.dumps({"image": name, "caption": text}))
            truth.append({"image": name, "class": code, "pair": "/".join(sorted({code, _partner(code) or code})),
                          "subtle_cue": round(subtle, 3), "caption_correct": correct})
    for k in range(max(len(classes), n * len(classes) // 16)):
        code = classes[k % len(classes)]
        name = f"BraTSPath_Val_{k + 1:07d}.jpg"
        subtle = float(np.clip(rng.normal(0.7, 0.25), 0, 1)) if _partner(code) else 1.0
        atomic_write_bytes(out_dir / "val" / name, _jpg(tile(code, size, rng, subtle)))
        text, correct = caption(code, classes, rng)
        captions.append(json.dumps({"image": name, "caption": text}))
        truth.append({"image": name, "class": code, "pair": "", "subtle_cue": round(subtle, 3),
                      "caption_correct": correct})
    atomic_write_text(out_dir / "captions.jsonl", "\n".join(captions) + "\n")
    atomic_write_text(out_dir / "phantom_truth.csv", pd.DataFrame(truth).to_csv(index=False))
    return atomic_write_text(out_dir / "labels.csv", pd.DataFrame(rows).to_csv(index=False))


__all__ = ["write_histology", "SCHEMA_CLASSES", "tile", "caption", "PAIRS", "PHRASES", "WRONG_CAPTION", "DEFAULT_N",
           "DEFAULT_SIZE"]
