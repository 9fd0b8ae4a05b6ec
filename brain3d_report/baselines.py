"""Baselines beside a run's model: the nearest training case's report, the most frequent training report, and a VLM
reading evenly spaced axial slices (the seed's 2D baseline), scored with the same metrics as ``evaluate``.

Example:
    python -m brain3d_report.baselines --run-dir runs/brain/r3
    python -m brain3d_report.baselines --run-dir runs/brain/r3 --vlm medgemma-4b --quantization 4bit --device cuda

- ``nearest_neighbour``: the report of the training volume most similar to each test volume by the run's pooled
  stage-1 embedding (``model.pooled``: the mean of the compressed visual tokens, centred as the contrastive stage
  centres it), searched exactly by cosine similarity (inner product of L2-normalised vectors) through
  ``common.retrieval``. In report generation this is
  a baseline that is hard to beat: it copies a real report of a similar scan.
- ``most_frequent``: the training report that occurs most often (ties go to the alphabetically first), the same
  for every case; with templated healthy controls it is one of their templates.
- ``slices_2d``: only with ``--vlm``: ``--slices`` evenly spaced axial slices of the preprocessed volume (64 by
  default, as the seed's MedGemma baseline), each resized to ``--slice-size`` pixels and given to the VLM as images
  of one chat turn with the seed's prompt; greedy decoding. Without ``--vlm`` it is listed as skipped. The VLM's
  vision tower encodes the slices ``--slice-chunk`` images at a time and the LM gets the encoded slices
  (``mm_encoder_outputs``), so the tower's memory does not grow with ``--slices`` or ``--batch-size`` (64 slices x
  8 volumes in one call is 512 images, which fits no GPU); the LM's context still holds every slice's tokens.
- ``model``: ``predictions/<split>.jsonl`` from ``brain3d_report.generate``, when it exists.

Writes ``baselines.json`` (per method: status, cases, the all-case metrics with intervals, and every group) and
``baselines.md`` into the run, and each baseline's reports as ``predictions/<split>_<method>.jsonl`` (so
``brain3d_report.evaluate --split <split>_<method>`` gives its full table). Intervals use ``--n-boot`` per-case
resamples (200 by default) and ``--n-boot-corpus`` for corpus BLEU/CIDEr (none by default, to keep this quick).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brain3d_report.data import SPLITS, Case, make_dataset
from brain3d_report.evaluate import (
    ci_text,
    make_scorer,
    metric_names,
    predictions_path,
    read_predictions,
    score_records,
)
from brain3d_report.generate import (
    PREDICTIONS_DIR,
    append_records,
    prepare_output,
    run_cases,
)
from brain3d_report.shared import (
    add_max_new_tokens_arg,
    add_run_data_args,
    add_scoring_args,
    add_split_arg,
    volume_cache_root,
)
from brain3d_report.train import PIPELINE, PROMPT, model_builder
from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int, require
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.metrics.text import TextScorer
from common.retrieval import make_index, search
from common.run_guard import guard_command
from common.rundir import atomic_write_json, atomic_write_text, recover_results, result_set
from common.runs import load_run
from common.tables import json_safe, markdown_table
from common.vlm import VLM_PRESETS

log = logging.getLogger("medvl.brain3d_report")

METHODS = ("model", "nearest_neighbour", "most_frequent", "slices_2d")
SLICE_PROMPT = "These are {n} axial FLAIR slices of one brain, from inferior to superior. "
"""Put before the seed's prompt, so the VLM knows what the images are."""


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True, precision=True, cache_dir=True, quantization=True)
    parser = MedvlArgumentParser(prog="python -m brain3d_report.baselines", description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="a brain3d_report run (any stage)")
    add_split_arg(parser, default="test", choices=SPLITS, help="the cases the baselines report on")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="volumes embedded or read together")
    add_run_data_args(parser)
    vlm = parser.add_argument_group("2D-slice baseline")
    vlm.add_argument("--vlm", default=None,
                     help=f"run it with this VLM ({', '.join(VLM_PRESETS)}, a folder or a hub id); default: skip")
    vlm.add_argument("--slices", type=positive_int, default=64, help="evenly spaced axial slices per volume")
    vlm.add_argument("--slice-size", type=positive_int, default=128, help="pixels of each slice image (square)")
    vlm.add_argument("--slice-chunk", type=positive_int, default=8,
                     help="slice images the VLM's vision tower encodes at a time (bounds its memory; the reports "
                          "do not depend on it)")
    add_max_new_tokens_arg(vlm, default=256)
    vlm.add_argument("--overwrite", action="store_true", help="start the 2D-slice predictions again")
    add_scoring_args(parser, n_boot=200, n_boot_corpus=0)
    return parser


# --- the baselines -----------------------------------------------------------------------------------------------

@torch.no_grad()
def pooled_embeddings(model, dataset, batch_size: int = 8) -> np.ndarray:
    """(N, D) stage-1 embeddings of every volume of a ``BrainVolumes`` dataset, as the contrastive stage compares
    them: ``model.pooled`` less the model's image centre where it keeps one (uncentred pooled vectors of different
    volumes can be nearly parallel, which leaves a cosine search nothing to rank by)."""
    device = model.projector.vis_scale.device
    centre = getattr(model, "image_center", None)
    rows = []
    for start in range(0, len(dataset), batch_size):
        volumes = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
        pooled = model.pooled(volumes.to(device)).float()
        rows.append((pooled - centre.float() if centre is not None else pooled).cpu())
    return torch.cat(rows).numpy()


def nearest_neighbour_reports(train_vectors: np.ndarray, train_reports: Sequence[str], query_vectors: np.ndarray
                              ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """For each query, the report of the training vector of highest cosine similarity (exact FAISS search).

    Returns:
        (reports, training positions, cosine similarities), one per query.
    """
    if len(train_vectors) != len(train_reports):
        raise ValueError(f"{len(train_vectors)} training vectors but {len(train_reports)} reports")
    index, info = make_index("cosine", np.asarray(train_vectors, dtype=np.float32))
    similarities, positions = search(index, info, np.asarray(query_vectors, dtype=np.float32), k=1)
    positions, similarities = positions[:, 0], similarities[:, 0]
    return [train_reports[int(p)] for p in positions], positions, similarities


def most_frequent_report(reports: Sequence[str]) -> str:
    """The report that occurs most often; among equally frequent ones the alphabetically first, so it is stable."""
    if not reports:
        raise ValueError("no reports to choose from")
    counts = Counter(reports)
    return min(counts, key=lambda text: (-counts[text], text))


def axial_slices(volume: torch.Tensor, n: int, size: int):
    """``n`` evenly spaced axial slices of a (1, D, H, W) volume in [0, 1] as RGB PIL images of ``size`` pixels.

    Shown as radiology viewers show axial slices of an RAS array: anterior up, the patient's left on the image's
    right (W runs posterior -> anterior, H left -> right in the preprocessed volume).
    """
    from PIL import Image

    array = volume[0].float().clamp(0, 1).cpu().numpy()
    chosen = np.unique(np.linspace(0, array.shape[0] - 1, min(n, array.shape[0])).round().astype(int))
    images = []
    for d in chosen:
        view = array[d].T[::-1, ::-1]  # rows: anterior first; columns: the patient's right first
        image = Image.fromarray(np.ascontiguousarray(view * 255).astype(np.uint8)).resize((size, size),
                                                                                          Image.BILINEAR)
        images.append(image.convert("RGB"))
    return images


def slice_conversation(images: list) -> list[dict[str, Any]]:
    """One user turn: every slice image, then the seed's prompt (prefixed with what the images are)."""
    text = SLICE_PROMPT.format(n=len(images)) + PROMPT.strip()
    return [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                         {"type": "text", "text": text}]}]


def chunked_slice_inputs(vlm, conversations: list[list[dict[str, Any]]], chunk: int) -> dict[str, Any]:
    """The VLM's inputs for a batch of slice conversations with the images already encoded, ``chunk`` images per
    vision-tower call (the same features as one call over all images, in the processor's order), handed to the
    model as ``mm_encoder_outputs`` in place of ``pixel_values``.

    Raises:
        ConfigError: on ``--vlm``, for a model that cannot take pre-encoded images.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, processor = vlm.model, vlm.processor
    if not getattr(model, "_supports_mm_encoder_outputs", lambda: False)() or not hasattr(model, "get_image_features"):
        raise ConfigError("--vlm", f"{type(model).__name__} cannot take pre-encoded images (mm_encoder_outputs); the "
                                   "2D-slice baseline needs an image-text-to-text model such as Gemma 3")
    processor.tokenizer.padding_side = "left"
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
    device = next(model.parameters()).device
    pixels = inputs.pop("pixel_values")
    with torch.no_grad():
        features = torch.cat([model.get_image_features(pixels[start : start + chunk].to(device, model.dtype),
                                                       return_dict=True).pooler_output
                              for start in range(0, len(pixels), chunk)])
    model_inputs = {key: value.to(device) for key, value in inputs.items()}
    model_inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    return model_inputs


def generate_slice_reports(vlm, conversations: list[list[dict[str, Any]]], max_new_tokens: int, chunk: int,
                           seed: int = 0) -> list[str]:
    """Greedy replies to slice conversations, the slices encoded ``chunk`` at a time (``chunked_slice_inputs``)."""
    inputs = chunked_slice_inputs(vlm, conversations, chunk)
    torch.manual_seed(seed)
    output = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    replies = vlm.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [reply.strip() for reply in replies]


def slice_reports(items: list[dict[str, Any]], dataset, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The 2D-slice baseline's records, generated into ``out`` resumably (a VLM over many cases takes long)."""
    from common.vlm import load_vlm

    settings = {"vlm": args.vlm, "slices": args.slices, "slice_size": args.slice_size,
                "quantization": args.quantization, "max_new_tokens": args.max_new_tokens, "greedy": True,
                "prompt": SLICE_PROMPT + PROMPT.strip()}
    done = prepare_output(out, settings, args.overwrite)
    todo = [i for i, item in enumerate(items) if item["id"] not in done]
    if todo:
        vlm = load_vlm(args.vlm, args.quantization, pick_device(args.device), args.precision, args.cache_dir,
                       seed=args.seed)
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            chats = [slice_conversation(axial_slices(dataset[i]["image"], args.slices, args.slice_size))
                     for i in batch]
            replies = generate_slice_reports(vlm, chats, args.max_new_tokens, args.slice_chunk, seed=args.seed)
            append_records(out, [{**items[i], "report": " ".join(r.split())} for i, r in zip(batch, replies)])
    by_id = {record["id"]: record for record in read_predictions(out)}
    return [by_id[item["id"]] for item in items]


# --- the table ---------------------------------------------------------------------------------------------------

def method_entry(records: list[dict[str, Any]], scorer: TextScorer, bootstrap: dict[str, int],
                 meteor_seed: bool = False) -> dict[str, Any]:
    groups = score_records(records, scorer, **bootstrap, meteor_seed=meteor_seed)
    return {"status": "ok", "n": len(records), "results": groups["all"].results,
            "groups": {name: scores.results for name, scores in groups.items()}, "notes": groups["all"].notes}


def baselines_table(methods: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per metric, one column per method (value [95% interval]); skipped methods say why."""
    ran = {name: entry["results"] for name, entry in methods.items() if entry["status"] == "ok"}
    rows = [{"metric": key, **{name: ci_text(results, key) if key in results else "" for name, results in
                               ran.items()}} for key in metric_names(*ran.values())]
    rows.insert(0, {"metric": "cases", **{name: str(methods[name]["n"]) for name in ran}})
    text = markdown_table(rows, ["metric", *ran])
    skipped = [f"- {name}: skipped ({entry['reason']})" for name, entry in methods.items() if entry["status"] != "ok"]
    return text + ("\n" + "\n".join(skipped) + "\n" if skipped else "")


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("data_root", "healthy_root", "volume_cache", "cache_dir"),
                  lock="run_dir")
    require(args, run_dir="the run whose stage-1 embedding and split the baselines use")
    recover_results(args.run_dir)
    device = pick_device(args.device)
    loaded = load_run(args.run_dir, PIPELINE, model_builder(device, args.cache_dir), device=device)
    cases = run_cases(loaded.meta, args.run_dir, args.data_root, args.healthy_root)
    train, target = cases.split("train"), cases.split(args.split)
    for name, part in (("train", train), (args.split, target)):
        if not part:
            raise DataError(args.run_dir / "split.csv", f"the {name} split has no case under {cases.source}")
    model_path = predictions_path(args.run_dir, args.split)
    model_records = read_predictions(model_path) if model_path.is_file() else None
    scorer = make_scorer(args)
    bootstrap = {"n_boot": args.n_boot, "n_boot_corpus": args.n_boot_corpus, "n_boot_meteor": args.n_boot_meteor,
                 "seed": args.seed}

    volume_size = loaded.meta["preprocessing"]["volume_size"]
    cache = volume_cache_root(args)
    datasets = {name: make_dataset(part, volume_size, cache) for name, part in (("train", train), ("target", target))}
    vectors = {name: pooled_embeddings(loaded.model, dataset, args.batch_size) for name, dataset in datasets.items()}
    items = [_item(case) for case in target]
    neighbours, positions, similarity = nearest_neighbour_reports(vectors["train"], [c.report for c in train],
                                                                  vectors["target"])
    frequent = most_frequent_report([c.report for c in train])
    records = {
        "nearest_neighbour": [{**item, "report": report, "neighbour": train[int(p)].id, "similarity": float(s)}
                              for item, report, p, s in zip(items, neighbours, positions, similarity)],
        "most_frequent": [{**item, "report": frequent} for item in items],
    }
    methods: dict[str, dict[str, Any]] = {}
    with scorer:
        methods["model"] = (method_entry(model_records, scorer, bootstrap, args.meteor_seed) if model_records else
                            {"status": "skipped", "n": 0, "reason": f"no {model_path.relative_to(args.run_dir)}; run "
                                                                   "brain3d_report.generate first"})
        for name, chosen in records.items():
            methods[name] = method_entry(chosen, scorer, bootstrap, args.meteor_seed)
        if args.vlm is None:
            methods["slices_2d"] = {"status": "skipped", "n": 0,
                                    "reason": "no --vlm given (e.g. --vlm medgemma-4b, the seed's)"}
        else:
            out = args.run_dir / PREDICTIONS_DIR / f"{args.split}_slices_2d.jsonl"
            slices = slice_reports(items, datasets["target"], out, args)
            methods["slices_2d"] = {**method_entry(slices, scorer, bootstrap, args.meteor_seed), "vlm": args.vlm,
                                    "slices": args.slices}

    summary = {"split": args.split, "methods": methods,
               "bootstrap": bootstrap, "embedding": "model.pooled of the run's vision encoder and compressor",
               "most_frequent_report": frequent}
    markdown = (f"# brain3d_report baselines: {args.split} ({len(target)} cases)\n\n" + baselines_table(methods)
                + f"\nIntervals: {args.n_boot} per-case resamples, {args.n_boot_corpus} for corpus BLEU/CIDEr "
                  f"(no interval shown where none was drawn).\n")
    with result_set(args.run_dir) as staging:
        atomic_write_json(staging / "baselines.json", json_safe(summary))
        atomic_write_text(staging / "baselines.md", markdown)
        for name, chosen in records.items():
            atomic_write_text(staging / PREDICTIONS_DIR / f"{args.split}_{name}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))
    print(markdown)
    return 0


def _item(case: Case) -> dict[str, Any]:
    return {"id": case.id, "reference": case.report, "healthy": case.healthy, "side": case.side}


__all__ = ["METHODS", "pooled_embeddings", "nearest_neighbour_reports", "most_frequent_report", "axial_slices",
           "slice_conversation", "chunked_slice_inputs", "generate_slice_reports", "baselines_table"]


if __name__ == "__main__":
    raise SystemExit(main())
