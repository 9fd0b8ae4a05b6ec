"""Check a BraTS-Path submission CSV against the year's rules before it is uploaded: one line per violation.

Example:
    python -m pathology_brats.validate --submission submission.csv --schema 2025 --images data/val

The rules are the organisers' validator's (Sage-Bionetworks-Challenges/brats-infra, ``evaluation/pathology/
validate.py`` and the ``wf-pathology`` workflow of each year), so a file that passes here is not refused there:

- the columns are ``SubjectID,Prediction``, exactly (the organisers only require both and ignore others; a third
  column here is an error, since our ``submit`` never writes one and it usually means a wrong file);
- every ``Prediction`` is an integer class code of the schema, 0..5 (2024), 0..8 (2025), 0..9 (2026), the
  organisers' ``--min_label``/``--max_label``; the penalty label (6, 9, 10) is not one: it is what the scorer
  gives a missing row;
- no ``SubjectID`` twice;
- every ``SubjectID`` contains a match of the year's pattern (``re.search``, as pandas ``str.contains``):
  ``BraTSPath_Val.*png$`` (2024), ``BraTSPath_Val.*jpg$`` (2025), ``val_\\w+`` (2026; loosened on 2026-06-02
  from ``^val_\\w+$``). All three are read from the workflow's ``pattern`` default in the history of that
  repository, none is guessed;
- with ``--images DIR`` (ours, not the organisers'): every ``SubjectID`` names a file in ``DIR``. The
  organisers do not check it, but a row that names no validation image is scored as missing (penalty label).

Exit 0 and one ``ok`` line when the file passes; otherwise ``error: <file>: line N: <problem>`` per violation
(line 1 is the header) and exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from common.cli import MedvlArgumentParser, base_parser, parse_args
from common.errors import EXIT_BAD_INPUT, DataError, cli_entry
from common.rundir import read_csv
from pathology_brats.schema import Schema, get_schema
from pathology_brats.shared import add_images_arg, add_schema_arg, add_submission_arg

COLUMNS = ("SubjectID", "Prediction")
SUBJECT_ID_PATTERNS = {"2024": r"BraTSPath_Val.*png$", "2025": r"BraTSPath_Val.*jpg$", "2026": r"val_\w+"}
_INTEGER = re.compile(r"[+-]?\d+")


def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(description=__doc__, parents=[base_parser()],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_submission_arg(parser)
    add_schema_arg(parser)
    add_images_arg(parser, help="folder of the validation images: every SubjectID must name a file there")
    return parser


def read_submission(path: Path) -> pd.DataFrame:
    """The CSV as text cells (``00012`` and ``3.0`` stay as written, so the checks see what the file holds)."""
    return read_csv(Path(path), dtype=str, keep_default_na=False)


def submission_violations(frame_or_path: pd.DataFrame | str | Path, schema: Schema | str,
                          images: Path | None = None) -> list[str]:
    """Every rule the submission breaks, as ``line N: <problem>`` (line 1 = the header, row i = line i + 2).

    An empty list means the organisers' validator would accept it. A path that is missing or not a readable CSV
    raises ``DataError``; ``submit`` calls this on the frame it is about to write.
    """
    schema = schema if isinstance(schema, Schema) else get_schema(schema)
    frame = read_submission(frame_or_path) if isinstance(frame_or_path, str | Path) else frame_or_path
    if images is not None and not Path(images).is_dir():
        raise DataError(images, "--images is not a folder" if Path(images).exists() else "folder not found")
    header = [str(c) for c in frame.columns]
    if header != list(COLUMNS):
        return [f"line 1: the header must be exactly {','.join(COLUMNS)}, got {','.join(header) or 'nothing'}"]
    pattern = re.compile(SUBJECT_ID_PATTERNS[schema.year])
    top = len(schema.classes) - 1
    problems, first_line = [], {}
    for row, (subject, prediction) in enumerate(zip(frame["SubjectID"], frame["Prediction"], strict=True)):
        line = row + 2
        subject, code = str(subject), str(prediction).strip()
        if not _INTEGER.fullmatch(code):
            problems.append(f"line {line}: Prediction {code!r} is not an integer class code (0..{top})")
        elif int(code) == schema.penalty:
            problems.append(f"line {line}: Prediction {code} is the {schema.year} penalty label (what a missing "
                            f"row is scored as), not a class code (0..{top})")
        elif not 0 <= int(code) <= top:
            problems.append(f"line {line}: Prediction {code} is outside the {schema.year} class codes 0..{top}")
        if subject in first_line:
            problems.append(f"line {line}: SubjectID {subject!r} repeats line {first_line[subject]}")
        else:
            first_line[subject] = line
        if not pattern.search(subject):
            problems.append(f"line {line}: SubjectID {subject!r} does not match the {schema.year} pattern "
                            f"{pattern.pattern}")
        elif images is not None and not (Path(images) / subject).is_file():
            problems.append(f"line {line}: SubjectID {subject!r} names no file in {images}")
    return problems


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    frame = read_submission(args.submission)
    problems = submission_violations(frame, args.schema, args.images)
    for problem in problems:
        print(f"error: {args.submission}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_BAD_INPUT
    print(f"ok: {args.submission}: {len(frame)} rows follow the {args.schema} rules")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
