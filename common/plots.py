"""Figures for run directories: loss curves, ROC, confusion matrix, image galleries and overlays.

Figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``: no GUI backend, no global figure
registry to leak into, and safe in headless jobs and tests. Files are written atomically; each function returns
the path it wrote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from common.rundir import atomic_save_figure

_LOSS_WORD = "loss"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    atomic_save_figure(fig, path)
    fig.clear()
    return path


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def loss_curves(history: list[dict], path: str | Path) -> Path:
    """Plot ``train_loss`` and every numeric ``val_*`` key against epoch (records as in ``metrics.jsonl``).

    Loss keys share the left panel; other validation metrics go on the right one. Records without ``epoch`` are
    numbered in order.
    """
    xs = [record.get("epoch", i + 1) for i, record in enumerate(history)]
    keys = list(dict.fromkeys(k for record in history for k, v in record.items()
                              if (k == "train_loss" or k.startswith("val_")) and _is_number(v)))
    loss_keys = [k for k in keys if _LOSS_WORD in k]
    metric_keys = [k for k in keys if _LOSS_WORD not in k]
    fig = Figure(figsize=(10 if metric_keys else 5.5, 4))
    panels = [(loss_keys, "loss")] + ([(metric_keys, "validation metric")] if metric_keys else [])
    for i, (panel_keys, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in panel_keys:
            pts = [(x, r[key]) for x, r in zip(xs, history) if _is_number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if panel_keys:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def roc_curve(y_true, y_score, path: str | Path) -> Path:
    """ROC curve with the AUROC in the legend; a one-class ``y_true`` gives the chance line and says so."""
    y_true = np.asarray(y_true).astype(int)
    y_score = np.asarray(y_score, dtype=float)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if np.unique(y_true).size == 2:
        fpr, tpr, _ = skm.roc_curve(y_true, y_score)
        ax.plot(fpr, tpr, linewidth=2, label=f"AUROC = {skm.roc_auc_score(y_true, y_score):.3f}")
    else:
        ax.set_title("AUROC undefined: one class in y_true")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(y_true, y_pred, labels: Sequence[str], path: str | Path) -> Path:
    """Confusion matrix with counts annotated; rows are the truth.

    ``y_true``/``y_pred`` may hold class indices ``0..K-1`` or the label strings themselves.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    values = list(labels) if y_true.dtype.kind in "USO" else list(range(len(labels)))
    cm = skm.confusion_matrix(y_true, y_pred, labels=values)
    size = max(3.5, 0.6 * len(labels) + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    skm.ConfusionMatrixDisplay(cm, display_labels=list(labels)).plot(ax=ax, cmap="Blues", values_format="d",
                                                                     colorbar=True)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return _save(fig, path)


def _show(ax, image: np.ndarray, cmap: str = "gray") -> None:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        vmax = 255 if image.dtype == np.uint8 else 1
        ax.imshow(image, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(image if image.dtype == np.uint8 else np.clip(image, 0, 1), interpolation="nearest")
    ax.set_axis_off()


def image_gallery(images: Sequence[np.ndarray], titles: Sequence[str], path: str | Path, ncols: int = 5,
                  cmap: str = "gray") -> Path:
    """A grid of images with titles; (H, W) images use ``cmap`` on [0, 1] floats or uint8."""
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    ncols = max(1, min(ncols, len(images)))
    nrows = max(1, math.ceil(len(images) / ncols))
    fig = Figure(figsize=(2.2 * ncols, 2.4 * nrows))
    for i, (image, title) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        _show(ax, image, cmap)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def overlay_panels(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[Sequence[str]], path: str | Path) -> Path:
    """A grid with one row per case (e.g. image | truth overlay | prediction overlay | saliency).

    Each element is an (H, W) gray or (H, W, 3) RGB image, float in [0, 1]; rows may differ in length.
    """
    if len(rows) != len(titles) or any(len(r) != len(t) for r, t in zip(rows, titles)):
        raise ValueError("titles must have the same nested shape as rows")
    nrows = max(1, len(rows))
    ncols = max([len(r) for r in rows] + [1])
    fig = Figure(figsize=(2.6 * ncols, 2.7 * nrows))
    for i, (row, row_titles) in enumerate(zip(rows, titles)):
        for j, (image, title) in enumerate(zip(row, row_titles)):
            ax = fig.add_subplot(nrows, ncols, i * ncols + j + 1)
            _show(ax, image)
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    return np.clip(image, 0.0, 1.0)


def mask_overlay(image: np.ndarray, mask: np.ndarray, color: Sequence[float] = (1, 0, 0),
                 alpha: float = 0.4) -> np.ndarray:
    """Blend ``color`` into ``image`` where ``mask`` is true; returns float32 RGB (H, W, 3) in [0, 1].

    Masked pixels become ``(1 - alpha) * image + alpha * color``; the rest keep the image.
    """
    rgb = _to_rgb(image)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    out = rgb.copy()
    out[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(color, dtype=np.float32)
    return out


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a saliency map, min-max scaled to [0, 1] and coloured by ``cmap``, over ``image``; float32 RGB.

    A constant map scales to zeros (the colormap's low end everywhere).
    """
    rgb = _to_rgb(image)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heat map shape {heat.shape} does not match image shape {rgb.shape[:2]}")
    span = float(heat.max() - heat.min()) if heat.size else 0.0
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colored = matplotlib.colormaps[cmap](scaled)[..., :3].astype(np.float32)
    return ((1 - alpha) * rgb + alpha * colored).astype(np.float32)
