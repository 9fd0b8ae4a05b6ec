"""Retrieval metrics by label agreement: precision@k, AP@k / mAP@k, and ANN recall against exact search.

All functions are pure numpy. Neighbour arrays are (Q, K) with the nearest first; a neighbour is *relevant*
when its label equals the query's label. Per-query arrays are returned where a bootstrap needs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _hits(query_labels: np.ndarray, neighbour_labels: np.ndarray, k: int) -> np.ndarray:
    query_labels = np.asarray(query_labels)
    neighbour_labels = np.asarray(neighbour_labels)
    if neighbour_labels.ndim != 2 or neighbour_labels.shape[0] != query_labels.shape[0]:
        raise ValueError(f"neighbour_labels must be (Q, K) with Q={query_labels.shape[0]}, "
                         f"got {neighbour_labels.shape}")
    if not 1 <= k <= neighbour_labels.shape[1]:
        raise ValueError(f"k={k} must lie in 1..{neighbour_labels.shape[1]} (the neighbours retrieved)")
    return neighbour_labels[:, :k] == query_labels[:, None]


def precision_at_k_per_query(query_labels: np.ndarray, neighbour_labels: np.ndarray, k: int) -> np.ndarray:
    """Fraction of the first ``k`` neighbours that share the query's label, one value per query."""
    return _hits(query_labels, neighbour_labels, k).mean(axis=1)


def precision_at_k(query_labels: np.ndarray, neighbour_labels: np.ndarray, k: int) -> float:
    """Mean precision@k over queries."""
    return float(precision_at_k_per_query(query_labels, neighbour_labels, k).mean())


def relevant_counts(query_labels: np.ndarray, archive_labels: np.ndarray, query_in_archive: bool = False) -> np.ndarray:
    """How many archive items share each query's label (less the query itself when it lies in the archive)."""
    query_labels = np.asarray(query_labels)
    values, counts = np.unique(np.asarray(archive_labels), return_counts=True)
    lookup = dict(zip(values.tolist(), counts.tolist()))
    out = np.array([lookup.get(label, 0) for label in query_labels.tolist()], dtype=np.int64)
    return out - 1 if query_in_archive else out


def average_precision_at_k(
    query_labels: np.ndarray, neighbour_labels: np.ndarray, k: int, n_relevant: np.ndarray
) -> np.ndarray:
    """AP@k per query, normalised by what a perfect ranking could reach.

    ``AP@k = (1 / min(k, R)) * sum_{i<=k} rel_i * P@i``, where ``rel_i`` is 1 when the i-th neighbour shares
    the query's label, ``P@i`` the precision of the first i neighbours, and ``R`` the number of relevant items
    in the archive (``n_relevant``, see :func:`relevant_counts`). A perfect top-k scores 1 and a ranking that
    finds one relevant item late scores less than one that finds it early. This is the ``min(k, R)`` form
    (as in Kaggle's ``apk``), not the variant that divides by the number of relevant items retrieved, which
    scores a list with a single hit at rank 1 as perfect. A query with ``R = 0`` scores 0.
    """
    hits = _hits(query_labels, neighbour_labels, k).astype(np.float64)
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    denominator = np.minimum(k, np.asarray(n_relevant))
    total = (hits * precision_at_i).sum(axis=1)
    return np.divide(total, denominator, out=np.zeros_like(total), where=denominator > 0)


def map_at_k(query_labels: np.ndarray, neighbour_labels: np.ndarray, k: int, n_relevant: np.ndarray) -> float:
    """Mean of :func:`average_precision_at_k` over queries."""
    return float(average_precision_at_k(query_labels, neighbour_labels, k, n_relevant).mean())


def recall_against_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Share of the exact top-k that an approximate index also returns in its top-k (FAISS's -1 never counts)."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"{approx_ids.shape[0]} approximate result rows but {exact_ids.shape[0]} exact rows")
    if not 1 <= k <= min(approx_ids.shape[1], exact_ids.shape[1]):
        raise ValueError(f"k={k} exceeds the neighbours retrieved")
    approx, exact = approx_ids[:, :k], exact_ids[:, :k]
    found = (approx[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    return float(found.any(axis=1).sum() / (k * exact.shape[0]))


def retrieval_metrics(
    query_labels: np.ndarray, neighbour_labels: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Flat dict ``precision_at_{k}`` and ``map_at_{k}`` for each k."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"precision_at_{k}"] = precision_at_k(query_labels, neighbour_labels, k)
        out[f"map_at_{k}"] = map_at_k(query_labels, neighbour_labels, k, n_relevant)
    return out
