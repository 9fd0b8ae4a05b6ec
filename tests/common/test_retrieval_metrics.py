"""Retrieval metrics against brute-force references written as loops, and a hand-worked example."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics.retrieval import (
    average_precision_at_k,
    map_at_k,
    precision_at_k,
    recall_against_exact,
    relevant_counts,
    retrieval_metrics,
)


def _seeded(seed=0, n_queries=40, n_archive=60, dim=8, n_classes=3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 1.5
    archive_labels = rng.integers(0, n_classes, n_archive)
    query_labels = rng.integers(0, n_classes, n_queries)
    archive = centres[archive_labels] + rng.normal(size=(n_archive, dim))
    queries = centres[query_labels] + rng.normal(size=(n_queries, dim))
    order = np.argsort(((queries[:, None] - archive[None]) ** 2).sum(-1), axis=1)
    return query_labels, archive_labels, order


def _reference_ap(query_label, neighbour_labels, k, n_relevant):
    hits, total = 0, 0.0
    for i in range(k):
        if neighbour_labels[i] == query_label:
            hits += 1
            total += hits / (i + 1)
    denominator = min(k, n_relevant)
    return total / denominator if denominator else 0.0


def test_hand_worked_average_precision():
    # Relevant at ranks 1 and 3, three relevant items in the archive: (1/1 + 2/3) / min(5, 3) = 5/9.
    ap = average_precision_at_k(np.array([1]), np.array([[1, 0, 1, 0, 0]]), 5, np.array([3]))
    assert ap[0] == pytest.approx(5 / 9)
    # A perfect top-k scores 1 even when the archive holds more relevant items than k.
    assert average_precision_at_k(np.array([1]), np.array([[1, 1, 1]]), 3, np.array([10]))[0] == pytest.approx(1.0)
    # A single late hit is penalised both by its rank and by the hits a perfect list would have had.
    assert average_precision_at_k(np.array([0]), np.array([[1, 1, 0]]), 3, np.array([2]))[0] == pytest.approx(1 / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_metrics_match_brute_force(seed, k):
    query_labels, archive_labels, order = _seeded(seed)
    neighbour_labels = archive_labels[order[:, :10]]
    n_relevant = relevant_counts(query_labels, archive_labels)
    assert n_relevant.tolist() == [int((archive_labels == q).sum()) for q in query_labels]

    expected_p = np.mean([np.mean([neighbour_labels[i, j] == q for j in range(k)]) for i, q in enumerate(query_labels)])
    expected_ap = [_reference_ap(q, neighbour_labels[i], k, n_relevant[i]) for i, q in enumerate(query_labels)]
    assert precision_at_k(query_labels, neighbour_labels, k) == pytest.approx(expected_p)
    np.testing.assert_allclose(average_precision_at_k(query_labels, neighbour_labels, k, n_relevant), expected_ap)
    assert map_at_k(query_labels, neighbour_labels, k, n_relevant) == pytest.approx(np.mean(expected_ap))
    flat = retrieval_metrics(query_labels, neighbour_labels, n_relevant)
    assert flat[f"precision_at_{k}"] == pytest.approx(expected_p)
    assert flat[f"map_at_{k}"] == pytest.approx(np.mean(expected_ap))


def test_clustered_labels_beat_shuffled_neighbours():
    """Neighbours by distance agree with the query's label far more often than a random ranking does."""
    query_labels, archive_labels, order = _seeded(3)
    n_relevant = relevant_counts(query_labels, archive_labels)
    shuffled = np.random.default_rng(0).permuted(order, axis=1)
    assert map_at_k(query_labels, archive_labels[order], 10, n_relevant) > \
        map_at_k(query_labels, archive_labels[shuffled], 10, n_relevant) + 0.2


def test_relevant_counts_excludes_the_query_itself():
    labels = np.array([0, 1, 1, 0, 1])
    assert relevant_counts(labels, labels, query_in_archive=True).tolist() == [1, 2, 2, 1, 2]
    assert relevant_counts(np.array([2]), labels).tolist() == [0]
    # No relevant item in the archive: AP is 0, not a division by zero.
    assert average_precision_at_k(np.array([2]), np.array([[0, 1]]), 2, np.array([0]))[0] == 0.0


def test_recall_against_exact_matches_set_overlap():
    rng = np.random.default_rng(0)
    exact = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    approx = exact.copy()
    swap = rng.random(exact.shape) < 0.3
    approx[swap] = 100 + np.arange(swap.sum())  # ids never in the exact lists
    approx = rng.permuted(approx, axis=1)  # order inside the top-k does not matter
    for k in (1, 5, 10):
        expected = np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact)])
        assert recall_against_exact(approx, exact, k) == pytest.approx(expected)
    assert recall_against_exact(exact, exact, 10) == 1.0
    missing = exact.copy()
    missing[:, -1] = -1  # FAISS pads with -1 when it finds fewer than k
    assert recall_against_exact(missing, exact, 10) == pytest.approx(0.9)


def test_k_beyond_retrieved_is_an_error():
    with pytest.raises(ValueError, match="k=6"):
        precision_at_k(np.array([0]), np.array([[0, 1, 0, 1, 0]]), 6)
