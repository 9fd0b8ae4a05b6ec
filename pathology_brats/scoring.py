"""The BraTS-Path challenge scores, as the organisers' scorer (GaNDLF on torchmetrics) computes them.

    python -c "from pathology_brats.scoring import challenge_scores; print(challenge_scores([0, 1], [0, 9], '2025'))"

2024/2025 rank on micro averages (``f1_global`` = ``recall_global`` = ``accuracy_global`` for single-label
predictions) and MCC; 2026 on macro F1 and recall, support-weighted specificity and AUROC (from one-hot hard
predictions) and MCC. The penalty label given to missing predictions is one more class for the scorer.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.metrics.gandlf import gandlf_metrics
from pathology_brats.schema import Schema, get_schema

SCORER_KEYS = {
    "2024": ("mcc", "f1_global", "accuracy_global", "specificity_global", "recall_global"),
    "2025": ("mcc", "f1_global", "accuracy_global", "specificity_global", "recall_global"),
    "2026": ("mcc", "f1_per_class_average", "accuracy_global", "specificity_per_class_weighted",
             "recall_per_class_average", "auroc_per_class_weighted"),
}


def challenge_scores(y_true: Sequence[int], y_pred: Sequence[int], schema: Schema | str) -> dict[str, float]:
    """The year's scorer keys for integer labels and predictions (predictions may hold the penalty label)."""
    schema = schema if isinstance(schema, Schema) else get_schema(schema)
    metrics = gandlf_metrics(y_true, y_pred, schema.num_scored_classes)
    return {key: metrics[key] for key in SCORER_KEYS[schema.year]}


__all__ = ["SCORER_KEYS", "challenge_scores"]
