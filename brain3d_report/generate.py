"""Generate reports with a trained brain3d_report run, into a resumable JSONL file.

Example (CPU, a tiny run trained by ``brain3d_report.train``):
    python -m brain3d_report.generate --run-dir runs/brain/r3 --split test
    python -m brain3d_report.generate --run-dir runs/brain/r3 --split test --shuffle-volumes
    python -m brain3d_report.generate --run-dir runs/brain/r3 --input BraTS20_Training_001_flair.nii.gz

Inputs: ``--split S`` takes the cases of one split of the run's ``split.csv`` (under the data the run was trained
on, or ``--data-root``); ``--input`` one FLAIR NIfTI; ``--input-dir`` the NIfTI files in a folder or, when it holds
none, its BraTS case folders (with their TextBraTS reports as references when present).

Decoding is the seed's (BrainGemma3D): sampling at temperature 0.1 with top-p 0.9, repetition penalty 1.2, no
repeated 3-grams (``--no-repeat-ngram-size``, default ``NO_REPEAT_NGRAM_SIZE``), at most 256 new tokens, after
[32 visual tokens; the seed's prompt] with no chat template. Every
batch is drawn under a seed derived from ``--seed`` and the batch's position, so a run is repeatable; ``--greedy``
drops sampling (keeping the penalties) for outputs that do not depend on the random state at all. The prompt is
the same for every case, so the LM's inputs of a batch have equal length and need no padding.

Output: ``RUN/predictions/<split>.jsonl`` (``inputs.jsonl`` for ``--input``/``--input-dir``), one line per case:
``id, reference, report, seconds, healthy, side`` (and ``volume_id`` when it differs from ``id``), with the
settings in ``<name>.meta.json`` beside it. Lines are appended and flushed batch by batch: a rerun skips the cases
already written, a line cut short by a kill is dropped and redone, and a rerun with other settings is refused
(``--overwrite`` starts again). ``--shuffle-volumes`` pairs every reference with another case's volume (a fixed
derangement under ``--seed``) into ``<split>_shuffled.jsonl``: the control that shows whether the reports depend on
the volume at all. ``--quick`` takes four cases and 48 new tokens into ``<split>_quick.jsonl``, for smoke runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brain3d_report.data import (
    SPLITS,
    Case,
    Cases,
    check_nifti,
    load_cases,
    load_volume,
    make_dataset,
    report_side,
)
from brain3d_report.shared import add_max_new_tokens_arg, add_run_data_args, add_split_arg, volume_cache_root
from brain3d_report.train import PIPELINE, PROMPT, model_builder, prompt_tokens
from common.cli import (
    MedvlArgumentParser,
    base_parser,
    nonnegative_int,
    parse_args,
    positive_float,
    positive_int,
    require,
)
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.feature_cache import file_digest
from common.run_guard import guard_command
from common.rundir import WEIGHTS_FILE, atomic_write_json, read_jsonl, recover_results
from common.runs import load_run, read_run_record

log = logging.getLogger("medvl.brain3d_report")

PREDICTIONS_DIR = "predictions"
INPUTS_NAME = "inputs"
SEED_DECODING = {"temperature": 0.1, "top_p": 0.9, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}
NO_REPEAT_NGRAM_SIZE = 3
"""``--no-repeat-ngram-size`` by default, for every LM (explain and predict use it too). The seed bans repeated
3-grams, which forbids saying "in the left" twice: 89% of the TextBraTS reports and every phantom report do. The
seed's 3 until the validation comparison of 0 and 3 (README, "Offline numbers") has chosen."""
"""The seed's sampling settings (``braingemma3d_evaluation.py``)."""
MAX_NEW_TOKENS = 256
QUICK_CASES, QUICK_TOKENS = 4, 48
CAPTION_STAGES = ("warmup", "lora")
"""Stages whose projector was trained to caption; a contrastive run's projector is still at its initialisation."""
FIELDS = ("id", "reference", "report", "seconds", "healthy", "side")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True, cache_dir=True)
    parser = MedvlArgumentParser(prog="python -m brain3d_report.generate", description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="a warmup or lora run (RUN/best/model.json)")
    source = parser.add_argument_group("input (one of)")
    add_split_arg(source, default=None, help=f"a split of the run's split.csv: {', '.join(SPLITS)}")
    source.add_argument("--input", type=Path, default=None, help="one FLAIR NIfTI file")
    source.add_argument("--input-dir", type=Path, default=None,
                        help="a folder of FLAIR NIfTI files, or of BraTS case folders <ID>/<ID>_flair.nii.gz")
    add_run_data_args(parser)
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--greedy", action="store_true",
                          help="greedy decoding (with the seed's penalties) instead of the seed's sampling")
    decoding.add_argument("--repetition-penalty", type=positive_float, default=SEED_DECODING["repetition_penalty"],
                          help="penalty on the logits of tokens already generated (1 = none; default the seed's)")
    decoding.add_argument("--no-repeat-ngram-size", type=nonnegative_int, default=NO_REPEAT_NGRAM_SIZE,
                          help=f"ban every n-gram of this length from recurring (0 = no ban; default "
                               f"{NO_REPEAT_NGRAM_SIZE}, the seed's)")
    add_max_new_tokens_arg(decoding, default=None,
                           help=f"longest report written, in tokens (default {MAX_NEW_TOKENS}, the seed's; "
                                f"{QUICK_TOKENS} with --quick)")
    decoding.add_argument("--batch-size", type=positive_int, default=4, help="volumes generated together")
    out = parser.add_argument_group("output")
    out.add_argument("--shuffle-volumes", action="store_true",
                     help="control: pair each reference with another case's volume (--split only)")
    out.add_argument("--quick", action="store_true",
                     help=f"smoke run: {QUICK_CASES} cases, {QUICK_TOKENS} new tokens, into <split>_quick.jsonl")
    out.add_argument("--out", type=Path, default=None, help="predictions JSONL (default RUN/predictions/<name>.jsonl)")
    out.add_argument("--overwrite", action="store_true", help="start the predictions file again")
    return parser


def run_cases(meta: dict, run_dir: Path, data_root: Path | None = None, healthy_root: Path | None = None) -> Cases:
    """The cases of a run with the split it trained on (its ``split.csv``), under its data root or ``data_root``."""
    split_csv = Path(run_dir) / "split.csv"
    if not split_csv.is_file():
        raise DataError(split_csv, "the run has no split.csv (is it a brain3d_report run?)")
    root = Path(data_root) if data_root is not None else Path(meta["data"]["root"])
    return load_cases(root, reports=meta["data"].get("reports"), healthy_root=healthy_root, split=split_csv)


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation without fixed points (Sattolo's algorithm: a uniformly random n-cycle), fixed by ``seed``."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    perm = np.arange(n)
    rng = np.random.default_rng([seed, 0x5EED])
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of one batch: fixed by ``--seed`` and the batch's position, so a resumed run draws the same."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def decoding_kwargs(greedy: bool, max_new_tokens: int,
                    repetition_penalty: float = SEED_DECODING["repetition_penalty"],
                    no_repeat_ngram_size: int = SEED_DECODING["no_repeat_ngram_size"]) -> dict[str, Any]:
    """``generate`` arguments: the seed's sampling, or greedy search; the seed's penalties unless given."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": not greedy,
                              "repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size}
    if not greedy:
        kwargs.update(temperature=SEED_DECODING["temperature"], top_p=SEED_DECODING["top_p"])
    return kwargs


@torch.no_grad()
def generate_reports(model, volumes: torch.Tensor, decoding: dict[str, Any], seed: int = 0) -> list[str]:
    """Reports for a (B, 1, D, H, W) batch: [visual tokens; prompt] as ``inputs_embeds``, then ``lm.generate``.

    Sampling draws from torch's global generator, so it is seeded here (inside ``fork_rng``, leaving the caller's
    random state as it was).
    """
    tokenizer = model.tokenizer
    device = model.lm.get_input_embeddings().weight.device
    prompt = prompt_tokens(tokenizer).to(device).expand(len(volumes), -1)
    embeds, mask = model.inputs_embeds(volumes.to(device), prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # transformers notes that the penalties then see only the new tokens: the prompt is embeddings, not ids.
        warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)`")
        torch.manual_seed(seed)
        output = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=pad, **decoding)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    return [" ".join(text.split()) for text in texts]


# --- the resumable predictions file ----------------------------------------------------------------------------

def complete_lines(path: Path) -> None:
    """Drop a last line cut short by a kill, so appended lines start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def done_ids(path: Path) -> set[str]:
    """Ids already in a predictions file (a malformed line other than the last is a DataError naming the file)."""
    if not path.is_file():
        return set()
    return {str(record.get("id")) for record in read_jsonl(path)}


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append JSON lines and flush them to disk, so a kill loses at most the batch in flight."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def meta_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.name.removesuffix(".jsonl") + ".meta.json")


def prepare_output(path: Path, settings: dict[str, Any], overwrite: bool) -> set[str]:
    """Check (or start) a predictions file against its settings; returns the ids already done.

    A file made with other settings is refused, because a resumed file must read as if written in one go.
    """
    sidecar = meta_path(path)
    if path.is_dir():
        raise ConfigError("--out", f"{path} is a directory; name the JSONL file")
    if overwrite:
        path.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
    complete_lines(path)
    done = done_ids(path)
    if done:
        try:
            before = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            before = None
        if not isinstance(before, dict) or before.get("settings") != settings:
            changed = sorted(k for k in settings if not isinstance(before, dict)
                             or before.get("settings", {}).get(k) != settings[k])
            raise ConfigError("--overwrite", f"{path} holds {len(done)} reports made with other settings "
                                             f"({', '.join(changed) or 'no settings file'}); rerun with the same "
                                             "ones, or pass --overwrite to start again")
    atomic_write_json(sidecar, {"settings": settings, "fields": list(FIELDS)})
    return done


def write_predictions(model, items: Sequence[dict[str, Any]], volume: Callable[[int], torch.Tensor], out: Path,
                      decoding: dict[str, Any], batch_size: int, seed: int, done: set[str]) -> int:
    """Generate the reports of ``items`` not in ``done`` and append them to ``out``; returns how many were written.

    Batches are cut from the whole list, not from what is left, so a resumed run draws every batch under the same
    seed and with the same companions as an uninterrupted one; a batch cut short by a kill is generated again
    whole and only its missing lines are written.
    """
    written = 0
    for index, start in enumerate(range(0, len(items), batch_size)):
        batch = list(range(start, min(start + batch_size, len(items))))
        if all(items[i]["id"] in done for i in batch):
            continue
        volumes = torch.stack([volume(i) for i in batch])
        began = time.perf_counter()
        reports = generate_reports(model, volumes, decoding, batch_seed(seed, index))
        seconds = (time.perf_counter() - began) / len(batch)
        records = [{**items[i], "report": report, "seconds": round(seconds, 4)}
                   for i, report in zip(batch, reports) if items[i]["id"] not in done]
        append_records(out, records)
        written += len(records)
        log.info("generated %d of %d", start + len(batch), len(items))
    return written


# --- inputs ------------------------------------------------------------------------------------------------------

_NIFTI = re.compile(r"\.nii(\.gz)?$")


def nifti_id(path: Path) -> str:
    return _NIFTI.sub("", Path(path).name)


def split_items(cases: Cases, split: str) -> list[dict[str, Any]]:
    if split not in SPLITS:
        raise ConfigError("--split", f"choose one of {', '.join(SPLITS)}, not {split!r}")
    chosen = cases.split(split)
    if not chosen:
        raise DataError(cases.source, f"the run's {split} split has no case under this data root")
    return [{"id": c.id, "reference": c.report, "healthy": c.healthy, "side": c.side, "flair": c.flair}
            for c in chosen]


def input_items(input_file: Path | None, input_dir: Path | None) -> list[dict[str, Any]]:
    """Items of ``--input`` or ``--input-dir``; every NIfTI (header and voxels) is checked before anything is
    written."""
    if input_file is not None:
        check_nifti(input_file, voxels=True)
        return [{"id": nifti_id(input_file), "reference": "", "healthy": None, "side": None, "flair": input_file}]
    if not input_dir.is_dir():
        raise DataError(input_dir, "--input-dir does not exist or is not a directory")
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and _NIFTI.search(p.name))
    if files:
        items = []
        for path in files:
            check_nifti(path, voxels=True)
            items.append({"id": nifti_id(path), "reference": "", "healthy": None, "side": None, "flair": path})
        ids = [item["id"] for item in items]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise DataError(input_dir, f"two files for id {twice[0]} (.nii and .nii.gz?); keep one")
        return items
    cases = load_cases(input_dir, split=None, require_reports=False)
    for case in cases:
        check_nifti(case.flair, voxels=True)
    return [{"id": c.id, "reference": c.report, "healthy": c.healthy,
             "side": report_side(c.report) if c.report else None, "flair": c.flair} for c in cases]


def quick_subset(n: int) -> list[int]:
    """Evenly spaced positions of at most ``QUICK_CASES`` cases (tumour cases come first, controls last)."""
    return sorted(set(np.linspace(0, n - 1, min(n, QUICK_CASES)).round().astype(int).tolist()))


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("out",), reads=("data_root", "healthy_root", "volume_cache", "cache_dir", "input",
                  "input_dir"), runs=("run_dir",), lock="run_dir")
    require(args, run_dir="the trained run whose model writes the reports")
    chosen = [flag for flag, value in (("--split", args.split), ("--input", args.input),
                                       ("--input-dir", args.input_dir)) if value is not None]
    if len(chosen) != 1:
        raise ConfigError("--split", "give exactly one of --split, --input or --input-dir"
                          + (f" (got {', '.join(chosen)})" if chosen else ""))
    if args.shuffle_volumes and args.split is None:
        raise ConfigError("--shuffle-volumes", "needs --split (the references of the run's cases)")
    items = None if args.split is not None else input_items(args.input, args.input_dir)
    recover_results(args.run_dir)
    meta, model_dir = read_run_record(args.run_dir, PIPELINE, CAPTION_STAGES)
    volume_size = tuple(meta["preprocessing"]["volume_size"])
    if items is None:
        items = split_items(run_cases(meta, args.run_dir, args.data_root, args.healthy_root), args.split)
    name = args.split if args.split is not None else INPUTS_NAME
    flairs = [item.pop("flair") for item in items]
    sources = list(range(len(items)))
    if args.shuffle_volumes:
        if len(items) < 2:
            raise DataError(args.run_dir / "split.csv", f"the {args.split} split has one case; nothing to shuffle")
        sources = derangement(len(items), args.seed).tolist()
        for item, source in zip(items, sources):
            item["volume_id"] = items[source]["id"]
        name += "_shuffled"
    positions = quick_subset(len(items)) if args.quick else list(range(len(items)))
    items, sources = [items[i] for i in positions], [sources[i] for i in positions]
    if args.quick:
        name += "_quick"
    max_new_tokens = args.max_new_tokens or (QUICK_TOKENS if args.quick else MAX_NEW_TOKENS)
    out = args.out or args.run_dir / PREDICTIONS_DIR / f"{name}.jsonl"

    settings = {"model_sha256": file_digest(model_dir / WEIGHTS_FILE), "stage": meta["stage"],
                "prompt": PROMPT, "greedy": args.greedy, "max_new_tokens": max_new_tokens,
                "decoding": decoding_kwargs(args.greedy, max_new_tokens, args.repetition_penalty,
                                            args.no_repeat_ngram_size), "seed": args.seed,
                "batch_size": args.batch_size, "volume_size": list(volume_size),
                "shuffled": args.shuffle_volumes}
    done = prepare_output(out, settings, args.overwrite)
    written = 0
    if any(item["id"] not in done for item in items):
        device = pick_device(args.device)
        model = load_run(args.run_dir, PIPELINE, model_builder(device, args.cache_dir), CAPTION_STAGES, device).model
        volume = _volume_reader([flairs[s] for s in sources], volume_size, args)
        written = write_predictions(model, items, volume, out, settings["decoding"], args.batch_size, args.seed,
                                    done)
    print(f"{out}: {written} new report(s), {len(items) - written} already there")
    if args.input is not None:
        for record in read_jsonl(out):
            if record.get("id") == items[0]["id"]:
                print(record["report"])
    return 0


def _volume_reader(flairs: list[Path], volume_size: tuple[int, ...], args: argparse.Namespace
                   ) -> Callable[[int], torch.Tensor]:
    """Position -> preprocessed (1, D, H, W) volume: through the persistent cache for a split, directly for inputs."""
    if args.split is not None:
        cases = [Case(str(i), path, "", "unknown", False) for i, path in enumerate(flairs)]
        dataset = make_dataset(cases, volume_size, volume_cache_root(args))
        return lambda i: dataset[i]["image"]
    return lambda i: load_volume(flairs[i], volume_size)


__all__ = ["SEED_DECODING", "MAX_NEW_TOKENS", "PREDICTIONS_DIR", "FIELDS", "CAPTION_STAGES", "run_cases",
           "derangement", "batch_seed", "decoding_kwargs", "generate_reports", "write_predictions", "prepare_output",
           "append_records", "complete_lines", "done_ids", "meta_path"]


if __name__ == "__main__":
    raise SystemExit(main())
