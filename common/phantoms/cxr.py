"""Chest-radiograph phantoms: a radiograph-like background and pneumonia-like opacities.

Conventions follow radiology: the patient's left lung is on the image's right. Everything is seeded through a
``numpy.random.Generator`` so a phantom is reproducible from its seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from common.rundir import atomic_write_bytes

ZONES = ("upper", "middle", "lower")
MEDMNIST_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def radiograph(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A frontal chest radiograph look-alike in [0, 1] and the boolean masks of the two lungs.

    Lungs are dark (air), the mediastinum and heart bright, ribs faint bright bands across the lungs,
    with per-image jitter of position, size and contrast plus film-like noise.
    """
    jitter = lambda scale: rng.normal(0.0, scale)  # noqa: E731
    body = _ellipse(size, 0.55 + jitter(0.01), 0.5, 0.52, 0.46 + jitter(0.02))
    image = np.where(body, 0.62, 0.08).astype(np.float32)
    lungs = {}
    for side, cx in (("right", 0.31), ("left", 0.69)):  # patient's right lung is on the image's left
        lung = _ellipse(size, 0.47 + jitter(0.015), cx + jitter(0.012), 0.28 + jitter(0.015), 0.15 + jitter(0.01),
                        angle=(0.12 if side == "right" else -0.12) + jitter(0.03))
        lungs[side] = lung
    lung_any = lungs["left"] | lungs["right"]
    image[lung_any] = 0.24 + jitter(0.02)
    heart = _ellipse(size, 0.64 + jitter(0.01), 0.56 + jitter(0.01), 0.14 + jitter(0.01), 0.13 + jitter(0.01))
    image[heart] = 0.7 + jitter(0.02)
    yy = np.mgrid[0:size, 0:size][0].astype(np.float32) / size
    ribs = 0.06 * (np.sin(2 * np.pi * (yy * (7.5 + jitter(0.3)) + rng.uniform())) > 0.55)
    image += np.where(lung_any & ~heart, ribs, 0.0).astype(np.float32)
    image = ndimage.gaussian_filter(image, sigma=size / 110)
    image += rng.normal(0, 0.025, image.shape).astype(np.float32)
    lungs = {side: mask & ~heart for side, mask in lungs.items()}
    return np.clip(image, 0, 1).astype(np.float32), lungs


def lung_zone_mask(lung_mask: np.ndarray, zone: str) -> np.ndarray:
    """The upper, middle or lower third of a lung mask, split by the lung's own vertical extent."""
    if zone not in ZONES:
        raise ValueError(f"zone must be one of {ZONES}, not {zone!r}")
    rows = np.flatnonzero(lung_mask.any(axis=1))
    top, bottom = rows.min(), rows.max() + 1
    edges = np.linspace(top, bottom, 4).round().astype(int)
    index = ZONES.index(zone)
    band = np.zeros_like(lung_mask)
    band[edges[index] : edges[index + 1]] = True
    return lung_mask & band


def add_opacity(image: np.ndarray, region: np.ndarray, rng: np.random.Generator, strength: float = 0.22,
                blobs: int = 4) -> np.ndarray:
    """Pneumonia-like patchy consolidation: blurred bright blobs with mottled texture inside ``region``."""
    size = image.shape[0]
    coords = np.argwhere(region)
    if len(coords) == 0:
        return image
    opacity = np.zeros_like(image)
    for _ in range(blobs):
        cy, cx = coords[rng.integers(len(coords))] / size
        radius = rng.uniform(0.05, 0.1)
        opacity += _ellipse(size, cy, cx, radius, radius * rng.uniform(0.7, 1.3), rng.uniform(0, np.pi))
    mottle = ndimage.gaussian_filter(rng.normal(0, 1, image.shape), sigma=max(0.6, size / 60))
    opacity = ndimage.gaussian_filter(np.clip(opacity, 0, 1) * region, sigma=size / 45)
    opacity *= 1.0 + 0.35 * mottle / (np.abs(mottle).max() + 1e-6)
    return np.clip(image + strength * opacity.astype(np.float32), 0, 1)


def pneumonia_image(size: int, label: int, rng: np.random.Generator) -> np.ndarray:
    """One radiograph; label 1 adds opacities in one or both lungs (the learnable difference)."""
    image, lungs = radiograph(size, rng)
    if label == 1:
        sides = [s for s in ("left", "right") if rng.uniform() < 0.7] or [str(rng.choice(["left", "right"]))]
        for side in sides:
            image = add_opacity(image, lungs[side], rng, strength=rng.uniform(0.16, 0.3))
    return image


def write_medmnist(out_dir: Path, n: int = 600, seed: int = 0, size: int = 28,
                   positive_fraction: float = 0.6) -> Path:
    """Write a PneumoniaMNIST-format ``.npz`` (keys ``{split}_images`` uint8 (N,H,W), ``{split}_labels`` (N,1)).

    The file is named as medmnist names it (``pneumoniamnist.npz`` at 28 px, ``pneumoniamnist_64.npz`` ...).
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, fraction in MEDMNIST_SPLITS.items():
        count = max(4, int(round(n * fraction)))
        labels = (rng.uniform(size=count) < positive_fraction).astype(np.uint8)
        labels[:2] = (0, 1)
        images = np.stack([pneumonia_image(size, int(y), rng) for y in labels])
        arrays[f"{split}_images"] = (images * 255).round().astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    name = "pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz"
    path = Path(out_dir) / name
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return path
