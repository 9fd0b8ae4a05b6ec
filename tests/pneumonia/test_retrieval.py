"""pneumonia.retrieval: CLI errors, and an end-to-end build + evaluate on the phantom run whose numbers are
recomputed by hand (the index code itself is tested in tests/common/test_retrieval_index.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from common.metrics.retrieval import average_precision_at_k, relevant_counts
from common.runs import load_run
from pneumonia import retrieval
from pneumonia.data import load_medmnist
from pneumonia.model import build_from_record, embed_images
from tests.common.test_retrieval_index import _numpy_knn


def test_run_dir_without_model_exits_2(tmp_path, capsys):
    assert retrieval.main(["build", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "no trained model" in err


def _run(trained_pneumonia_run, out, *args):
    run_dir, npz = trained_pneumonia_run
    extra = ["--n-boot", "50"] if args[0] == "evaluate" else []
    return retrieval.main([*args, "--run-dir", str(run_dir), "--data-root", str(npz.parent),
                           "--output-dir", str(out), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def built(trained_pneumonia_run, tmp_path_factory):
    """Every index built once from the phantom run; tests that alter files work on a copy."""
    out = tmp_path_factory.mktemp("retrieval") / "built"
    assert _run(trained_pneumonia_run, out, "build", "--index", "all") == 0
    return out


def _copy(built, tmp_path):
    return Path(shutil.copytree(built, tmp_path / "retrieval"))


def test_wrong_dimension_index_exits_2(trained_pneumonia_run, built, tmp_path, capsys):
    out = _copy(built, tmp_path)
    info = json.loads((out / "flat-l2.json").read_text())
    small = faiss.IndexFlatL2(64)
    small.add(np.zeros((len(info["ids"]), 64), np.float32))
    retrieval.save_index(out, small, {**info, "dim": 64})
    capsys.readouterr()
    assert _run(trained_pneumonia_run, out, "query", "--index", "flat-l2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "flat-l2.faiss" in err and "64-d" in err and "512-d" in err


def test_index_from_other_weights_or_missing_exits_2(trained_pneumonia_run, built, tmp_path, capsys):
    assert _run(trained_pneumonia_run, tmp_path / "empty", "evaluate") == 2
    assert "no index built" in capsys.readouterr().err
    out = _copy(built, tmp_path)
    sidecar = out / "cosine.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "model_sha256": "0" * 64}))
    assert _run(trained_pneumonia_run, out, "evaluate", "--index", "cosine") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cosine.faiss" in err and "other model weights" in err
    assert _run(trained_pneumonia_run, out, "query", "--index", "hnsw", "--ids", "100000") == 2
    assert "--ids" in capsys.readouterr().err
    (out / "ivf-flat.faiss").write_bytes(b"not an index")
    assert _run(trained_pneumonia_run, out, "query", "--index", "ivf-flat") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a readable FAISS index" in err


def test_build_evaluate_end_to_end(trained_pneumonia_run, built, tmp_path):
    run_dir, npz = trained_pneumonia_run
    out = _copy(built, tmp_path)
    assert _run(trained_pneumonia_run, out, "evaluate", "--nprobe", "100000") == 0
    results = json.loads((out / "results.json").read_text())
    sidecar = json.loads((out / "ivf-flat.json").read_text())
    assert sidecar["archive_split"] == "train" and sidecar["dim"] == 512 and sidecar["metric"] == "l2"
    assert sidecar["model_sha256"] == retrieval.model_sha256(run_dir)

    # Recompute flat-L2 P@5 and mAP@10 from scratch: numpy kNN of test embeddings in the train embeddings.
    model = load_run(run_dir, "pneumonia", build_from_record).model
    data = load_medmnist(npz.parent)
    archive = np.load(out / "embeddings_train.npy")
    np.testing.assert_allclose(archive, embed_images(model, data.images["train"]), rtol=1e-5, atol=1e-5)
    queries = embed_images(model, data.images["test"])
    _, order = _numpy_knn(archive, queries, 10)
    query_labels, archive_labels = data.labels["test"], data.labels["train"]
    assert sidecar["labels"] == archive_labels.tolist()
    neighbour_labels = archive_labels[order]
    expected_p5 = (neighbour_labels[:, :5] == query_labels[:, None]).mean()
    expected_map = average_precision_at_k(query_labels, neighbour_labels, 10,
                                          relevant_counts(query_labels, archive_labels)).mean()
    assert results["flat-l2/precision_at_5"] == pytest.approx(expected_p5)
    assert results["flat-l2/map_at_10"] == pytest.approx(expected_map)
    assert results["flat-l2/precision_at_5_ci_low"] <= expected_p5 <= results["flat-l2/precision_at_5_ci_high"]

    # The embedding was trained to separate the classes: neighbours agree far above chance.
    chance = sum(np.mean(query_labels == c) * np.mean(archive_labels == c) for c in (0, 1))
    assert results["flat-l2/precision_at_5"] > chance + 0.15, (results, chance)
    # IVF probing every list is exact search.
    assert results["ivf-flat/recall_at_10_vs_exact"] == 1.0
    assert 0.5 < results["hnsw/recall_at_10_vs_exact"] <= 1.0
    assert (out / "gallery_flat-l2.png").stat().st_size > 5000
    markdown = (out / "results.md").read_text()
    assert "| hnsw |" in markdown and "gallery_flat-l2.png" in markdown


def test_test_archive_excludes_each_query(trained_pneumonia_run, tmp_path):
    out = tmp_path / "retrieval"
    assert _run(trained_pneumonia_run, out, "build", "--index", "flat-l2", "--archive", "test") == 0
    assert _run(trained_pneumonia_run, out, "query", "--index", "flat-l2", "--ids", "0", "1", "2", "--k", "4") == 0
    frame = pd.read_csv(out / "query_flat-l2.csv")
    assert len(frame) == 12 and frame["archive_split"].eq("test").all()
    assert not (frame["query_id"] == frame["neighbour_id"]).any()
    assert frame.groupby("query_id")["distance"].apply(lambda d: d.is_monotonic_increasing).all()
    assert _run(trained_pneumonia_run, out, "evaluate", "--index", "flat-l2") == 0
    results = json.loads((out / "results.json").read_text())
    # Reference: brute-force kNN of the test split in itself with the diagonal (the query) removed.
    vectors = np.load(out / "embeddings_test.npy").astype(np.float64)
    labels = np.asarray(json.loads((out / "flat-l2.json").read_text())["labels"])
    distances = ((vectors[:, None] - vectors[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    neighbour_labels = labels[np.argsort(distances, axis=1, kind="stable")[:, :10]]
    assert results["flat-l2/precision_at_1"] == pytest.approx((neighbour_labels[:, 0] == labels).mean())
    expected_map = average_precision_at_k(labels, neighbour_labels, 10,
                                          relevant_counts(labels, labels, query_in_archive=True)).mean()
    assert results["flat-l2/map_at_10"] == pytest.approx(expected_map)


def test_run_section(trained_pneumonia_run):
    run_dir, _ = trained_pneumonia_run
    section = retrieval.run_section(run_dir, run_dir.parent)
    assert section.startswith("## Pneumonia: case retrieval")
    assert f"]({run_dir.name}/retrieval/gallery_flat-l2.png)" in section
    assert "| cosine |" in section and "| ivf-flat |" in section
