"""Radiology reports from a vision-language model beside the trained CNN's probability, per prompt strategy.

Example:
    python -m pneumonia.report --run-dir runs/pneumonia/r18 --vlm medgemma-4b --quantization 4bit --prompt all

For each image of the split the CNN's P(pneumonia) and the VLM's report are written side by side to
RUN/reports/<prompt>.jsonl (id, label, cnn_prob, prompt, report, parsed_verdict). A rule-based parser reads a
verdict (normal / pneumonia / unclear) from each report; RUN/reports/comparison.md (+ .json) scores the verdicts
of each prompt strategy against the labels and against the CNN's decision at its validation-chosen threshold.
``--output-dir`` writes them elsewhere; ``--limit N`` takes N images, the classes in turn.

Prompt strategies: ``zero-shot`` (the bare question), ``clinical-role`` (a radiologist persona and a report
structure), ``context-aware`` (the same, plus the CNN's probability and label and the image's true resolution).
The 28 px images are upsampled to the processor's input size (896 px for MedGemma) and made RGB; generation is
greedy and batched with left padding, so a run is repeatable. VLMs: ``medgemma-4b`` (google/medgemma-4b-it),
``tiny-gemma3`` (random weights, built in memory: exercises the pipeline, says nothing about MedGemma), or a
directory holding a model saved with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.run_guard import guard_command
from common.rundir import atomic_write_json, atomic_write_text, result_set
from common.tables import json_safe, markdown_table
from common.vlm import build_messages, generate_reports, load_vlm, processor_image_size, vlm_source
from pneumonia.data import LABELS
from pneumonia.model import load_run_and_data, predict_proba
from pneumonia.shared import add_max_new_tokens_arg, add_prompt_arg, add_run_args, add_split_arg, add_vlm_arg

"""``--vlm`` presets: the ``vlm`` kind of ``common.presets`` (medgemma-4b and its tiny twin)."""
PROMPTS = ("zero-shot", "clinical-role", "context-aware")
VERDICTS = ("normal", "pneumonia", "unclear")
REPORTS_DIR = "reports"
FIELDS = ("id", "label", "cnn_prob", "prompt", "report", "parsed_verdict")

_SYSTEM = ("You are an expert thoracic radiologist. You read chest radiographs and write concise, factual "
           "reports. Describe only what the image shows.")
_STRUCTURE = ("Write a short report with a Findings section and an Impression. End the impression with one word, "
              "normal or pneumonia.")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True, quantization=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    add_vlm_arg(parser, default="medgemma-4b")
    add_prompt_arg(parser, default="all", help=f"{', '.join(PROMPTS)} or all")
    add_split_arg(parser, help="split whose images are reported on")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="report on this many images, alternating classes in index order (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per generation batch")
    add_max_new_tokens_arg(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub checkpoint")
    return parser


def prompt_names(prompt: str) -> tuple[str, ...]:
    """``all`` or one strategy name -> the strategies to run."""
    if prompt == "all":
        return PROMPTS
    if prompt not in PROMPTS:
        raise ConfigError("--prompt", f"unknown prompt {prompt!r}; choose one of {', '.join(PROMPTS)} or all")
    return (prompt,)


def prompt_text(prompt: str, cnn_prob: float, threshold: float, image_size: int) -> tuple[str | None, str]:
    """(system text or None, user text) of one strategy; only ``context-aware`` sees the CNN's output."""
    if prompt == "zero-shot":
        return None, "Is there pneumonia in this chest X-ray? Answer normal or pneumonia, then explain briefly."
    if prompt == "clinical-role":
        return _SYSTEM, f"Read this frontal chest radiograph. {_STRUCTURE}"
    if prompt == "context-aware":
        cnn_label = LABELS[int(cnn_prob >= threshold)]
        return _SYSTEM, (
            f"Read this frontal chest radiograph. It was downsampled to {image_size}x{image_size} pixels and "
            f"enlarged again, so fine detail is lost. A CNN classifier trained on such images gives "
            f"P(pneumonia) = {cnn_prob:.2f}, i.e. {cnn_label} at its decision threshold of {threshold:.2f}; it is "
            f"often right but can be wrong. Weigh it against what you see. {_STRUCTURE}")
    raise ConfigError("--prompt", f"unknown prompt {prompt!r}; choose one of {', '.join(PROMPTS)} or all")


def to_rgb(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """uint8 grey (H, W) -> RGB PIL image of ``size`` (height, width), bicubic, as the VLM's processor expects."""
    height, width = size
    return Image.fromarray(image).resize((width, height), Image.BICUBIC).convert("RGB")


# Verdict parsing --------------------------------------------------------------------------------------------------

_FINDING = re.compile(r"\b(pneumonias?|consolidations?|consolidative|infiltrates?|airspace (?:disease|opacit(?:y|ies))"
                      r"|lobar opacit(?:y|ies))\b")
_PRE_NEGATION = re.compile(r"\b(no|not|without|negative for|free of|absence of|absent|unlikely|neither|nor|"
                           r"resolved|resolution of)\b")
_POST_NEGATION = re.compile(r"\b(not (?:seen|present|identified|visible|evident|demonstrated)|(?:is|are) absent|"
                            r"(?:is|are) unlikely|(?:has|have) resolved|(?:is|are|been) excluded|ruled out)\b")
_HEDGE = re.compile(r"\b(possible|possibly|cannot (?:be )?(?:excluded?|ruled? out)|can ?not (?:be )?(?:excluded?|"
                    r"ruled? out)|not (?:be )?excluded|(?:to )?rule out|r/o|questionable|equivocal|indeterminate|"
                    r"versus|vs\.?|differential|uncertain|may|might|could)\b")
_NORMAL = re.compile(r"\b(normal (?:chest|study|radiograph|x-?ray|lungs?|examination)|no acute (?:cardio)?pulmonary|"
                     r"no acute (?:disease|process|abnormalit(?:y|ies)|findings?)|lungs? (?:are|is) clear|clear lungs?|"
                     r"lungs? (?:are|is) normal|no (?:radiographic )?abnormalit(?:y|ies)|unremarkable (?:chest|study|"
                     r"radiograph|lungs?))\b")
_VERDICT_WORD = re.compile(r"^\W*(normal|negative|healthy|pneumonia|positive)\s*(?:$|[,\-(])")
_SECTION = re.compile(r"\b(impression|conclusion|verdict|answer|diagnosis)\s*[:\-]")
_CLAUSE_SPLIT = re.compile(r"[.;:!?\n]|\b(?:but|however|although|though|except|whereas)\b")


def _mentions(clause: str) -> tuple[bool, bool]:
    """(asserted finding, negated finding or normal statement) in one clause."""
    positive = negative = False
    for match in _FINDING.finditer(clause):
        before, after = clause[: match.start()], clause[match.end():]
        if _HEDGE.search(before) or _HEDGE.search(after):
            continue
        if _PRE_NEGATION.search(before) or _POST_NEGATION.search(after):
            negative = True
        else:
            positive = True
    if _NORMAL.search(clause):
        negative = True
    return positive, negative


def _decide(text: str) -> str:
    positive = negative = False
    clauses = [c.strip() for c in _CLAUSE_SPLIT.split(text) if c and c.strip()]
    for clause in clauses:
        pos, neg = _mentions(clause)
        positive, negative = positive or pos, negative or neg
    if not positive and not negative and clauses:
        word = _VERDICT_WORD.match(clauses[0])
        if word:
            positive = word.group(1) in ("pneumonia", "positive")
            negative = not positive
    if positive == negative:
        return "unclear"
    return "pneumonia" if positive else "normal"


def parse_verdict(text: str) -> str:
    """Read ``normal``, ``pneumonia`` or ``unclear`` from a free-text report.

    Mentions of pneumonia or its signs (consolidation, infiltrate, airspace opacity) count for pneumonia unless a
    negation precedes them in the same clause ("no evidence of pneumonia") or follows them ("pneumonia is not
    seen"); hedged mentions ("possible", "cannot be excluded", "may") count for neither. Negated mentions and
    normal statements ("lungs are clear", "no acute cardiopulmonary process") count for normal. The impression
    (or conclusion / answer) decides when it is conclusive; otherwise the whole text does. A bare answer word
    opening the text or the impression ("Normal.", "Answer: positive") decides when nothing else does. Evidence
    for both sides, or for neither, is ``unclear``.
    """
    text = re.sub(r"[*#_`]", " ", text.lower())
    sections = list(_SECTION.finditer(text))
    if sections:
        verdict = _decide(text[sections[-1].end():])
        if verdict != "unclear":
            return verdict
    return _decide(text)


# Scoring ----------------------------------------------------------------------------------------------------------

def select_ids(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """All ids, or the first ``limit`` taking the classes in turn (index order within each), so both appear."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit < 1:
        raise ConfigError("--limit", "must be at least 1")
    per_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = []
    while len(order) < limit:
        for ids in per_class:
            if ids and len(order) < limit:
                order.append(ids.pop(0))
    return np.sort(np.asarray(order))


def score(records: list[dict[str, Any]], threshold: float) -> dict[str, float | int]:
    """Verdicts against labels and against the CNN's thresholded decision; unclear counts as wrong in ``overall``."""
    n = len(records)
    verdicts = np.array([r["parsed_verdict"] for r in records])
    labels = np.array([r["label"] for r in records])
    cnn = np.array([LABELS[int(r["cnn_prob"] >= threshold)] for r in records])
    decided = verdicts != "unclear"
    n_decided = int(decided.sum())

    def share(mask: np.ndarray, over: np.ndarray) -> float:
        return float(mask[over].mean()) if over.any() else float("nan")

    return {
        "n": n, "n_decided": n_decided, "unclear_share": float((~decided).mean()) if n else float("nan"),
        "acc_decided": share(verdicts == labels, decided), "acc_overall": share(verdicts == labels, np.ones(n, bool)),
        "cnn_agreement_decided": share(verdicts == cnn, decided),
        "cnn_agreement_overall": share(verdicts == cnn, np.ones(n, bool)),
        "pred_pneumonia_share": share(verdicts == "pneumonia", np.ones(n, bool)),
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of one ``<prompt>.jsonl``; a line that is not a JSON object with every field is a DataError."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"line {number} is not JSON ({err.msg})") from err
        missing = [f for f in FIELDS if not isinstance(record, dict) or f not in record]
        if missing:
            raise DataError(path, f"line {number} lacks {', '.join(missing)}")
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps({f: r[f] for f in FIELDS}) + "\n" for r in records))


def comparison_markdown(summary: dict[str, Any], records: dict[str, list[dict[str, Any]]], examples: int = 4) -> str:
    """The per-strategy table, the CNN on the same images, and a few reports side by side."""
    rows = [{"prompt": name, **scores} for name, scores in summary["prompts"].items()]
    lines = [f"# VLM reports vs CNN ({summary['vlm']}, {summary['split']} split)", "",
             f"VLM `{summary['vlm']}` ({summary['quantization']}, {format_bytes(summary['memory_bytes'])} of weights "
             f"on {summary['device']}); CNN `{summary['cnn_arch']}` at threshold {summary['threshold']:.3f}, accuracy "
             f"{summary['cnn_acc']:.4f} on the same {summary['n']} images. Verdicts are parsed from the reports by "
             "`pneumonia.report.parse_verdict`; `*_overall` counts unclear as wrong, `*_decided` leaves it out.", "",
             markdown_table(rows, ["prompt", "n", "n_decided", "unclear_share", "acc_decided", "acc_overall",
                                   "cnn_agreement_decided", "cnn_agreement_overall", "pred_pneumonia_share"])]
    for name, recs in records.items():
        lines += [f"## {name}: first {min(examples, len(recs))} reports", ""]
        shown = [{"id": r["id"], "label": r["label"], "cnn_prob": round(r["cnn_prob"], 3),
                  "verdict": r["parsed_verdict"], "report": _clip(r["report"], 160)} for r in recs[:examples]]
        lines += [markdown_table(shown, ["id", "label", "cnn_prob", "verdict", "report"])]
    return "\n".join(lines)


def format_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# Pipeline ---------------------------------------------------------------------------------------------------------

def run_reports(run_dir: Path, vlm_name: str, prompts: Sequence[str], out_dir: Path | None = None,
                split: str = "test", limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 200,
                data_root: Path | None = None, quantization: str = "none", device: str = "auto",
                precision: str = "auto", cache_dir: Path | None = None, trust_remote_code: bool = False,
                seed: int = 0) -> dict[str, Any]:
    """Write ``<prompt>.jsonl`` per strategy and ``comparison.md``/``.json`` into ``out_dir`` (RUN/reports)."""
    if batch_size < 1:
        raise ConfigError("--batch-size", "must be at least 1")
    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", "must be at least 1")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / REPORTS_DIR
    torch_device = pick_device(device)
    cnn, meta, data = load_run_and_data(run_dir, data_root, (split,), torch_device)
    ids = select_ids(data.labels[split], limit)
    images, labels = data.images[split][ids], data.labels[split][ids]
    probs = predict_proba(cnn, images, device=torch_device)
    threshold = float(meta["thresholds"]["decision"])

    vlm = load_vlm(vlm_name, quantization, torch_device, precision, cache_dir, trust_remote_code, seed)
    print(f"{vlm.source}: {format_bytes(vlm.memory_bytes)} of weights ({quantization}) on {torch_device}")
    size = processor_image_size(vlm.processor)
    pictures = [to_rgb(image, size) for image in images]

    all_records: dict[str, list[dict[str, Any]]] = {}
    for name in prompts:
        records = []
        for start in range(0, len(ids), batch_size):
            batch = range(start, min(start + batch_size, len(ids)))
            size = int(meta["preprocessing"]["image_size"])
            texts = [prompt_text(name, float(probs[i]), threshold, size) for i in batch]
            replies = generate_reports(vlm, [build_messages(pictures[i], *t) for i, t in zip(batch, texts)],
                                       max_new_tokens, seed)
            for i, (system, user), reply in zip(batch, texts, replies):
                records.append({"id": int(ids[i]), "label": LABELS[int(labels[i])], "cnn_prob": float(probs[i]),
                                "prompt": f"{system}\n\n{user}" if system else user, "report": reply,
                                "parsed_verdict": parse_verdict(reply)})
        all_records[name] = records

    summary = {
        "vlm": vlm.source, "quantization": quantization, "device": str(torch_device),
        "memory_bytes": vlm.memory_bytes, "split": split, "n": int(len(ids)), "seed": seed,
        "max_new_tokens": max_new_tokens, "threshold": threshold,
        "cnn_arch": meta["preset"], "cnn_acc": float(((probs >= threshold).astype(int) == labels).mean()),
        "prompts": {name: score(records, threshold) for name, records in all_records.items()},
    }
    with result_set(out_dir) as staging:  # every prompt's reports and the comparison replace the old set together
        for name, records in all_records.items():
            write_jsonl(staging / f"{name}.jsonl", records)
        atomic_write_json(staging / "comparison.json", json_safe(summary))
        atomic_write_text(staging / "comparison.md", comparison_markdown(summary, all_records))
    return summary


def run_section(run_dir: Path, out_dir: Path, limit: int = 8) -> str:
    """tiny-gemma3 reports for the three prompts on ``limit`` test images, as a Markdown section of the demo."""
    reports = Path(out_dir) / "pneumonia_reports"
    summary = run_reports(Path(run_dir), "tiny-gemma3", PROMPTS, reports, limit=limit, batch_size=limit,
                          max_new_tokens=24, device="cpu")
    rows = [{"prompt": name, **scores} for name, scores in summary["prompts"].items()]
    return "\n".join([
        "## Pneumonia: VLM reports beside the CNN", "",
        "`python -m pneumonia.report --vlm tiny-gemma3 --prompt all` on "
        f"{summary['n']} test images. **tiny-gemma3 has random weights, so its text is noise**: this section shows "
        "that prompts, batched generation, verdict parsing and scoring run end to end, not how well MedGemma "
        "reports (run `--vlm medgemma-4b --quantization 4bit` on a GPU for that).", "",
        markdown_table(rows, ["prompt", "n", "unclear_share", "acc_decided", "cnn_agreement_decided"]),
        f"Reports: `{reports.name}/<prompt>.jsonl`; full table: [comparison.md]({reports.name}/comparison.md)",
        "",
    ])


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "cache_dir"), runs=("run_dir",),
                  lock="output_dir" if args.output_dir else "run_dir", create=args.output_dir is not None)
    prompts = prompt_names(args.prompt)
    vlm_source(args.vlm)
    run_reports(args.run_dir, args.vlm, prompts, args.output_dir, args.split, args.limit, args.batch_size,
                args.max_new_tokens, args.data_root, args.quantization, args.device, args.precision, args.cache_dir,
                args.trust_remote_code, args.seed)
    out_dir = args.output_dir or args.run_dir / REPORTS_DIR
    print((out_dir / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
