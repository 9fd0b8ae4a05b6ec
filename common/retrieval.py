"""FAISS indexes with checked sidecars: the retrieval code every pipeline and benchmark shares.

Index kinds: ``flat-l2`` (exact L2), ``cosine`` (exact inner product on L2-normalised vectors), ``ivf-flat`` and
``hnsw`` (approximate, L2 or cosine). An index is saved as ``<name>.faiss`` (FAISS's own format, never a pickle)
beside a ``<name>.json`` sidecar that says what it holds (dimension, metric, ids, and whatever the caller adds:
labels, the digest of the weights that made the vectors); ``load_index`` checks the two against each other and
against the caller's expectations, so an index is never searched with vectors of another model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.errors import ConfigError, DataError
from common.rundir import atomic_write_bytes, atomic_write_json

INDEXES = ("flat-l2", "cosine", "ivf-flat", "hnsw")
EXACT_INDEXES = ("flat-l2", "cosine")
SIDECAR_KEYS = ("index", "dim", "metric", "normalised", "ids", "params")


def file_sha256(path: Path) -> str:
    """Digest of a file (model weights), recorded in a sidecar so that stale indexes are refused."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalised(vectors: np.ndarray) -> np.ndarray:
    out = np.array(vectors, dtype=np.float32, copy=True)
    faiss.normalize_L2(out)
    return out


def make_index(kind: str, vectors: np.ndarray, ann_metric: str = "l2", nlist: int | None = None, nprobe: int = 8,
               hnsw_m: int = 32, ef_construction: int = 64, ef_search: int = 64, seed: int = 0,
               ) -> tuple[faiss.Index, dict[str, Any]]:
    """Build one index over ``vectors`` (N, D) and describe it for the sidecar."""
    if kind not in INDEXES:
        raise ConfigError("--index", f"unknown index {kind!r}; choose one of {', '.join(INDEXES)}")
    cosine = kind == "cosine" or (kind not in EXACT_INDEXES and ann_metric == "cosine")
    metric = faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2
    data = _normalised(vectors) if cosine else np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = data.shape
    params: dict[str, Any] = {}
    if kind in EXACT_INDEXES:
        index = faiss.IndexFlat(dim, metric)
    elif kind == "ivf-flat":
        nlist = nlist or max(1, round(math.sqrt(n)))
        if nlist > n:
            raise ConfigError("--nlist", f"{nlist} lists for {n} archive vectors; use at most {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, metric), dim, nlist, metric)
        index.cp.seed = seed
        index.train(data)
        params = {"nlist": nlist, "nprobe": min(nprobe, nlist)}
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, metric)
        index.hnsw.efConstruction = ef_construction
        params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    index.add(data)
    info = {"index": kind, "faiss_class": type(index).__name__, "dim": dim,
            "metric": "inner_product" if cosine else "l2", "normalised": cosine, "params": params}
    set_search_params(index, info)
    return index, info


def set_search_params(index: faiss.Index, info: dict[str, Any], nprobe: int | None = None,
                      ef_search: int | None = None) -> None:
    """Apply the sidecar's search breadth, or the one asked for now."""
    params = info.get("params", {})
    if info["index"] == "ivf-flat":
        index.nprobe = min(nprobe or params["nprobe"], params["nlist"])
    elif info["index"] == "hnsw":
        index.hnsw.efSearch = ef_search or params["ef_search"]


def index_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.faiss", directory / f"{name}.json"


def save_index(directory: Path, index: faiss.Index, info: dict[str, Any]) -> Path:
    """Write ``<name>.faiss`` (FAISS's own format) and its sidecar, each atomically, the index first."""
    index_path, sidecar_path = index_paths(directory, info["index"])
    atomic_write_bytes(index_path, faiss.serialize_index(index).tobytes())
    atomic_write_json(sidecar_path, info)
    return index_path


def load_index(directory: Path, name: str, dim: int, required: Iterable[str] = (),
               expect: dict[str, Any] | None = None, build_hint: str = "build it first",
               mismatch: str = "built for other inputs") -> tuple[faiss.Index, dict]:
    """Read an index and its sidecar and check them against each other and against what the caller expects.

    Args:
        directory: where ``<name>.faiss`` and ``<name>.json`` are.
        name: the index kind (one of ``INDEXES``).
        dim: the dimension of the vectors that will be searched.
        required: sidecar keys the caller needs beyond ``SIDECAR_KEYS``.
        expect: sidecar values that must match (``{"model_sha256": ...}``).
        build_hint: how to make the index, for the error when it is missing.
        mismatch: what an ``expect`` mismatch means, for its error.

    Raises:
        DataError: missing or unreadable files, another dimension, a sidecar that does not describe the index,
            or a sidecar value other than the expected one.
    """
    index_path, sidecar_path = index_paths(directory, name)
    for path in (sidecar_path, index_path):
        if not path.is_file():
            raise DataError(path, f"no {name} index here; {build_hint}")
    try:
        info = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(sidecar_path, f"not valid JSON ({type(err).__name__})") from err
    if not isinstance(info, dict):
        raise DataError(sidecar_path, "not a JSON object; rebuild the index")
    missing = sorted({*SIDECAR_KEYS, *required} - set(info))
    if missing:
        raise DataError(sidecar_path, f"sidecar lacks {missing}; rebuild the index")
    _check_sidecar(info, name, sidecar_path)
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as err:
        raise DataError(index_path, f"not a readable FAISS index ({str(err).splitlines()[0][:120]})") from err
    if index.d != dim:
        raise DataError(index_path, f"index holds {index.d}-d vectors but the queries are {dim}-d; rebuild it")
    metric = faiss.METRIC_INNER_PRODUCT if info["metric"] == "inner_product" else faiss.METRIC_L2
    if index.metric_type != metric:
        raise DataError(sidecar_path, f"says {info['metric']} but the index searches by another metric; rebuild it")
    sized = [key for key in ("ids", *required) if isinstance(info.get(key), list)]
    if index.d != info["dim"] or any(len(info[key]) != index.ntotal for key in sized):
        raise DataError(sidecar_path, f"describes {len(info['ids'])} {info['dim']}-d vectors but the index holds "
                                      f"{index.ntotal} {index.d}-d vectors; rebuild the index")
    for key, value in (expect or {}).items():
        if info.get(key) != value:
            raise DataError(index_path, f"{mismatch} (sidecar {key} differs); rebuild it")
    try:
        set_search_params(index, info)
    except (KeyError, TypeError) as err:
        raise DataError(sidecar_path, f"search parameters missing or wrong ({err}); rebuild the index") from err
    return index, info


_PARAMS = {"ivf-flat": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_construction", "ef_search")}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sidecar(info: dict[str, Any], name: str, path: Path) -> None:
    """Types and values of the keys every sidecar has, so a hand-edited file fails here in one line."""
    problems = []
    if info["index"] != name:
        problems.append(f"index is {info['index']!r}, not {name!r}")
    if not _is_int(info["dim"]) or info["dim"] < 1:
        problems.append("dim must be a positive integer")
    if info["metric"] not in ("l2", "inner_product"):
        problems.append("metric must be l2 or inner_product")
    if not isinstance(info["normalised"], bool) or info["normalised"] != (info["metric"] == "inner_product"):
        problems.append("normalised must be true exactly for inner_product")
    if not isinstance(info["ids"], list) or not all(_is_int(i) and i >= 0 for i in info["ids"]):
        problems.append("ids must be a list of non-negative integers")
    params = info["params"]
    if not isinstance(params, dict) or not all(_is_int(params.get(k)) and params[k] > 0 for k in _PARAMS.get(name, ())):
        problems.append(f"params must hold positive integers {', '.join(_PARAMS.get(name, ())) or '(none)'}")
    if problems:
        raise DataError(path, f"{'; '.join(problems)}; rebuild the index")


def available_indexes(directory: Path) -> list[str]:
    """The index kinds saved (index and sidecar) in ``directory``."""
    return [name for name in INDEXES if all(p.is_file() for p in index_paths(directory, name))]


def search(index: faiss.Index, info: dict[str, Any], queries: np.ndarray, k: int,
           self_positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (distances, archive positions), nearest first, skipping each query's own archive position.

    ``self_positions[i]`` is query i's position in the archive, or -1 when it is not there. Distances are
    FAISS's: squared L2, or cosine similarity for normalised inner-product indexes.
    """
    queries = _normalised(queries) if info["normalised"] else np.ascontiguousarray(queries, dtype=np.float32)
    extra = 0 if self_positions is None else 1
    distances, positions = index.search(queries, min(k + extra, index.ntotal))
    if self_positions is not None:
        drop = (positions == np.asarray(self_positions)[:, None]) | (positions < 0)
        order = np.argsort(drop, axis=1, kind="stable")
        distances = np.take_along_axis(distances, order, axis=1)
        positions = np.take_along_axis(positions, order, axis=1)
    return distances[:, :k], positions[:, :k]




__all__ = ["INDEXES", "EXACT_INDEXES", "file_sha256", "make_index", "set_search_params", "index_paths", "save_index",
           "load_index", "available_indexes", "search"]
