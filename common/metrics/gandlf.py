"""Multi-class metrics named and computed as GaNDLF's ``generate-metrics`` does (the BraTS-Path scorer).

    python -c "from common.metrics.gandlf import gandlf_metrics; print(gandlf_metrics([0, 1, 2], [0, 2, 2], 4))"

GaNDLF (``GANDLF/metrics/classification.py``) calls torchmetrics on hard predictions and names the averages by
suffix: ``_global`` = micro, ``_per_class_average`` = macro, ``_per_class_weighted`` = weighted (by support).
Its AUROC is computed from hard predictions, not from scores: ``softmax(one_hot(prediction).float())``. Those
scores are meant to tie (every predicted class gets the same value), but float32 softmax rounds the row sum
differently depending on where the 1 sits and on the CPU's SIMD path (``ATEN_CPU_CAPABILITY``), so equal scores
differ by an ulp and torchmetrics' ROC breaks the ties by that noise. ``auroc_*`` follow that path (what the
organisers report); ``auroc_*_exact`` are computed on the one-hot scores themselves (exact ties, each ROC
threshold takes a tied group whole, as sklearn's ``roc_auc_score`` does), the value the hard predictions define.
``num_classes`` is what the challenge passes, which includes the penalty label given to missing predictions; it
changes the micro specificity (every absent class adds true negatives), so it must match the organisers' to
reproduce their numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torchmetrics.functional.classification as tmf

AVERAGES = {"global": "micro", "per_class_average": "macro", "per_class_weighted": "weighted"}


def gandlf_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict[str, float]:
    """``mcc``, ``{f1, accuracy, precision, recall, specificity, auroc}_{global, per_class_average,
    per_class_weighted}`` of integer predictions, each from torchmetrics as GaNDLF calls it, and the tie-exact
    ``auroc_{per_class_average, per_class_weighted}_exact`` (micro AUROC is not defined for multi-class input;
    GaNDLF's ``auroc_global`` is its macro value and is left out)."""
    target = torch.as_tensor(np.array(y_true), dtype=torch.long)
    preds = torch.as_tensor(np.array(y_pred), dtype=torch.long)
    if target.shape != preds.shape or target.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {tuple(target.shape)} and "
                         f"{tuple(preds.shape)}")
    if len(target) and (min(target.min(), preds.min()) < 0 or max(target.max(), preds.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    with warnings.catch_warnings():  # torchmetrics warns about classes without samples; their score stays as it is
        warnings.simplefilter("ignore")
        return _compute(preds, target, num_classes)


def _compute(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    out = {"mcc": float(tmf.multiclass_matthews_corrcoef(preds, target, num_classes))}
    one_hot = torch.nn.functional.one_hot(preds, num_classes)
    organisers = torch.softmax(one_hot.float(), dim=1)  # GaNDLF's scores: float32, ties broken by rounding noise
    exact = one_hot.double()  # the same ranking with exact ties
    for suffix, average in AVERAGES.items():
        for name, fn in (("f1", tmf.multiclass_f1_score), ("accuracy", tmf.multiclass_accuracy),
                         ("precision", tmf.multiclass_precision), ("recall", tmf.multiclass_recall),
                         ("specificity", tmf.multiclass_specificity)):
            out[f"{name}_{suffix}"] = float(fn(preds, target, num_classes, average=average))
        if average != "micro":
            out[f"auroc_{suffix}"] = float(tmf.multiclass_auroc(organisers, target, num_classes, average=average))
            out[f"auroc_{suffix}_exact"] = float(tmf.multiclass_auroc(exact, target, num_classes, average=average))
    return out


__all__ = ["gandlf_metrics", "AVERAGES"]
