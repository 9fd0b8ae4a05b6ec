"""Classification metrics (binary, multi-class, multi-label) over sklearn, as flat dicts with stable keys.

Undefined values (AUROC when ``y_true`` holds one class) are ``nan`` rather than an exception or a warning, so a
bootstrap resample or a small phantom split never stops an evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

_BEST_THRESHOLD_METRICS = ("youden", "f1", "acc")


def _quiet(fn, *args, **kwargs) -> float:
    """Call an sklearn metric with its ill-defined-value warnings silenced (we report those values as 0 or nan)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(*args, **kwargs))


def _binary_auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """sklearn's ``roc_auc_score`` for binary labels, computed as the Mann-Whitney U with average ranks for ties.

    Bootstrap intervals call it thousands of times; sklearn's input checks cost ~10x the arithmetic. The test
    suite compares it with sklearn on tied and untied scores.
    """
    y_true = np.asarray(y_true)
    n_pos = int(np.count_nonzero(y_true == 1))
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(y_score)
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """sklearn's ``average_precision_score``: sum over distinct thresholds of (R_n - R_n-1) * P_n."""
    y_true = np.asarray(y_true)
    if not (y_true == 1).any():
        return float("nan")
    order = np.argsort(-np.asarray(y_score, dtype=float), kind="mergesort")
    scores, hits = np.asarray(y_score, dtype=float)[order], (y_true[order] == 1).astype(float)
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(hits)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _check_binary(y_true: np.ndarray, y_score: np.ndarray) -> None:
    if y_true.ndim != 1 or y_true.shape != y_score.shape:
        raise ValueError(f"y_true and y_score must be 1-D of equal length, got {y_true.shape} and {y_score.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"binary y_true must hold only 0 and 1, got values {np.unique(y_true)[:10].tolist()}")


def binary_metrics(y_true, y_score, threshold: float = 0.5) -> dict[str, float]:
    """Threshold-based and ranking metrics of a binary classifier.

    Args:
        y_true: 0/1 labels, shape (N,).
        y_score: score or probability of class 1, shape (N,); a sample is called positive when ``score >= threshold``.
        threshold: the decision threshold (choose it on validation data with :func:`best_threshold`).

    Returns:
        ``acc, precision, recall, specificity, f1, auroc, auprc, mcc, balanced_acc, threshold``. Precision, recall
        and specificity are 0 when their denominator is empty; ``auroc``/``auprc`` are nan when ``y_true`` has one
        class.
    """
    y_true = np.asarray(y_true).astype(int)
    y_score = np.asarray(y_score, dtype=float)
    _check_binary(y_true, y_score)
    y_pred = (y_score >= threshold).astype(int)
    # One confusion matrix gives every threshold metric: bootstrap intervals call this thousands of times, and
    # sklearn's per-metric input checks would cost ~10x more. The test suite checks each key against sklearn.
    tn, fp, fn, tp = np.bincount(2 * y_true + y_pred, minlength=4).astype(float)
    precision, recall, specificity = _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    mcc_denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    present_recalls = [r for r, n in ((recall, tp + fn), (specificity, tn + fp)) if n > 0]
    single_class = len(present_recalls) < 2
    return {
        "acc": float((tp + tn) / y_true.size) if y_true.size else float("nan"),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auroc": float("nan") if single_class else _binary_auroc(y_true, y_score),
        "auprc": float("nan") if single_class else _average_precision(y_true, y_score),
        "mcc": _ratio(tp * tn - fp * fn, mcc_denominator),
        "balanced_acc": float(np.mean(present_recalls)) if present_recalls else float("nan"),
        "threshold": float(threshold),
    }


def _ratio(numerator: float, denominator: float) -> float:
    """sklearn's ``zero_division=0`` convention: an empty denominator gives 0."""
    return float(numerator / denominator) if denominator else 0.0


def _safe_key(name: str) -> str:
    return str(name).strip().replace(" ", "_")


def multiclass_metrics(y_true, proba, labels: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics of a single-label classifier over K classes.

    Args:
        y_true: class indices in ``0..K-1``, shape (N,).
        proba: class probabilities (or any per-class scores for AUROC), shape (N, K); the prediction is the argmax.
        labels: optional names of the K classes; adds per-class ``f1_<name>``, ``recall_<name>``, ``auroc_<name>``.

    Returns:
        ``acc, balanced_acc, precision_macro, recall_macro, f1_macro, f1_micro, f1_weighted, specificity_macro,
        mcc, auroc_macro``. ``auroc_macro`` is the mean one-vs-rest AUROC over the classes present in ``y_true``
        (equal to sklearn's ``multi_class="ovr"`` when all are present; nan when none is defined).
    """
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2 or y_true.shape != (proba.shape[0],):
        raise ValueError(f"expected y_true (N,) and proba (N, K), got {y_true.shape} and {proba.shape}")
    n_classes = proba.shape[1]
    if labels is not None and len(labels) != n_classes:
        raise ValueError(f"{len(labels)} label names for {n_classes} probability columns")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"y_true holds class indices outside 0..{n_classes - 1}")
    classes = list(range(n_classes))
    y_pred = proba.argmax(axis=1)
    cm = skm.multilabel_confusion_matrix(y_true, y_pred, labels=classes)
    tn, fp = cm[:, 0, 0], cm[:, 0, 1]
    specificity = np.divide(tn, tn + fp, out=np.zeros(n_classes), where=(tn + fp) > 0)
    per_class_auroc = np.array([_binary_auroc((y_true == k).astype(int), proba[:, k]) for k in classes])
    out = {
        "acc": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_acc": _quiet(skm.balanced_accuracy_score, y_true, y_pred),
        "precision_macro": _quiet(skm.precision_score, y_true, y_pred, labels=classes, average="macro",
                                  zero_division=0),
        "recall_macro": _quiet(skm.recall_score, y_true, y_pred, labels=classes, average="macro", zero_division=0),
        "f1_macro": _quiet(skm.f1_score, y_true, y_pred, labels=classes, average="macro", zero_division=0),
        "f1_micro": _quiet(skm.f1_score, y_true, y_pred, labels=classes, average="micro", zero_division=0),
        "f1_weighted": _quiet(skm.f1_score, y_true, y_pred, labels=classes, average="weighted", zero_division=0),
        "specificity_macro": float(specificity.mean()),
        "mcc": _quiet(skm.matthews_corrcoef, y_true, y_pred),
        "auroc_macro": _nanmean(per_class_auroc),
    }
    if labels is not None:
        f1 = skm.f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
        recall = skm.recall_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
        for k, name in enumerate(labels):
            key = _safe_key(name)
            out[f"f1_{key}"] = float(f1[k])
            out[f"recall_{key}"] = float(recall[k])
            out[f"auroc_{key}"] = float(per_class_auroc[k])
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def multilabel_metrics(y_true, proba, thresholds: float | Sequence[float] = 0.5,
                       label_names: Sequence[str] | None = None, mask=None) -> dict[str, float]:
    """Metrics of a multi-label classifier (each of L labels is its own yes/no decision, e.g. CheXpert findings).

    Args:
        y_true: 0/1 matrix, shape (N, L).
        proba: per-label probabilities, shape (N, L); label j is called present when ``proba[:, j] >= thresholds[j]``.
        thresholds: one threshold for all labels or one per label.
        label_names: optional names of the L labels; adds per-label ``auroc_<name>`` and ``f1_<name>``.
        mask: optional boolean (N, L) of observed cells (CheXpert's uncertain labels under an ``ignore`` policy);
            unobserved cells count nowhere: per-label metrics use that label's observed rows, micro averages and
            the Hamming loss the observed cells, ``acc_subset`` the rows observed in full.

    Returns:
        ``f1_macro, f1_micro, precision_macro, precision_micro, recall_macro, recall_micro, auroc_macro,
        auroc_micro, hamming_loss, acc_subset``. ``auroc_macro`` averages the labels whose column holds both classes
        (a validation set without a single positive for a rare finding is common); nan when none does.
    """
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2 or y_true.shape != proba.shape:
        raise ValueError(f"expected y_true and proba of equal shape (N, L), got {y_true.shape} and {proba.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("multi-label y_true must hold only 0 and 1 (map uncertain labels before scoring)")
    mask = np.ones(y_true.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != y_true.shape:
        raise ValueError(f"mask shape {mask.shape} differs from y_true shape {y_true.shape}")
    n_labels = proba.shape[1]
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (n_labels,))
    if label_names is not None and len(label_names) != n_labels:
        raise ValueError(f"{len(label_names)} label names for {n_labels} columns")
    y_pred = (proba >= thr).astype(int)
    per_label_auroc = np.array([_binary_auroc(y_true[mask[:, j], j], proba[mask[:, j], j]) for j in range(n_labels)])
    # Per-label confusion counts over observed cells (numpy, not sklearn: bootstrap intervals call this thousands
    # of times); zero denominators give 0 as sklearn's zero_division=0. Tests compare every key with sklearn.
    observed_true, observed_pred = y_true * mask, y_pred * mask
    tp = (observed_true * observed_pred).sum(0).astype(float)
    fp = ((1 - y_true) * y_pred * mask).sum(0).astype(float)
    fn = (y_true * (1 - y_pred) * mask).sum(0).astype(float)
    per_label_f1 = np.array([_ratio(2 * t, 2 * t + f + n) for t, f, n in zip(tp, fp, fn)])
    full_rows = mask.all(axis=1)
    cells = int(mask.sum())
    out = {
        "f1_macro": float(per_label_f1.mean()),
        "f1_micro": _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()),
        "precision_macro": float(np.mean([_ratio(t, t + f) for t, f in zip(tp, fp)])),
        "precision_micro": _ratio(tp.sum(), tp.sum() + fp.sum()),
        "recall_macro": float(np.mean([_ratio(t, t + n) for t, n in zip(tp, fn)])),
        "recall_micro": _ratio(tp.sum(), tp.sum() + fn.sum()),
        "hamming_loss": float((fp.sum() + fn.sum()) / cells) if cells else float("nan"),
        "acc_subset": float((y_true[full_rows] == y_pred[full_rows]).all(axis=1).mean())
        if full_rows.any() else float("nan"),
    }
    out["auroc_macro"] = _nanmean(per_label_auroc)
    out["auroc_micro"] = _binary_auroc(y_true[mask], proba[mask])
    if label_names is not None:
        for j, name in enumerate(label_names):
            key = _safe_key(name)
            out[f"auroc_{key}"] = float(per_label_auroc[j])
            out[f"f1_{key}"] = float(per_label_f1[j])
    return out


def best_threshold(y_true, y_score, metric: str = "youden") -> float:
    """The decision threshold that maximises ``metric`` on (validation) data, for use with ``score >= threshold``.

    Candidates are the observed scores. Among equally good thresholds the highest wins (fewest positive calls),
    so the choice is deterministic.

    Args:
        y_true: 0/1 labels with both classes present.
        y_score: scores of class 1.
        metric: ``"youden"`` (sensitivity + specificity - 1), ``"f1"`` or ``"acc"``.
    """
    if metric not in _BEST_THRESHOLD_METRICS:
        raise ValueError(f"unknown threshold metric {metric!r}; choose one of {', '.join(_BEST_THRESHOLD_METRICS)}")
    y_true = np.asarray(y_true).astype(int)
    y_score = np.asarray(y_score, dtype=float)
    _check_binary(y_true, y_score)
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("choosing a threshold needs both classes in y_true")
    # roc_curve's thresholds are the distinct scores in decreasing order (after a leading +inf we drop).
    fpr, tpr, thresholds = skm.roc_curve(y_true, y_score, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    tp, fp = np.rint(tpr * n_pos), np.rint(fpr * n_neg)
    if metric == "youden":
        score = tp / n_pos - fp / n_neg
    elif metric == "f1":
        score = 2 * tp / (tp + n_pos + fp)
    else:
        score = (tp + n_neg - fp) / y_true.size
    # Float ties (equal rationals computed differently) must not decide which threshold wins.
    first_best = int(np.flatnonzero(score >= score.max() - 1e-12)[0])
    return float(thresholds[first_best])
