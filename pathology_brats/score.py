"""Score a BraTS-Path submission against a gold CSV the way the organisers' scorer does.

Example:
    python -m pathology_brats.score --submission submission.csv --gold gold.csv --schema 2025 --json scores.json

The steps are those of the organisers' ``score.py`` (Sage-Bionetworks-Challenges/brats-infra) followed by
GaNDLF's ``generate-metrics``:

1. the submission must pass ``pathology_brats.validate`` (the workflow never scores an invalid one);
2. the gold CSV has the year's columns: ``SubjectID,Target`` in 2024 and 2025, ``Name,GT`` in 2026 (renamed to
   ``SubjectID,Target`` there, so a 2026 gold in the older layout is read too), integer classes, each id once
   and matching the year's pattern (the organisers' gold does; ours is refused with one line if not);
3. on both sides the id becomes the first match of the year's pattern (pandas ``str.extract``), so
   ``preds/BraTSPath_Val_0001.jpg`` joins ``BraTSPath_Val_0001.jpg``; in 2026 (``val_\\w+``) the match stops
   at the extension, so ``val_0001.png`` and ``val_0001.jpg`` are the same id;
4. every gold row is kept (left join); a row without a prediction gets the penalty label, a submission row
   without a gold row is ignored; two submission rows that name one gold id are refused (GaNDLF refuses
   duplicate ids);
5. torchmetrics on hard labels with ``num_classes`` = classes + 1 and GaNDLF's averages
   (``pathology_brats.challenge_metrics``), keeping the organisers' keys of the year.

For 2026 ``auroc_per_class_weighted`` is the organisers' computation (float32 ``softmax(one_hot)``), whose
near-ties are broken by rounding that differs between CPUs, so it matches the leaderboard only on a machine that
rounds as theirs; ``auroc_per_class_weighted_exact`` is the tie-exact value. ``--json`` writes ``{key: value}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import MedvlArgumentParser, base_parser, parse_args
from common.errors import EXIT_BAD_INPUT, DataError, cli_entry
from common.run_guard import guard_command
from common.rundir import atomic_write_json, read_csv
from pathology_brats.challenge_metrics import challenge_scores
from pathology_brats.schema import Schema, get_schema
from pathology_brats.shared import add_schema_arg, add_submission_arg
from pathology_brats.validate import SUBJECT_ID_PATTERNS, read_submission, submission_violations

GOLD_COLUMNS = {"2024": ("SubjectID", "Target"), "2025": ("SubjectID", "Target"), "2026": ("Name", "GT")}
SUBMISSION, GOLD = "submission", "gold"


def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(description=__doc__, parents=[base_parser()],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_submission_arg(parser)
    parser.add_argument("--gold", type=Path, required=True, help="the labels, in the year's gold layout")
    add_schema_arg(parser)
    parser.add_argument("--json", type=Path, default=None, help="write {key: value} here (atomically)")
    return parser


def _integers(values: pd.Series, low: int, high: int, what: str, source: str) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    bad = ~(np.isfinite(numbers) & (numbers == np.round(numbers)) & (numbers >= low) & (numbers <= high))
    if bad.any():
        raise DataError(source, f"{what} {values.iloc[int(np.argmax(bad))]!r} is not an integer in {low}..{high}")
    return numbers.astype(np.int64)


def join_submission(submission_frame: pd.DataFrame, gold_frame: pd.DataFrame, schema: Schema | str) -> pd.DataFrame:
    """One row per gold row: ``SubjectID`` (the extracted id), ``Target``, ``Prediction`` (the penalty label where
    the submission has none) and ``missing``. A ``DataError`` names ``"submission"`` or ``"gold"`` as its source."""
    schema = schema if isinstance(schema, Schema) else get_schema(schema)
    names = GOLD_COLUMNS[schema.year]
    gold = gold_frame.rename(columns=dict(zip(names, ("SubjectID", "Target"), strict=True)))
    absent = [c for c in ("SubjectID", "Target") if c not in gold.columns]
    if absent:
        raise DataError(GOLD, f"missing column(s) {', '.join(names)} of the {schema.year} gold layout "
                              f"(has {', '.join(map(str, gold_frame.columns))})")
    if "SubjectID" not in submission_frame.columns or "Prediction" not in submission_frame.columns:
        raise DataError(SUBMISSION, f"needs columns SubjectID, Prediction (has "
                                    f"{', '.join(map(str, submission_frame.columns))})")
    if not len(gold):
        raise DataError(GOLD, "no rows to score")
    extract = f"({SUBJECT_ID_PATTERNS[schema.year]})"
    gold = pd.DataFrame({"SubjectID": gold["SubjectID"].astype(str).str.extract(extract, expand=False),
                         "Target": _integers(gold["Target"], 0, len(schema.classes) - 1, "Target", GOLD)})
    if gold["SubjectID"].isna().any():
        first = gold_frame[names[0]].iloc[int(np.argmax(gold["SubjectID"].isna()))]
        raise DataError(GOLD, f"id {first!r} does not match the {schema.year} pattern {extract[1:-1]!r}")
    twice = gold["SubjectID"][gold["SubjectID"].duplicated()]
    if len(twice):
        raise DataError(GOLD, f"id {twice.iloc[0]!r} appears more than once")
    pred = pd.DataFrame({"SubjectID": submission_frame["SubjectID"].astype(str).str.extract(extract, expand=False),
                         "Prediction": submission_frame["Prediction"].to_numpy()})
    pred = pred[pred["SubjectID"].isin(gold["SubjectID"])]  # extra rows are ignored, as the left join does
    twice = pred["SubjectID"][pred["SubjectID"].duplicated()]
    if len(twice):
        raise DataError(SUBMISSION, f"two rows name the gold id {twice.iloc[0]!r} (GaNDLF refuses duplicate ids)")
    joined = gold.merge(pred, how="left", on="SubjectID")
    joined["missing"] = joined["Prediction"].isna()
    filled = joined["Prediction"].where(~joined["missing"], schema.penalty)
    joined["Prediction"] = _integers(filled, 0, schema.penalty, "Prediction", SUBMISSION)
    return joined


def score_submission(submission_frame: pd.DataFrame, gold_frame: pd.DataFrame,
                     schema: Schema | str) -> dict[str, float]:
    """The year's scorer keys (``challenge_metrics.SCORER_KEYS``) of a submission against the gold frame."""
    joined = join_submission(submission_frame, gold_frame, schema)
    return challenge_scores(joined["Target"].to_numpy(), joined["Prediction"].to_numpy(), schema)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("json",), reads=("submission", "gold"))
    schema = get_schema(args.schema)
    submission = read_submission(args.submission)
    problems = submission_violations(submission, schema)
    for problem in problems:
        print(f"error: {args.submission}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_BAD_INPUT
    gold = read_csv(args.gold, dtype=str, keep_default_na=False)
    try:
        joined = join_submission(submission, gold, schema)
    except DataError as err:
        files = {GOLD: args.gold, SUBMISSION: args.submission}  # the file each named input came from
        raise DataError(files.get(err.source, args.submission), err.message) from err
    scores = challenge_scores(joined["Target"].to_numpy(), joined["Prediction"].to_numpy(), schema)
    missing = int(joined["missing"].sum())
    print(f"{len(joined)} gold rows, {missing} without a prediction (scored as {schema.penalty}), "
          f"{len(submission) - (len(joined) - missing)} submission rows ignored")
    for key, value in scores.items():
        print(f"{key}: {value:.4f}")
    if args.json is not None:
        atomic_write_json(args.json, scores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
