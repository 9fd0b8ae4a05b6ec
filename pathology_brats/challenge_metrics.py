"""The BraTS-Path challenge scores, as the organisers' scorer (GaNDLF on torchmetrics) computes them.

    python -c "from pathology_brats.challenge_metrics import challenge_scores as s; print(s([0, 1], [0, 9], '2025'))"

2024/2025 rank on micro averages (``f1_global`` = ``recall_global`` = ``accuracy_global`` for single-label
predictions) and MCC; 2026 on macro F1 and recall, support-weighted specificity and AUROC (from one-hot hard
predictions) and MCC. The penalty label given to missing predictions is one more class for the scorer.

``ORGANISERS_KEYS`` are the names the organisers' ``score.py`` returns for each year (``METRICS_TO_RETURN`` of
Sage-Bionetworks-Challenges/brats-infra: ``evaluation/pathology/score.py`` in 2024 and 2026,
``evaluation/gandlf/score_path.py`` in 2025). ``SCORER_KEYS`` adds ``auroc_per_class_weighted_exact`` for 2026:
the organisers' AUROC breaks float32 near-ties by rounding noise that depends on the CPU (see
``common.metrics.gandlf``), so its value cannot be reproduced to the digit; the ``_exact`` key is the value the
hard predictions define, and is the one to compare runs by.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.metrics.gandlf import gandlf_metrics
from pathology_brats.schema import Schema, get_schema

ORGANISERS_KEYS = {
    "2024": ("mcc", "f1_global", "accuracy_global", "specificity_global", "recall_global"),
    "2025": ("mcc", "f1_global", "accuracy_global", "specificity_global", "recall_global"),
    "2026": ("mcc", "f1_per_class_average", "accuracy_global", "specificity_per_class_weighted",
             "recall_per_class_average", "auroc_per_class_weighted"),
}
SCORER_KEYS = {year: keys + tuple(f"{key}_exact" for key in keys if key.startswith("auroc_"))
               for year, keys in ORGANISERS_KEYS.items()}


def challenge_scores(y_true: Sequence[int], y_pred: Sequence[int], schema: Schema | str) -> dict[str, float]:
    """The year's ``SCORER_KEYS`` for integer labels and predictions (predictions may hold the penalty label),
    with ``num_classes`` = the schema's classes + the penalty label. The organisers' GaNDLF config that sets it is
    private (Synapse), so this is inferred: it cannot be smaller (``one_hot`` refuses the penalty label); a larger
    one would lower nothing but raise ``specificity_global`` (more absent classes, more true negatives)."""
    schema = schema if isinstance(schema, Schema) else get_schema(schema)
    metrics = gandlf_metrics(y_true, y_pred, schema.num_scored_classes)
    return {key: metrics[key] for key in SCORER_KEYS[schema.year]}


__all__ = ["ORGANISERS_KEYS", "SCORER_KEYS", "challenge_scores"]
