"""The shared driver of every pipeline's ``predict``: same flags, one row per file, resumable, bad files listed.

Example (any pipeline):
    python -m <pipeline>.predict --run-dir runs/demo/<pipeline>/run --input my_scans/ --out preds/

A pipeline supplies a ``Predictor``: built once from the run (model loaded), then called per input file with a
folder for that file's figures. Rows are appended to ``OUT/predictions.jsonl`` and flushed one by one, so a kill
loses at most the file in progress and a rerun skips the files already there; ``predictions.csv`` and
``predictions.json`` are rewritten atomically from that journal at the end. A file that cannot be read gets a row
with an ``error`` column (and no results) and is skipped; the command exits 0 when at least one file was read and 2
when none was. A single ``--input`` file that cannot be read is one line and exit 2, with nothing written. A rerun
into the same ``--out`` with another run or other options is refused, so rows of two models never mix.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from common.cli import MedvlArgumentParser, base_parser
from common.errors import ConfigError, DataError, MedvlError
from common.feature_cache import file_digest
from common.reader import list_inputs
from common.rundir import WEIGHTS_FILE, atomic_write_json, atomic_write_text, find_model_dir, read_jsonl

JOURNAL, CSV, JSON, SETTINGS = "predictions.jsonl", "predictions.csv", "predictions.json", "predict.meta.json"
FIGURES = "figures"


class Predictor(Protocol):
    """What a pipeline's predict offers the driver and the web app."""

    kind: str  # "picture" or "volume": what ``list_inputs`` collects from a folder

    def __call__(self, path: Path, figures: Path, text: str | None = None) -> dict[str, Any]:
        """One file's row (flat JSON values; figure paths relative to the output folder's parent are fine)."""


def predict_parser(description: str | None, text: bool = False) -> argparse.ArgumentParser:
    """The flags every ``<pipeline>.predict`` shares (``--report``/``--reports`` where a text is needed)."""
    parent = base_parser(device=True, cache_dir=True)
    parser = MedvlArgumentParser(description=description, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a trained run of this pipeline")
    parser.add_argument("--input", type=Path, required=True, help="one file, or a folder processed file by file")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: predictions.csv/.json, figures/ (a rerun resumes)")
    if text:
        parser.add_argument("--report", default=None, help="the report text that goes with the image(s)")
        parser.add_argument("--reports", type=Path, default=None, help="a CSV with columns image,report")
    return parser


def reports_for(args: argparse.Namespace) -> Callable[[Path], str]:
    """Path -> report text from ``--report`` (one text for all) or ``--reports`` CSV (matched by file name)."""
    if (args.report is None) == (args.reports is None):
        raise ConfigError("--report", "give exactly one of --report TEXT or --reports CSV")
    if args.report is not None:
        if not args.report.strip():
            raise ConfigError("--report", "the report text is empty")
        return lambda path: args.report
    try:
        table = pd.read_csv(args.reports, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise DataError(args.reports, f"not a readable CSV ({err})") from err
    if not {"image", "report"} <= set(table.columns):
        raise DataError(args.reports, f"needs columns image,report (has {list(table.columns)})")
    texts = {Path(str(image)).name: str(report) for image, report in zip(table["image"], table["report"])}

    def lookup(path: Path) -> str:
        text = texts.get(path.name, "")
        if not text.strip():
            raise DataError(path, f"no report for {path.name} in {args.reports}" if path.name not in texts
                            else "the report text is empty")
        return text

    return lookup


def _settings(run_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    model_dir = find_model_dir(Path(run_dir))
    return {"run_dir": str(Path(run_dir).resolve()), "model_sha256": file_digest(model_dir / WEIGHTS_FILE),
            "options": options}


def run_predictions(run_dir: Path, input_path: Path, out: Path, kind: str, make_predictor: Callable[[], Predictor],
                    options: dict[str, Any] | None = None, text_for: Callable[[Path], str] | None = None) -> int:
    """List the inputs, predict the ones not yet in ``out``, write the tables; the exit code of ``main``."""
    input_path, out = Path(input_path), Path(out)
    files = list_inputs(input_path, kind)
    single = input_path.is_file() or len(files) == 1 and files[0] == input_path
    predictor = make_predictor()  # checks the run (pipeline, weights) before anything is written
    settings = _settings(run_dir, options or {})
    settings_path = out / SETTINGS
    if settings_path.is_file():
        try:
            old = json.loads(settings_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != settings:
            raise ConfigError("--out", f"{out} holds predictions of another run or other options; choose another "
                                       "--out (nothing there was changed)")
    journal = out / JOURNAL
    rows = read_jsonl(journal) if journal.is_file() else []
    done = {row["file"] for row in rows if "file" in row}
    todo = [path for path in files if str(path) not in done]
    if todo and not out.exists():
        out.mkdir(parents=True)
    for path in todo:
        try:
            text = text_for(path) if text_for is not None else None
            row = {"file": str(path), **predictor(path, out / FIGURES / _stem(path), text)}
        except MedvlError as err:
            if single:
                raise
            row = {"file": str(path), "error": err.message}
            print(f"skipped {path}: {err.message}")
        if not settings_path.is_file():
            atomic_write_json(settings_path, settings)
        with open(journal, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        rows.append(row)
    listed = {str(p) for p in files}
    rows = [row for row in rows if row.get("file") in listed]
    good = [row for row in rows if "error" not in row]
    if not good:
        reasons = "; ".join(f"{Path(r['file']).name}: {r['error']}" for r in rows[:3]) or "no files"
        raise DataError(input_path, f"nothing readable ({reasons})")
    write_tables(out, rows)
    print(f"{out / CSV}: {len(good)} file(s) predicted, {len(rows) - len(good)} skipped")
    return 0


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def write_tables(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``predictions.csv`` (lists joined by ``;``) and ``predictions.json``, each written atomically."""
    flat = [{k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
    frame = pd.DataFrame(flat)
    if "error" in frame.columns:
        frame = frame[[c for c in frame.columns if c != "error"] + ["error"]]
    atomic_write_text(out / CSV, frame.to_csv(index=False))
    atomic_write_json(out / JSON, list(rows))


__all__ = ["Predictor", "predict_parser", "reports_for", "run_predictions", "write_tables", "JOURNAL", "CSV", "JSON",
           "FIGURES"]
