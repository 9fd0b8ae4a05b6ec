"""Score a run's generated reports: text metrics, clinical F1 in the seed's and the corrected way, lesion detection,
each with a 95% bootstrap interval, for tumour cases, healthy controls and all cases.

Example (after ``python -m brain3d_report.generate --run-dir runs/brain/r3 --split test [--shuffle-volumes]``):
    python -m brain3d_report.evaluate --run-dir runs/brain/r3
    python -m brain3d_report.evaluate --run-dir runs/brain/r3 --split test_quick --n-boot 200 --bertscore none

Reads ``RUN/predictions/<split>.jsonl`` and, when it exists, ``<split>_shuffled.jsonl`` (the same references with
other cases' volumes). Metrics (``common.metrics``): BLEU-1..4, METEOR and CIDEr (pycocoevalcap, corpus-level),
ROUGE-L, the seed's NLTK sentence BLEU (``bleu*_seed``), BERTScore, laterality / anatomy / pathology F1 in the
corrected mode (``lat_f1`` ...) and the seed's (``lat_f1_seed`` ...), healthy specificity and tumour sensitivity.

Intervals: percentile bootstrap over cases. Metrics defined per report (sentence BLEU, ROUGE-L, BERTScore, METEOR
segment scores, clinical F1, lesion calls) resample the per-case values (``--n-boot``, 1,000 by default as the
seed). Corpus BLEU and CIDEr are recomputed on each resample, which costs about half a second per resample of a
hundred reports, so they get ``--n-boot-corpus`` resamples (200 by default; the first ones of the same sequence);
METEOR's corpus score needs a pass of its Java scorer per resample (about 20 ms per report), so its interval is off
unless ``--n-boot-meteor`` asks for one; ``meteor_segment`` (the mean of its per-report scores) has the full one.
The output says which count each interval used.

Writes into the run (together, as one result set): ``metrics_full.json`` (the seed's file name; for another split
``metrics_full_<split>.json``): all-case keys at the top level (``bleu1`` ... with ``_ci_low``/``_ci_high``, and
``<key>_shuffled`` when the shuffled predictions exist), every group under ``groups`` (and ``groups_shuffled``),
the bootstrap counts and notes; ``results.md`` (``results_<split>.md``), the table printed here; and
``predictions/<split>_per_case.csv``, one row per case with every per-case value.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brain3d_report.shared import add_scoring_args, add_split_arg
from common.cli import MedvlArgumentParser, base_parser, parse_args, require
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.metrics.clinical import clinical_per_case, states_lesion
from common.metrics.text import TextScorer, TokenizedPairs, corpus_scores
from common.run_guard import guard_command
from common.rundir import atomic_write_json, atomic_write_text, read_jsonl, recover_results, result_set
from common.tables import CI_HIGH, CI_LOW, ci_cell, json_safe, markdown_table, metrics_with_ci

log = logging.getLogger("medvl.brain3d_report")

PREDICTIONS_DIR = "predictions"
GROUPS = ("all", "tumour", "healthy")
CORPUS_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")
CLINICAL_KEYS = ("lat_f1", "anat_f1", "path_f1", "lat_f1_seed", "anat_f1_seed", "path_f1_seed")
LESION_KEYS = ("healthy_specificity", "tumour_sensitivity")
SEED_TEXT_KEYS = ("bleu1_seed", "bleu2_seed", "bleu3_seed", "bleu4_seed")
KEY_ORDER = (*CORPUS_KEYS[:4], "meteor", "meteor_segment", "meteor_seed", "rougeL", "cider", *SEED_TEXT_KEYS,
             "bertscore",
             *CLINICAL_KEYS, *LESION_KEYS)
"""Table order; ``bertscore`` stands for the ``bertscore_f1_<model>`` key that names the model used."""
REQUIRED_FIELDS = {"id": str, "reference": str, "report": str, "healthy": bool}


@dataclass
class GroupScores:
    """Metrics of one group of cases with their intervals, the per-case values behind them, and notes."""

    results: dict[str, Any]
    per_case: dict[str, list]
    notes: dict[str, str] = field(default_factory=dict)


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True)
    parser = MedvlArgumentParser(prog="python -m brain3d_report.evaluate", description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="the run whose predictions/<split>.jsonl to score")
    add_split_arg(parser, default="test", help="name of the predictions file: test (default), val, test_quick ...")
    add_scoring_args(parser, n_boot=1000, n_boot_corpus=200)
    return parser


class _NoWordNet:
    """A WordNet with no synonyms, for ``seed_meteor(..., wordnet=_NoWordNet())``: exact and stem matches only."""

    def synsets(self, *args, **kwargs) -> list:
        return []


def seed_meteor(candidates: Sequence[str], references: Sequence[str], wordnet: Any = None
                ) -> tuple[list[float] | None, str | None]:
    """(per-report NLTK METEOR as the seed computes it, note): ``nltk.translate.meteor_score`` of lowercased
    whitespace tokens, one reference per report, NLTK's defaults (alpha 0.9, beta 3, gamma 0.5; exact, Porter stem
    and WordNet synonym matches). This is not Java METEOR 1.5 (``meteor``): no paraphrase table, other weights, and
    a mean of per-report scores rather than a corpus aggregate.

    ``wordnet``: NLTK's WordNet corpus when None. Without its data (not in the wheel; ``python -m nltk.downloader
    wordnet``) the scores are None and the note says why."""
    from nltk.translate.meteor_score import meteor_score

    if wordnet is None:
        from nltk.corpus import wordnet as nltk_wordnet

        try:
            nltk_wordnet.ensure_loaded()
        except LookupError:
            return None, "skipped: NLTK's WordNet data is not installed (python -m nltk.downloader wordnet)"
        wordnet = nltk_wordnet
    return [float(meteor_score([reference.lower().split()], candidate.lower().split(), wordnet=wordnet))
            for candidate, reference in zip(candidates, references)], None


def make_scorer(args: argparse.Namespace) -> TextScorer:
    """The text scorer the flags ask for (BERTScore on ``--device``, or where bert-score puts it for ``auto``)."""
    device = None if args.device == "auto" else str(pick_device(args.device))
    return TextScorer(bertscore=None if args.bertscore == "none" else args.bertscore, meteor=args.meteor,
                      device=device)


# --- predictions -------------------------------------------------------------------------------------------------

def predictions_path(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / PREDICTIONS_DIR / f"{split}.jsonl"


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions JSONL, checked: each has an id, a non-empty reference, a report and ``healthy``.

    Raises:
        DataError: a missing or empty file, a malformed line (only a cut last line is forgiven), a record without a
            field or with one of the wrong type, a case that appears twice; each names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no predictions here; run python -m brain3d_report.generate first")
    records = read_jsonl(path)
    if not records:
        raise DataError(path, "holds no predictions")
    seen: dict[str, int] = {}
    for k, record in enumerate(records, 1):
        for key, kind in REQUIRED_FIELDS.items():
            if not isinstance(record.get(key), kind):
                raise DataError(path, f"record {k} has no {key!r} of type {kind.__name__}"
                                      + (" (generated from files without reports?)" if key == "healthy" else ""))
        if not record["reference"].strip():
            raise DataError(path, f"record {k} ({record['id']}) has an empty reference; nothing to score against")
        if record["id"] in seen:
            raise DataError(path, f"case {record['id']} appears twice (records {seen[record['id']]} and {k})")
        seen[record["id"]] = k
    return records


def settings_path(predictions: Path) -> Path:
    """The settings file ``brain3d_report.generate`` writes beside a predictions JSONL."""
    return predictions.with_name(predictions.name.removesuffix(".jsonl") + ".meta.json")


def _settings(path: Path) -> dict[str, Any] | None:
    sidecar = settings_path(path)
    if not sidecar.is_file():
        return None
    try:
        settings = json.loads(sidecar.read_text(encoding="utf-8")).get("settings")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise DataError(sidecar, f"not a settings file of brain3d_report.generate ({type(err).__name__})") from err
    if not isinstance(settings, dict):
        raise DataError(sidecar, "has no 'settings' object")
    return settings


def check_control(path: Path, records: Sequence[dict[str, Any]], control_path: Path,
                  control: Sequence[dict[str, Any]]) -> None:
    """Refuse a shuffled control that is not the predictions' own: made by another model, other decoding or
    preprocessing (read from the two settings files), or over other cases.

    The control answers one question, whether the reports depend on the volume, and only a control generated
    exactly like the predictions, on the same cases, answers it; any other difference leaks into the comparison.

    Raises:
        DataError: naming both files and what differs.
    """
    ours, theirs = _settings(path), _settings(control_path)
    if (ours is None) != (theirs is None):
        missing = settings_path(path if ours is None else control_path)
        raise DataError(missing, f"missing, so {control_path.name} cannot be checked against {path.name}; generate "
                                 "both again")
    if ours is not None:
        if ours.get("shuffled") or not theirs.get("shuffled"):
            raise DataError(control_path, f"is not the shuffled control of {path} (shuffled: "
                                          f"{theirs.get('shuffled')} vs {ours.get('shuffled')})")
        differ = sorted(k for k in set(ours) | set(theirs) if k != "shuffled" and ours.get(k) != theirs.get(k))
        if differ:
            shown = "; ".join(f"{k} {_short(theirs.get(k))} vs {_short(ours.get(k))}" for k in differ)
            raise DataError(control_path, f"generated unlike {path}: {shown}; regenerate the control with the "
                                          "same run and decoding")
    ids, control_ids = {r["id"] for r in records}, {r["id"] for r in control}
    if ids != control_ids:
        extra, missing = sorted(control_ids - ids), sorted(ids - control_ids)
        raise DataError(control_path, f"covers other cases than {path}: {len(extra)} extra (e.g. "
                                      f"{', '.join(extra[:2]) or '-'}), {len(missing)} missing (e.g. "
                                      f"{', '.join(missing[:2]) or '-'})")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:12] + "..."


def read_run_predictions(run_dir: Path, split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The records of ``<split>.jsonl`` and, when present, of its checked shuffled control."""
    path = predictions_path(run_dir, split)
    records = read_predictions(path)
    control_path = predictions_path(run_dir, f"{split}_shuffled")
    if not control_path.is_file():
        return records, None
    control = read_predictions(control_path)
    check_control(path, records, control_path, control)
    return records, control


# --- scoring -----------------------------------------------------------------------------------------------------

def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def _resample_pairs(pairs: TokenizedPairs, indices: np.ndarray) -> TokenizedPairs:
    return TokenizedPairs(tuple(pairs.candidates[i] for i in indices), tuple(pairs.references[i] for i in indices),
                          pairs.tokenizer)


def _interval(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def score_records(records: Sequence[dict[str, Any]], scorer: TextScorer, *, n_boot: int = 1000,
                  n_boot_corpus: int = 200, n_boot_meteor: int = 0, seed: int = 0, meteor_seed: bool = False,
                  wordnet: Any = None) -> dict[str, GroupScores]:
    """Every metric with its 95% interval for all cases, the tumour cases and the healthy controls (groups without
    cases are left out); see the module docstring for the resampling.

    The text metrics run once over all reports (``TextScorer.evaluate``: one BERTScore and one METEOR pass); a group
    takes its cases' per-report values, and its corpus BLEU, CIDEr and METEOR are recomputed on its own pairs. Every
    point value therefore equals what ``TextScorer.evaluate``, ``clinical_f1`` and ``lesion_detection`` return when
    called on that group's reports.
    """
    candidates, references = [r["report"] for r in records], [r["reference"] for r in records]
    text = scorer.evaluate(candidates, references)
    per_case: dict[str, list] = {key: list(values) for key, values in text.per_case.items()}
    for mode in ("corrected", "seed"):
        per_case.update(clinical_per_case(candidates, references, mode))
    per_case["states_lesion"] = [states_lesion(c) for c in candidates]
    healthy = np.array([bool(r["healthy"]) for r in records], dtype=bool)
    notes = dict(text.notes)
    if meteor_seed:
        values, note = seed_meteor(candidates, references, wordnet)
        if values is not None:
            per_case["meteor_seed"] = values
        else:
            notes["meteor_seed"] = note
    notes["bootstrap"] = (f"per-case metrics {n_boot} resamples; corpus BLEU/CIDEr {n_boot_corpus}; corpus METEOR "
                          f"{n_boot_meteor if scorer.meteor_scorer is not None else 0}")
    out: dict[str, GroupScores] = {}
    for group in GROUPS:
        chosen = np.flatnonzero(np.ones_like(healthy) if group == "all" else healthy == (group == "healthy"))
        if len(chosen):
            results = _group_results(per_case, text.pairs, chosen, healthy[chosen], scorer, n_boot=n_boot,
                                     n_boot_corpus=n_boot_corpus, n_boot_meteor=n_boot_meteor, seed=seed)
            out[group] = GroupScores(results, {k: [v[i] for i in chosen] for k, v in per_case.items()}, notes)
    return out


def _group_results(per_case: dict[str, list], pairs: TokenizedPairs, chosen: np.ndarray, healthy: np.ndarray,
                   scorer: TextScorer, *, n_boot: int, n_boot_corpus: int, n_boot_meteor: int, seed: int
                   ) -> dict[str, Any]:
    """The metrics of the cases at positions ``chosen``; ``healthy`` is their control flag."""
    mean_keys = [key for key in per_case if key not in ("cider", "states_lesion")]

    def means(arrays: dict[str, np.ndarray]) -> dict[str, float]:
        out = {key: _nanmean(arrays[key]) for key in mean_keys}
        said, controls = arrays["states_lesion"], arrays["healthy"]
        out["healthy_specificity"] = float((~said[controls]).mean()) if controls.any() else math.nan
        out["tumour_sensitivity"] = float(said[~controls].mean()) if (~controls).any() else math.nan
        return out

    arrays = {key: np.asarray(per_case[key], dtype=float)[chosen] for key in mean_keys}
    arrays.update(states_lesion=np.asarray(per_case["states_lesion"], dtype=bool)[chosen], healthy=healthy)
    point = means(arrays)
    defined = [key for key, value in point.items() if math.isfinite(value)]
    results: dict[str, Any] = {}
    if defined:
        results.update(metrics_with_ci(means, arrays, keys=defined, n_boot=n_boot, seed=seed))
    for key in set(point) - set(defined):
        results.update({key: math.nan, key + CI_LOW: math.nan, key + CI_HIGH: math.nan})

    meteor_on = scorer.meteor_scorer is not None
    corpus_draws: dict[str, list[float]] = {key: [] for key in CORPUS_KEYS}
    meteor_draws: list[float] = []
    rng = np.random.default_rng(seed)  # metrics_with_ci draws the same sequence: the first resamples are shared
    n = len(chosen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in range(max(n_boot_corpus, n_boot_meteor if meteor_on else 0)):
            resample = chosen[rng.integers(0, n, size=n)]
            if b < n_boot_corpus:
                for key, value in corpus_scores(pairs, resample).items():
                    corpus_draws[key].append(value)
            if b < n_boot_meteor and meteor_on:
                meteor_draws.append(scorer.meteor(_resample_pairs(pairs, resample))[0])
    for key, value in corpus_scores(pairs, chosen).items():
        results[key] = value
        results[key + CI_LOW], results[key + CI_HIGH] = _interval(corpus_draws[key])
    if meteor_on:
        results["meteor"] = scorer.meteor(_resample_pairs(pairs, chosen))[0]
        results["meteor" + CI_LOW], results["meteor" + CI_HIGH] = _interval(meteor_draws)

    counts = {"n": n, "n_tumour": int((~healthy).sum()), "n_healthy": int(healthy.sum())}
    for key in ("lat_f1", "anat_f1", "path_f1"):
        counts[key.replace("_f1", "_excluded")] = int(np.isnan(arrays[key]).sum())
    return {**_ordered(results), **counts}


def _ordered(results: dict[str, Any]) -> dict[str, Any]:
    """Metric keys in ``KEY_ORDER`` (each followed by its interval), then any others."""
    names = [k for k in results if not k.endswith((CI_LOW, CI_HIGH))]
    rank = {key: i for i, key in enumerate(KEY_ORDER)}

    def place(key: str) -> tuple[int, str]:
        return rank.get("bertscore" if key.startswith("bertscore_f1_") else key, len(rank)), key

    out: dict[str, Any] = {}
    for key in sorted(names, key=place):
        out[key] = results[key]
        for suffix in (CI_LOW, CI_HIGH):
            if key + suffix in results:
                out[key + suffix] = results[key + suffix]
    return out


def per_case_frame(records: Sequence[dict[str, Any]], scores: GroupScores) -> pd.DataFrame:
    """One row per case: ids, group, every per-case value (CIDEr with document frequencies of all references)."""
    frame = pd.DataFrame({"id": [r["id"] for r in records], "healthy": [r["healthy"] for r in records],
                          "side": [r.get("side") for r in records]})
    if any("volume_id" in r for r in records):
        frame["volume_id"] = [r.get("volume_id", r["id"]) for r in records]
    for key, values in scores.per_case.items():
        frame[key] = values
    frame["reference"] = [r["reference"] for r in records]
    frame["report"] = [r["report"] for r in records]
    return frame


# --- tables ------------------------------------------------------------------------------------------------------

ci_text = ci_cell  # the floor's one CI-cell formatter, under the name this module's importers use


def metric_names(*results: dict[str, Any]) -> list[str]:
    """The metric keys (not intervals or counts) of several result dicts, in table order."""
    keys = [k for r in results for k in r if not k.endswith((CI_LOW, CI_HIGH)) and k + CI_LOW in r]
    return list(_ordered({k: 0 for k in dict.fromkeys(keys)}))


def comparison_table(columns: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per metric, one column per named result dict, cells ``value [low, high]``."""
    rows = [{"metric": key, **{name: ci_text(results, key) if key in results else "" for name, results in
                               columns.items()}} for key in metric_names(*columns.values())]
    return markdown_table(rows, ["metric", *columns])


def _flat(groups: dict[str, GroupScores], suffix: str = "") -> dict[str, Any]:
    results = groups["all"].results
    out = {}
    for key, value in results.items():
        base = next((key[: -len(s)] for s in (CI_LOW, CI_HIGH) if key.endswith(s)), key)
        tail = key[len(base):]
        out[f"{base}{suffix}{tail}"] = value
    return out


def evaluate_run(run_dir: Path, split: str, scorer: TextScorer, *, n_boot: int = 1000, n_boot_corpus: int = 200,
                 n_boot_meteor: int = 0, seed: int = 0, meteor_seed: bool = False) -> dict[str, Any]:
    """Score ``predictions/<split>.jsonl`` (and its shuffled control), write the result set, return the summary
    (``meteor_seed``: add the seed's NLTK METEOR, ``seed_meteor``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(run_dir, "run directory does not exist")
    recover_results(run_dir)
    path = predictions_path(run_dir, split)
    shuffled_path = predictions_path(run_dir, f"{split}_shuffled")
    records, shuffled = read_run_predictions(run_dir, split)
    bootstrap = {"n_boot": n_boot, "n_boot_corpus": n_boot_corpus, "n_boot_meteor": n_boot_meteor, "seed": seed}
    groups = score_records(records, scorer, **bootstrap, meteor_seed=meteor_seed)
    groups_shuffled = score_records(shuffled, scorer, **bootstrap, meteor_seed=meteor_seed) if shuffled else None

    summary: dict[str, Any] = {"split": split, "predictions": str(path.relative_to(run_dir)), **_flat(groups)}
    if groups_shuffled:
        summary.update(_flat(groups_shuffled, "_shuffled"))
        summary["predictions_shuffled"] = str(shuffled_path.relative_to(run_dir))
    summary["groups"] = {name: scores.results for name, scores in groups.items()}
    if groups_shuffled:
        summary["groups_shuffled"] = {name: scores.results for name, scores in groups_shuffled.items()}
    summary["bootstrap"] = bootstrap
    summary["notes"] = groups["all"].notes
    expected = _split_size(run_dir, split)
    if expected is not None and expected != len(records):
        summary["notes"]["coverage"] = f"{len(records)} of the {expected} {split} cases have a report"

    columns = {name: scores.results for name, scores in groups.items()}
    if groups_shuffled:
        columns.update({f"{name} (shuffled volumes)": groups_shuffled[name].results for name in ("all", "tumour")
                        if name in groups_shuffled})
    counts = groups["all"].results
    title = (f"# brain3d_report: {split} ({counts['n']} cases: {counts['n_tumour']} tumour, {counts['n_healthy']} "
             f"healthy)\n\n")
    notes = "\n".join(f"- {key}: {value}" for key, value in summary["notes"].items())
    excluded = ", ".join(f"{k} {counts[k]}" for k in ("lat_excluded", "anat_excluded", "path_excluded"))
    markdown = (title + comparison_table(columns) + "\nCorrected clinical F1 leaves out the cases whose reference "
                f"names nothing of the category (all cases: {excluded}).\n\n" + notes + "\n")
    stem = "" if split == "test" else f"_{split}"
    with result_set(run_dir) as staging:
        atomic_write_json(staging / f"metrics_full{stem}.json", json_safe(summary))
        atomic_write_text(staging / f"results{stem}.md", markdown)
        atomic_write_json(staging / f"results{stem}.json", json_safe(headline(summary)))
        atomic_write_text(staging / PREDICTIONS_DIR / f"{split}_per_case.csv",
                          per_case_frame(records, groups["all"]).to_csv(index=False))
        if groups_shuffled:
            atomic_write_text(staging / PREDICTIONS_DIR / f"{split}_shuffled_per_case.csv",
                              per_case_frame(shuffled, groups_shuffled["all"]).to_csv(index=False))
    summary["markdown"] = markdown
    return summary


HEADLINE_KEYS = ("lat_f1", "lat_f1_shuffled", "healthy_specificity", "healthy_specificity_shuffled",
                 "tumour_sensitivity", "lat_f1_seed", "bleu4", "cider")


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """``results.json``: the split, its case counts and the headline numbers of all cases (corrected laterality F1,
    with shuffled volumes when that control was generated, healthy specificity), each with its 95% interval."""
    out: dict[str, Any] = {"split": summary["split"], "n": summary.get("n"), "n_tumour": summary.get("n_tumour"),
                           "n_healthy": summary.get("n_healthy")}
    for key in HEADLINE_KEYS:
        if key in summary:
            out[key] = summary[key]
            low, high = summary.get(f"{key}{CI_LOW}"), summary.get(f"{key}{CI_HIGH}")
            if low is not None and high is not None:
                out[f"{key}_ci"] = [low, high]
    return out


def _split_size(run_dir: Path, split: str) -> int | None:
    csv = run_dir / "split.csv"
    if not csv.is_file():
        return None
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    return int((frame.get("split", pd.Series(dtype=str)) == split).sum()) or None


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, lock="run_dir")
    require(args, run_dir="the run whose predictions are scored")
    if not args.split or "/" in args.split or args.split.startswith("."):
        raise ConfigError("--split", f"{args.split!r} is not a predictions file name")
    read_run_predictions(args.run_dir, args.split)  # a bad file or control fails before any scorer loads
    with make_scorer(args) as scorer:
        summary = evaluate_run(args.run_dir, args.split, scorer, n_boot=args.n_boot,
                               n_boot_corpus=args.n_boot_corpus, n_boot_meteor=args.n_boot_meteor, seed=args.seed,
                               meteor_seed=args.meteor_seed)
    print(summary["markdown"])
    return 0


__all__ = ["GROUPS", "CORPUS_KEYS", "CLINICAL_KEYS", "LESION_KEYS", "GroupScores", "read_predictions", "seed_meteor",
           "score_records", "per_case_frame", "check_control", "read_run_predictions", "comparison_table", "ci_text",
           "evaluate_run", "make_scorer", "predictions_path"]


if __name__ == "__main__":
    raise SystemExit(main())
