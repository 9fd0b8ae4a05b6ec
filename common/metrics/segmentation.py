"""Binary segmentation metrics per image (Dice, IoU, pixel accuracy) and their batch means.

Per-image values are what a bootstrap interval resamples, so they come first; the batch dict is their mean.
Both-empty masks count as a perfect match (Dice = IoU = 1), the usual convention for images without a lesion.
"""

from __future__ import annotations

import numpy as np

SEGMENTATION_KEYS = ("dice", "iou", "pixel_acc")


def _binary(masks: np.ndarray, threshold: float) -> np.ndarray:
    masks = np.asarray(masks)
    return masks.astype(bool) if masks.dtype == bool else masks >= threshold


def _as_batch(pred: np.ndarray, target: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _binary(pred, threshold), _binary(target, 0.5)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    return pred.reshape(len(pred), -1), target.reshape(len(target), -1)


def per_image_metrics(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Dice, IoU and pixel accuracy of each image.

    Args:
        pred: (N, H, W) or (H, W) probabilities (thresholded at ``threshold``) or booleans.
        target: the same shape, binary.
        threshold: probability at which a pixel counts as foreground.

    Returns:
        ``{"dice": (N,), "iou": (N,), "pixel_acc": (N,)}`` float64 arrays.
    """
    p, t = _as_batch(pred, target, threshold)
    inter = np.logical_and(p, t).sum(1).astype(np.float64)
    p_sum, t_sum = p.sum(1).astype(np.float64), t.sum(1).astype(np.float64)
    union = p_sum + t_sum - inter
    empty = (p_sum + t_sum) == 0
    dice_v = np.where(empty, 1.0, 2 * inter / np.maximum(p_sum + t_sum, 1))
    iou_v = np.where(empty, 1.0, inter / np.maximum(union, 1))
    acc_v = (p == t).mean(1)
    return {"dice": dice_v, "iou": iou_v, "pixel_acc": acc_v}


def dice(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Dice coefficient 2|P∩T| / (|P| + |T|) of each image."""
    return per_image_metrics(pred, target, threshold)["dice"]


def iou(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Intersection over union |P∩T| / |P∪T| of each image."""
    return per_image_metrics(pred, target, threshold)["iou"]


def pixel_acc(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Fraction of pixels whose class is right, per image (high even for an empty prediction of a small lesion)."""
    return per_image_metrics(pred, target, threshold)["pixel_acc"]


def segmentation_metrics(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Mean over images of each per-image metric: ``{"dice", "iou", "pixel_acc"}``."""
    return {k: float(v.mean()) for k, v in per_image_metrics(pred, target, threshold).items()}


__all__ = ["SEGMENTATION_KEYS", "per_image_metrics", "dice", "iou", "pixel_acc", "segmentation_metrics"]
