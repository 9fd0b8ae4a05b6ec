"""Case retrieval over the trained classifier's 512-d embeddings with FAISS: build, query and evaluate indexes.

Example:
    python -m pneumonia.retrieval build --run-dir runs/pneumonia/r18 --index all
    python -m pneumonia.retrieval query --run-dir runs/pneumonia/r18 --index cosine --ids 0 20 70
    python -m pneumonia.retrieval evaluate --run-dir runs/pneumonia/r18

The archive (``--archive``, default the train split: a hospital's history) is indexed; queries come from
``--query-split`` (default test: the new cases). With ``--archive test`` the seed's setting is reproduced, and a
query is then never returned as its own neighbour. Indexes: ``flat-l2`` (exact, the seed's), ``cosine`` (exact
inner product on L2-normalised embeddings), ``ivf-flat`` and ``hnsw`` (approximate; ``--ann-metric`` picks L2 or
cosine). Each is saved under RUN/retrieval/ as ``<name>.faiss`` with a ``<name>.json`` sidecar (dimension,
metric, archive split, ids, labels, the sha256 of the model weights), beside the archive embeddings.
``evaluate`` scores neighbours by label agreement (precision@k, mAP@k) and the approximate indexes by their
recall against exact search of the same metric, and writes results.md/json/csv and a gallery figure there.
``--output-dir`` moves that directory elsewhere; ``query`` and ``evaluate`` take the archive from the sidecar.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from common.cli import MedvlArgumentParser, base_parser, nonnegative_int, parse_args, positive_int, seed_int
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.metrics.retrieval import (
    average_precision_at_k,
    precision_at_k_per_query,
    recall_against_exact,
    relevant_counts,
)
from common.retrieval import (
    EXACT_INDEXES,
    INDEXES,
    available_indexes,
    file_sha256,
    index_paths,
    load_index,
    make_index,
    save_index,
    search,
    set_search_params,
)
from common.run_guard import guard_command
from common.rundir import (
    WEIGHTS_FILE,
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_text,
    find_model_dir,
    recover_results,
    result_set,
)
from common.tables import markdown_table, metrics_with_ci, write_results
from pneumonia.data import SPLITS, MedMNISTSplits
from pneumonia.model import PneumoniaNet, embed_images, load_run_and_data
from pneumonia.shared import add_n_boot_arg, add_run_args

COMMANDS = ("build", "query", "evaluate")
RETRIEVAL_DIR = "retrieval"
EVAL_KS = (1, 5, 10)


def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=MedvlArgumentParser)
    shared = base_parser(output_dir=True, device=True)
    add_run_args(shared)
    shared.add_argument("--index", default="all", choices=(*INDEXES, "all"),
                        help="which index; 'all' builds every kind, or uses every one built for query/evaluate")
    shared.add_argument("--batch-size", type=positive_int, default=256, help="images per embedding batch")
    seeded = MedvlArgumentParser(add_help=False)
    seeded.add_argument("--seed", type=seed_int, default=0, help="seed of IVF training (build) or the bootstrap")
    search = MedvlArgumentParser(add_help=False)
    group = search.add_argument_group("search")
    group.add_argument("--query-split", default="test", choices=SPLITS, help="split the queries come from")
    group.add_argument("--k", type=positive_int, default=10, help="neighbours per query")
    group.add_argument("--ids", type=nonnegative_int, nargs="+", default=None,
                       help="query ids (indices into the query split); evaluate: the gallery's queries")
    group.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists searched (default: the build's)")
    group.add_argument("--ef-search", type=positive_int, default=None, help="HNSW breadth (default: the build's)")

    build_cmd = commands.add_parser("build", parents=[shared, seeded], help="embed the archive and build indexes",
                                    description="Embed the archive split and build the indexes with their sidecars.")
    build_cmd.add_argument("--archive", default="train", choices=SPLITS, help="split to index")
    build_cmd.add_argument("--ann-metric", default="l2", choices=("l2", "cosine"), help="metric of ivf-flat and hnsw")
    build_cmd.add_argument("--nlist", type=positive_int, default=None,
                           help="IVF lists (default round(sqrt(archive size)))")
    build_cmd.add_argument("--nprobe", type=positive_int, default=8, help="IVF lists searched by default")
    build_cmd.add_argument("--hnsw-m", type=positive_int, default=32, help="HNSW neighbours per node")
    build_cmd.add_argument("--ef-construction", type=positive_int, default=64, help="HNSW build breadth")
    build_cmd.add_argument("--ef-search", type=positive_int, default=64, help="HNSW search breadth by default")
    query_cmd = commands.add_parser("query", parents=[shared, search], help="neighbours of some queries",
                                    description="Print (and write as CSV) the neighbours of the chosen queries.")
    query_cmd.add_argument("--n-queries", type=positive_int, default=5, help="how many first queries without --ids")
    evaluate_cmd = commands.add_parser("evaluate", parents=[shared, search, seeded], help="score every query",
                                       description="Score every query of the split: P@k, mAP@k, recall vs exact.")
    add_n_boot_arg(evaluate_cmd)
    evaluate_cmd.add_argument("--gallery-queries", type=positive_int, default=4, help="queries shown in the gallery")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Indexes and their sidecars


def model_sha256(run_dir: Path) -> str:
    """Digest of the weights, so an index is never searched with embeddings from another model."""
    return file_sha256(find_model_dir(run_dir) / WEIGHTS_FILE)


# ---------------------------------------------------------------------------------------------------------------
# Run-level steps


@dataclass
class RetrievalContext:
    """The model, its data and where the indexes live, loaded once per command."""

    run_dir: Path
    directory: Path
    model: PneumoniaNet
    meta: dict
    device: torch.device
    sha: str
    data: MedMNISTSplits
    batch_size: int

    @property
    def dim(self) -> int:
        return self.model.embedding_dim

    def embed(self, split: str) -> np.ndarray:
        return embed_images(self.model, self.data.images[split], self.batch_size, self.device)

    def load_index(self, name: str) -> tuple[faiss.Index, dict]:
        """An index of this run's directory, checked against this model's embeddings, weights and data."""
        index, info = load_index(self.directory, name, self.dim, required=("archive_split", "labels", "model_sha256"),
                                 expect={"model_sha256": self.sha},
                                 build_hint=f"run `python -m pneumonia.retrieval build --index {name}`",
                                 mismatch="built from other model weights than this run's")
        sidecar = self.directory / f"{name}.json"
        split = info["archive_split"]
        if split not in self.data.labels:
            raise DataError(sidecar, f"archive_split {split!r} is not one of {', '.join(self.data.labels)}")
        n_classes, n_archive = len(self.meta["labels"]), len(self.data.labels[split])
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_classes for v in info["labels"]):
            raise DataError(sidecar, f"labels must be class indices 0..{n_classes - 1}; rebuild the index")
        if any(i >= n_archive for i in info["ids"]):
            raise DataError(sidecar, f"ids beyond the {n_archive} images of the {split} split (other data?); "
                                     "rebuild the index")
        return index, info

    def self_positions(self, info: dict, query_split: str, query_ids: np.ndarray) -> np.ndarray | None:
        if info["archive_split"] != query_split:
            return None
        position = {int(i): p for p, i in enumerate(info["ids"])}
        return np.array([position.get(int(q), -1) for q in query_ids], dtype=np.int64)


def open_run(run_dir: Path, data_root: Path | None = None, output_dir: Path | None = None, device: str = "auto",
             batch_size: int = 256) -> RetrievalContext:
    run_dir = Path(run_dir)
    sha = model_sha256(run_dir)
    torch_device = pick_device(device)
    model, meta, data = load_run_and_data(run_dir, data_root, device=torch_device)
    directory = Path(output_dir) if output_dir else run_dir / RETRIEVAL_DIR
    if directory.exists() and not directory.is_dir():
        raise ConfigError("--output-dir", f"{directory} is a file, not a directory")
    recover_results(directory)  # finish or drop a set of files that a kill interrupted
    return RetrievalContext(run_dir, directory, model, meta, torch_device, sha, data, batch_size)


def _selected(ctx: RetrievalContext, index: str) -> list[str]:
    if index != "all":
        return [index]
    names = available_indexes(ctx.directory)
    if not names:
        raise DataError(ctx.directory, "no index built here; run `python -m pneumonia.retrieval build` first")
    return names


def build(ctx: RetrievalContext, names: Sequence[str], archive: str = "train", ann_metric: str = "l2",
          nlist: int | None = None, nprobe: int | None = None, hnsw_m: int = 32, ef_construction: int = 64,
          ef_search: int | None = None, seed: int = 0) -> list[dict]:
    """Embed the archive split once and write each index with its sidecar and the embeddings."""
    vectors = ctx.embed(archive)
    labels = ctx.data.labels[archive]
    embeddings_file = f"embeddings_{archive}.npy"
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    infos = []
    with result_set(ctx.directory) as staging:  # embeddings, indexes and sidecars replace the old ones together
        atomic_write_bytes(staging / embeddings_file, buffer.getvalue())
        for name in names:
            start = time.perf_counter()
            index, info = make_index(name, vectors, ann_metric, nlist, nprobe or 8, hnsw_m, ef_construction,
                                     ef_search or 64, seed)
            info.update({"archive_split": archive, "ids": list(range(len(labels))), "labels": labels.tolist(),
                         "model_sha256": ctx.sha, "embeddings_file": embeddings_file,
                         "data_file": ctx.data.path.name, "image_size": ctx.meta["preprocessing"]["image_size"],
                         "build_s": round(time.perf_counter() - start, 4)})
            save_index(staging, index, info)
            infos.append(info)
    return infos


def exact_reference(ctx: RetrievalContext, info: dict) -> tuple[faiss.Index, dict]:
    """Exact search with the same metric as ``info`` over the stored archive embeddings."""
    name = info.get("embeddings_file", f"embeddings_{info['archive_split']}.npy")
    if not isinstance(name, str) or Path(name).name != name:
        raise DataError(ctx.directory / f"{info['index']}.json", "embeddings_file must be a file name in this folder")
    path = ctx.directory / name
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(path, f"archive embeddings missing or unreadable ({err}); rebuild with `build`") from err
    if vectors.shape != (len(info["ids"]), info["dim"]):
        raise DataError(path, f"holds {vectors.shape} embeddings, the index {len(info['ids'])}x{info['dim']}")
    kind = "cosine" if info["normalised"] else "flat-l2"
    index, exact_info = make_index(kind, vectors)
    return index, exact_info


def query(ctx: RetrievalContext, names: Sequence[str], query_split: str, query_ids: np.ndarray, k: int,
          nprobe: int | None = None, ef_search: int | None = None) -> pd.DataFrame:
    """Neighbours of the given queries in each index, one row per (index, query, rank), also written as CSV."""
    _check_ids(ctx, query_split, query_ids)
    embeddings = embed_images(ctx.model, ctx.data.images[query_split][query_ids], ctx.batch_size, ctx.device)
    labels = ctx.data.labels[query_split][query_ids]
    class_names = ctx.meta["labels"]
    frames, tables = [], {}
    for name in names:
        index, info = ctx.load_index(name)
        set_search_params(index, info, nprobe, ef_search)
        distances, positions = search(index, info, embeddings, k, ctx.self_positions(info, query_split, query_ids))
        archive_ids, archive_labels = np.asarray(info["ids"]), np.asarray(info["labels"])
        rows = [{"index": name, "query_split": query_split, "query_id": int(q), "query_label": class_names[lab],
                 "rank": r + 1, "archive_split": info["archive_split"], "neighbour_id": int(archive_ids[p]),
                 "neighbour_label": class_names[archive_labels[p]], "distance": float(d)}
                for q, lab, ds, ps in zip(query_ids, labels, distances, positions)
                for r, (d, p) in enumerate(zip(ds, ps)) if p >= 0]
        frame = pd.DataFrame(rows)
        tables[f"query_{name}.csv"] = frame.to_csv(index=False)
        frames.append(frame)
    with result_set(ctx.directory) as staging:
        for file_name, text in tables.items():
            atomic_write_text(staging / file_name, text)
    return pd.concat(frames, ignore_index=True)


def _check_ids(ctx: RetrievalContext, split: str, ids: np.ndarray) -> None:
    n = len(ctx.data.labels[split])
    bad = [int(i) for i in ids if not 0 <= i < n]
    if bad:
        raise ConfigError("--ids", f"{bad} outside the {split} split (ids 0..{n - 1})")


def evaluate(ctx: RetrievalContext, names: Sequence[str], query_split: str = "test", k: int = 10,
             nprobe: int | None = None, ef_search: int | None = None, n_boot: int = 1000, seed: int = 0,
             gallery_queries: int = 4, gallery_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Score every index on all queries of ``query_split``; write results.md/json/csv and a gallery figure."""
    ks = tuple(sorted({kk for kk in EVAL_KS if kk <= k} | {k}))
    loaded = [ctx.load_index(name) for name in names]
    query_labels = ctx.data.labels[query_split]
    query_ids = np.arange(len(query_labels))
    chosen = _gallery_queries(query_labels, gallery_queries) if gallery_ids is None else np.asarray(gallery_ids)
    _check_ids(ctx, query_split, chosen)
    query_embeddings = ctx.embed(query_split)
    results: dict[str, Any] = {"query_split": query_split, "n_queries": int(len(query_labels))}
    summary, gallery_source = [], None
    for name, (index, info) in zip(names, loaded):
        set_search_params(index, info, nprobe, ef_search)
        self_positions = ctx.self_positions(info, query_split, query_ids)
        start = time.perf_counter()
        distances, positions = search(index, info, query_embeddings, k, self_positions)
        ms_per_query = 1000 * (time.perf_counter() - start) / len(query_ids)
        if positions.shape[1] < k or (positions < 0).any():
            raise DataError(index_paths(ctx.directory, name)[0], f"returned fewer than k={k} neighbours for some "
                                                                 "queries; lower --k or raise --nprobe")
        archive_labels = np.asarray(info["labels"])
        neighbour_labels = archive_labels[positions]
        n_relevant = relevant_counts(query_labels, archive_labels, query_in_archive=self_positions is not None)
        exact_positions = positions
        if name not in EXACT_INDEXES:
            exact_index, exact_info = exact_reference(ctx, info)
            _, exact_positions = search(exact_index, exact_info, query_embeddings, k, self_positions)
        def retrieval_metrics(a: dict[str, np.ndarray], name: str = name) -> dict[str, float]:
            out = {}
            for kk in ks:
                out[f"{name}/precision_at_{kk}"] = precision_at_k_per_query(a["query"], a["neighbours"], kk).mean()
                out[f"{name}/map_at_{kk}"] = average_precision_at_k(a["query"], a["neighbours"], kk,
                                                                    a["relevant"]).mean()
            if name not in EXACT_INDEXES:
                out[f"{name}/recall_at_{k}_vs_exact"] = recall_against_exact(a["positions"], a["exact"], k)
            return out

        arrays = {"query": query_labels, "neighbours": neighbour_labels, "relevant": n_relevant,
                  "positions": positions, "exact": exact_positions}
        scored = metrics_with_ci(retrieval_metrics, arrays, n_boot=n_boot, seed=seed)
        results.update(scored)
        results[f"{name}/ms_per_query"] = ms_per_query
        row = {"index": name, "metric": _metric_name(info), "archive": f"{info['archive_split']} ({len(info['ids'])})"}
        row.update({f"P@{kk}": scored[f"{name}/precision_at_{kk}"] for kk in ks})
        row[f"mAP@{k}"] = scored[f"{name}/map_at_{k}"]
        row[f"recall@{k} vs exact"] = scored.get(f"{name}/recall_at_{k}_vs_exact", 1.0)
        row["ms/query"] = ms_per_query
        row["settings"] = ", ".join(f"{key}={value}" for key, value in info["params"].items()) or "exact"
        summary.append(row)
        if gallery_source is None:
            gallery_source = (name, info, distances, positions)

    name, info, distances, positions = gallery_source
    gallery_path = ctx.directory / f"gallery_{name}.png"
    with result_set(ctx.directory) as staging:
        retrieval_gallery(ctx.data.images[query_split], query_labels, chosen,
                          ctx.data.images[info["archive_split"]], np.asarray(info["ids"]), np.asarray(info["labels"]),
                          positions[chosen], distances[chosen], ctx.meta["labels"], _metric_name(info),
                          staging / gallery_path.name)
        size = ctx.meta["preprocessing"]["image_size"]
        write_results(staging, results, f"PneumoniaMNIST retrieval ({ctx.meta['preset']}, {size} px)",
                      _extra_markdown(summary, query_split, gallery_path.name, k))
    return {"results": results, "summary": summary, "gallery": gallery_path}


def _metric_name(info: dict) -> str:
    return "cosine" if info["normalised"] else "squared L2"


def _gallery_queries(labels: np.ndarray, n: int) -> np.ndarray:
    """The first queries of each class in turn, so both classes appear."""
    per_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    chosen = []
    while len(chosen) < min(n, len(labels)):
        for ids in per_class:
            if ids and len(chosen) < n:
                chosen.append(ids.pop(0))
    return np.array(chosen, dtype=np.int64)


def _extra_markdown(summary: list[dict], query_split: str, gallery_name: str, k: int) -> str:
    return ("## Indexes\n\n" + markdown_table(summary) +
            f"\nQueries: every image of the {query_split} split; a query that lies in the archive is never its own "
            "neighbour. A neighbour is relevant when it has the query's label. AP@k = sum over relevant ranks i <= k "
            f"of P@i, divided by min(k, relevant items in the archive). Recall@{k} vs exact: share of the exact "
            f"top-{k} (same metric) that the approximate index returns.\n\n![gallery]({gallery_name})\n")


def retrieval_gallery(query_images: np.ndarray, query_labels: np.ndarray, query_ids: np.ndarray,
                      archive_images: np.ndarray, archive_ids: np.ndarray, archive_labels: np.ndarray,
                      positions: np.ndarray, distances: np.ndarray, class_names: Sequence[str], metric: str,
                      path: Path) -> Path:
    """One row per query: the query, then its neighbours titled by label and distance, green when labels agree."""
    nrows, ncols = len(query_ids), positions.shape[1] + 1
    fig = Figure(figsize=(1.35 * ncols, 1.75 * nrows))
    short = "cos" if metric == "cosine" else "d²"
    for row, (q, ps, ds) in enumerate(zip(query_ids, positions, distances)):
        ax = fig.add_subplot(nrows, ncols, row * ncols + 1)
        ax.imshow(query_images[q], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"query {q}\n{class_names[query_labels[q]]}", fontsize=7, fontweight="bold")
        ax.set_axis_off()
        for col, (p, d) in enumerate(zip(ps, ds)):
            ax = fig.add_subplot(nrows, ncols, row * ncols + col + 2)
            ax.imshow(archive_images[archive_ids[p]], cmap="gray", vmin=0, vmax=255)
            agree = archive_labels[p] == query_labels[q]
            ax.set_title(f"#{col + 1} id {archive_ids[p]}\n{class_names[archive_labels[p]]} {short}={d:.2f}",
                         fontsize=6, color="tab:green" if agree else "tab:red")
            ax.set_axis_off()
    fig.suptitle(f"Query (left) and its nearest archive cases; green = same label ({metric})", fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    return path


def run_section(run_dir: Path, out_dir: Path) -> str:
    """Build every index for a trained run, evaluate it, and return the Markdown section of the demo report."""
    ctx = open_run(run_dir)
    build(ctx, INDEXES)
    outcome = evaluate(ctx, INDEXES, n_boot=200)
    gallery = os.path.relpath(outcome["gallery"], out_dir)
    return ("## Pneumonia: case retrieval\n\n"
            "Train-split archive, test-split queries, 512-d embeddings of the trained classifier; a neighbour counts "
            "as relevant when its label matches the query's.\n\n" + markdown_table(outcome["summary"]) +
            f"\n![retrieval gallery]({gallery})\n")


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root",), runs=("run_dir",),
                  lock=None if args.command == "query" else "output_dir" if args.output_dir else "run_dir",
                  create=args.output_dir is not None)
    ctx = open_run(args.run_dir, args.data_root, args.output_dir, args.device, args.batch_size)
    if args.command == "build":
        names = INDEXES if args.index == "all" else (args.index,)
        for info in build(ctx, names, args.archive, args.ann_metric, args.nlist, args.nprobe, args.hnsw_m,
                          args.ef_construction, args.ef_search, args.seed):
            print(f"{info['index']}: {len(info['ids'])} {info['archive_split']} vectors, {info['dim']}-d, "
                  f"{_metric_name(info)}, built in {info['build_s']:.2f} s -> {ctx.directory / info['index']}.faiss")
        return 0
    names = _selected(ctx, args.index)
    if args.command == "query":
        n = len(ctx.data.labels[args.query_split])
        ids = np.asarray(args.ids if args.ids is not None else range(min(args.n_queries, n)), dtype=np.int64)
        frame = query(ctx, names, args.query_split, ids, args.k, args.nprobe, args.ef_search)
        print(frame.to_string(index=False))
        return 0
    if len(ctx.data.labels[args.query_split]) == 0:
        raise DataError(ctx.data.path, f"the {args.query_split} split is empty")
    evaluate(ctx, names, args.query_split, args.k, args.nprobe, args.ef_search, args.n_boot, args.seed,
             args.gallery_queries, args.ids)
    print((ctx.directory / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
