"""Multi-class metrics named and computed as GaNDLF's ``generate-metrics`` does (the BraTS-Path scorer).

    python -c "from common.metrics.gandlf import gandlf_metrics; print(gandlf_metrics([0, 1, 2], [0, 2, 2], 4))"

GaNDLF (``GANDLF/metrics/classification.py``) calls torchmetrics on hard predictions and names the averages by
suffix: ``_global`` = micro, ``_per_class_average`` = macro, ``_per_class_weighted`` = weighted (by support).
Its AUROC is computed from one-hot hard predictions, not from scores. ``num_classes`` is what the challenge
passes, which includes the penalty label given to missing predictions; it changes the micro specificity
(every absent class adds true negatives), so it must match the organisers' to reproduce their numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torchmetrics.functional.classification as tmf

AVERAGES = {"global": "micro", "per_class_average": "macro", "per_class_weighted": "weighted"}


def gandlf_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict[str, float]:
    """``mcc`` and ``{f1, accuracy, precision, recall, specificity, auroc}_{global, per_class_average,
    per_class_weighted}`` of integer predictions, each from torchmetrics as GaNDLF calls it (micro AUROC is not
    defined for multi-class input and is left out)."""
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
    one_hot = torch.nn.functional.one_hot(preds, num_classes).float()
    for suffix, average in AVERAGES.items():
        for name, fn in (("f1", tmf.multiclass_f1_score), ("accuracy", tmf.multiclass_accuracy),
                         ("precision", tmf.multiclass_precision), ("recall", tmf.multiclass_recall),
                         ("specificity", tmf.multiclass_specificity)):
            out[f"{name}_{suffix}"] = float(fn(preds, target, num_classes, average=average))
        if average != "micro":
            out[f"auroc_{suffix}"] = float(tmf.multiclass_auroc(one_hot, target, num_classes, average=average))
    return out


__all__ = ["gandlf_metrics", "AVERAGES"]
