"""FAISS index speed and recall on synthetic 512-d embeddings: flat L2 against IVF-Flat and HNSW.

    python -m benchmarks.retrieval --sizes 10000 100000 --data clustered gaussian --threads 2

For each archive size and data kind it builds a flat L2 index (exact), an IVF-Flat index (nlist ~ 4 sqrt(N))
and an HNSW index, runs the same batch of queries through each, and prints a Markdown table of build time,
queries per second and recall@10 against the flat index over a sweep of IVF ``nprobe`` and HNSW ``efSearch``.
A second table names, per size, kind and index family, the fastest setting that reaches the recall target and
its speed-up over flat search.

Data kinds: ``gaussian`` is i.i.d. N(0, 1) in 512-d, where nearest neighbours are barely nearer than anyone
else, the worst case for every ANN method; ``clustered`` is a Gaussian mixture whose components
each spread along their own 16-d subspace with a little isotropic noise: clusters of low intrinsic dimension,
the structure learned embeddings have, and the case ANN indexes are built for.
Queries are fresh draws from the same distribution, never archive points.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int, unit_interval
from common.errors import ConfigError, cli_entry
from common.metrics.retrieval import recall_against_exact
from common.retrieval import make_index, set_search_params

DATA_KINDS = ("clustered", "gaussian")
ANN_FAMILIES = ("ivf", "hnsw")
INTRINSIC_DIM = 16  # each mixture component spreads along its own random 16-d subspace
SPREAD = 4.0  # std along that subspace; centres are N(0, I) so components sit ~32 apart and overlap a little
NOISE_STD = 0.1  # isotropic noise off the subspace


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True)
    parser = MedvlArgumentParser("FAISS retrieval benchmark", parents=[parent])
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[10_000, 100_000], help="archive sizes")
    parser.add_argument("--data", nargs="+", choices=DATA_KINDS, default=list(DATA_KINDS), help="data kinds")
    parser.add_argument("--dim", type=positive_int, default=512, help="embedding dimension")
    parser.add_argument("--queries", type=positive_int, default=1000, help="queries per measurement (one batch search)")
    parser.add_argument("--k", type=positive_int, default=10, help="neighbours retrieved per query")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="time each batch search as the best of this many")
    parser.add_argument("--threads", type=positive_int, default=None, help="FAISS OpenMP threads (default: all cores)")
    parser.add_argument("--nprobe", type=positive_int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128], help="IVF sweep")
    parser.add_argument("--ef-search", type=positive_int, nargs="+", default=[16, 32, 64, 128, 256, 512],
                        help="HNSW sweep")
    parser.add_argument("--indexes", nargs="+", choices=ANN_FAMILIES, default=list(ANN_FAMILIES),
                        help="ANN families to build beside the exact flat index (HNSW builds slowly on few cores)")
    parser.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: 4 sqrt(N))")
    parser.add_argument("--hnsw-m", type=positive_int, default=32, help="HNSW neighbours per node")
    parser.add_argument("--ef-construction", type=positive_int, default=64, help="HNSW build breadth")
    parser.add_argument("--target-recall", type=unit_interval, default=0.95,
                        help="recall@k the fastest setting of each family must reach")
    parser.add_argument("--clusters", type=positive_int, default=100, help="mixture components of the clustered data")
    return parser


def make_data(kind: str, n: int, n_queries: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Archive and query vectors of one kind, drawn together so queries follow the archive's distribution."""
    rng = np.random.default_rng(seed)
    total = n + n_queries
    if kind == "gaussian":
        both = rng.standard_normal((total, dim), dtype=np.float32)
        return both[:n], both[n:]
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    component = rng.integers(0, clusters, total)
    both = rng.standard_normal((total, dim), dtype=np.float32)
    both *= NOISE_STD
    for c in range(clusters):
        members = np.flatnonzero(component == c)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, INTRINSIC_DIM), dtype=np.float32))
        latent = rng.standard_normal((members.size, INTRINSIC_DIM), dtype=np.float32) * SPREAD
        both[members] += centres[c] + latent @ basis.T
    return both[:n], both[n:]


@dataclass
class Row:
    size: int
    kind: str
    index: str
    setting: str
    build_s: float
    qps: float
    recall: float


def _search(index: faiss.Index, queries: np.ndarray, k: int, repeats: int) -> tuple[np.ndarray, float]:
    """One batch search of all queries, timed as the best of ``repeats`` so a stray stall does not count."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return ids, queries.shape[0] / best


def _timed_build(kind: str, data: np.ndarray, args: argparse.Namespace, nlist: int | None = None):
    """An index from ``common.retrieval.make_index`` (the one the pipelines use) and its build time."""
    start = time.perf_counter()
    index, info = make_index(kind, data, "l2", nlist=nlist, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                             seed=args.seed)
    return index, info, time.perf_counter() - start


def bench_one(kind: str, size: int, args: argparse.Namespace) -> list[Row]:
    data, queries = make_data(kind, size, args.queries, args.dim, args.clusters, args.seed)
    k = args.k
    index, _, build_s = _timed_build("flat-l2", data, args)
    exact, qps = _search(index, queries, k, args.repeats)
    rows = [Row(size, kind, "flat-l2", "exact", build_s, qps, 1.0)]
    del index
    if "ivf" in args.indexes:
        rows.extend(_bench_ivf(data, queries, exact, size, kind, args))
    if "hnsw" in args.indexes:
        rows.extend(_bench_hnsw(data, queries, exact, size, kind, args))
    return rows


def _bench_ivf(data, queries, exact, size: int, kind: str, args: argparse.Namespace) -> list[Row]:
    k, rows = args.k, []
    nlist = args.nlist or max(1, int(round(4 * math.sqrt(size))))
    index, info, build_s = _timed_build("ivf-flat", data, args, nlist)
    for nprobe in sorted(p for p in args.nprobe if p <= nlist):
        set_search_params(index, info, nprobe=nprobe)
        ids, qps = _search(index, queries, k, args.repeats)
        rows.append(Row(size, kind, f"ivf-flat (nlist={nlist})", f"nprobe={nprobe}", build_s, qps,
                        recall_against_exact(ids, exact, k)))
    return rows


def _bench_hnsw(data, queries, exact, size: int, kind: str, args: argparse.Namespace) -> list[Row]:
    k, rows = args.k, []
    index, info, build_s = _timed_build("hnsw", data, args)
    for ef in sorted(args.ef_search):
        set_search_params(index, info, ef_search=max(ef, k))
        ids, qps = _search(index, queries, k, args.repeats)
        rows.append(Row(size, kind, f"hnsw (M={args.hnsw_m})", f"efSearch={ef}", build_s, qps,
                        recall_against_exact(ids, exact, k)))
    return rows


def sweep_table(rows: list[Row], k: int) -> str:
    lines = [f"| N | data | index | setting | build s | queries/s | recall@{k} vs exact |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.size:,} | {r.kind} | {r.index} | {r.setting} | {r.build_s:.2f} | {r.qps:,.0f} "
                     f"| {r.recall:.3f} |")
    return "\n".join(lines)


def best_table(rows: list[Row], target: float, k: int) -> str:
    """Per size, kind and ANN family, the fastest setting whose recall reaches ``target``, against flat search."""
    lines = [f"| N | data | flat queries/s | index | fastest setting at recall@{k} >= {target} | recall | queries/s "
             "| speed-up |", "|---|---|---|---|---|---|---|---|"]
    for size, kind in dict.fromkeys((r.size, r.kind) for r in rows):
        group = [r for r in rows if (r.size, r.kind) == (size, kind)]
        flat = next(r for r in group if r.index == "flat-l2")
        for family in dict.fromkeys(r.index for r in group if r.index != "flat-l2"):
            passing = [r for r in group if r.index == family and r.recall >= target]
            if not passing:
                best_recall = max(r.recall for r in group if r.index == family)
                lines.append(f"| {size:,} | {kind} | {flat.qps:,.0f} | {family} | none in the sweep "
                             f"(best recall {best_recall:.3f}) | - | - | - |")
                continue
            best = max(passing, key=lambda r: r.qps)
            lines.append(f"| {size:,} | {kind} | {flat.qps:,.0f} | {family} | {best.setting} | {best.recall:.3f} "
                         f"| {best.qps:,.0f} | {best.qps / flat.qps:.1f}x |")
    return "\n".join(lines)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    if any(s < args.k for s in args.sizes):
        raise ConfigError("--sizes", f"every size must be at least k={args.k}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads", "must be at least 1")
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {args.dim}, "
          f"{args.queries} queries per batch search, k={args.k}", flush=True)
    rows: list[Row] = []
    for size in args.sizes:
        for kind in args.data:
            new = bench_one(kind, size, args)
            print(sweep_table(new, args.k).split("\n", 2)[2], flush=True)
            rows.extend(new)
    print()
    print(sweep_table(rows, args.k))
    print()
    print(best_table(rows, args.target_recall, args.k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
