"""common.retrieval: FAISS indexes against numpy brute force, save/load round trips, self-exclusion, sidecars."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from common import retrieval
from common.errors import DataError


def _vectors(n=300, n_queries=25, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.normal(size=(n_queries, dim)).astype(np.float32)


def _numpy_knn(archive, queries, k, cosine=False):
    if cosine:
        archive = archive / np.linalg.norm(archive, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        scores = -(queries @ archive.T)
    else:
        scores = ((queries[:, None, :].astype(np.float64) - archive[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("kind,cosine", [("flat-l2", False), ("cosine", True)])
def test_exact_indexes_equal_numpy_brute_force(kind, cosine):
    archive, queries = _vectors()
    index, info = retrieval.make_index(kind, archive)
    distances, positions = retrieval.search(index, info, queries, 10)
    ref_scores, ref_positions = _numpy_knn(archive, queries, 10, cosine)
    np.testing.assert_array_equal(positions, ref_positions)
    np.testing.assert_allclose(distances, -ref_scores if cosine else ref_scores, rtol=1e-4, atol=1e-4)
    assert info["normalised"] is cosine


def test_query_is_never_its_own_neighbour():
    archive, _ = _vectors()
    queries = archive[:40]
    index, info = retrieval.make_index("flat-l2", archive)
    _, with_self = retrieval.search(index, info, queries, 5)
    assert (with_self[:, 0] == np.arange(40)).all()  # without exclusion each query finds itself first
    _, positions = retrieval.search(index, info, queries, 5, self_positions=np.arange(40))
    assert not (positions == np.arange(40)[:, None]).any()
    scores = ((queries[:, None] - archive[None]) ** 2).sum(-1)
    scores[np.arange(40), np.arange(40)] = np.inf
    np.testing.assert_array_equal(positions, np.argsort(scores, axis=1)[:, :5])
    # Queries outside the archive (-1) keep their plain top-k.
    _, mixed = retrieval.search(index, info, queries, 5, self_positions=np.full(40, -1))
    np.testing.assert_array_equal(mixed, with_self)


@pytest.mark.parametrize("kind", retrieval.INDEXES)
def test_save_load_gives_identical_results(kind, tmp_path):
    archive, queries = _vectors(n=400)
    index, info = retrieval.make_index(kind, archive, nlist=8, nprobe=3, hnsw_m=8, ef_search=16)
    info.update({"archive_split": "train", "ids": list(range(400)), "labels": [0] * 400, "model_sha256": "abc"})
    before = retrieval.search(index, info, queries, 10)
    retrieval.save_index(tmp_path, index, info)
    loaded, loaded_info = retrieval.load_index(tmp_path, kind, 16, required=("labels",),
                                               expect={"model_sha256": "abc"})
    after = retrieval.search(loaded, loaded_info, queries, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert loaded_info == json.loads(json.dumps(info))
    if kind == "ivf-flat":
        assert loaded.nprobe == 3 and loaded.nlist == 8
    if kind == "hnsw":
        assert loaded.hnsw.efSearch == 16


def test_ann_indexes_reach_exact_at_full_breadth():
    """IVF probing every list is exhaustive; HNSW with a wide search finds nearly all exact neighbours."""
    from common.metrics.retrieval import recall_against_exact

    archive, queries = _vectors(n=500, dim=8)
    exact_index, exact_info = retrieval.make_index("flat-l2", archive)
    _, exact = retrieval.search(exact_index, exact_info, queries, 10)
    ivf, ivf_info = retrieval.make_index("ivf-flat", archive, nlist=10)
    retrieval.set_search_params(ivf, ivf_info, nprobe=1)
    _, narrow = retrieval.search(ivf, ivf_info, queries, 10)
    retrieval.set_search_params(ivf, ivf_info, nprobe=10)
    _, full = retrieval.search(ivf, ivf_info, queries, 10)
    assert recall_against_exact(full, exact, 10) == 1.0
    assert recall_against_exact(narrow, exact, 10) < 1.0
    hnsw, hnsw_info = retrieval.make_index("hnsw", archive, hnsw_m=16, ef_search=200)
    _, approx = retrieval.search(hnsw, hnsw_info, queries, 10)
    assert recall_against_exact(approx, exact, 10) >= 0.95


def test_sidecar_checks(tmp_path):
    archive, _ = _vectors(n=50)
    index, info = retrieval.make_index("flat-l2", archive)
    info.update({"ids": list(range(50)), "labels": [0] * 50, "model_sha256": "abc"})
    retrieval.save_index(tmp_path, index, info)
    with pytest.raises(DataError, match="queries are 8-d"):
        retrieval.load_index(tmp_path, "flat-l2", 8)
    with pytest.raises(DataError, match="sidecar model_sha256 differs"):
        retrieval.load_index(tmp_path, "flat-l2", 16, expect={"model_sha256": "xyz"})
    with pytest.raises(DataError, match="no cosine index here; build it"):
        retrieval.load_index(tmp_path, "cosine", 16, build_hint="build it")
    (tmp_path / "flat-l2.json").write_text(json.dumps({**info, "labels": [0] * 49}))
    with pytest.raises(DataError, match="describes 50"):
        retrieval.load_index(tmp_path, "flat-l2", 16, required=("labels",))
    (tmp_path / "flat-l2.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a JSON object"):
        retrieval.load_index(tmp_path, "flat-l2", 16)
    assert retrieval.file_sha256(tmp_path / "flat-l2.json") == hashlib.sha256(b"[1, 2]").hexdigest()


@pytest.mark.parametrize("edit, needle", [
    ({"params": {}}, "params must hold positive integers nlist, nprobe"),
    ({"params": {"nlist": 8, "nprobe": "3"}}, "params must hold"),
    ({"ids": 5}, "ids must be a list"),
    ({"metric": "inner_product"}, "normalised must be true exactly"),
    ({"metric": "inner_product", "normalised": True}, "another metric"),
    ({"index": "hnsw"}, "index is 'hnsw'"),
])
def test_hand_edited_sidecars_are_one_line(tmp_path, edit, needle):
    archive, _ = _vectors(n=100)
    index, info = retrieval.make_index("ivf-flat", archive, nlist=8, nprobe=3)
    info.update({"ids": list(range(100))})
    retrieval.save_index(tmp_path, index, info)
    (tmp_path / "ivf-flat.json").write_text(json.dumps({**info, **edit}))
    with pytest.raises(DataError, match=needle):
        retrieval.load_index(tmp_path, "ivf-flat", 16)
