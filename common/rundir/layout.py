"""The layout of a run directory: the names of what the training loop writes, where a trained model is found,
and the loop's history file.

    runs/<pkg>/<run>/
      config.yaml                 resolved arguments (reusable with --config)
      metrics.jsonl  train.log    one line per epoch; the log
      checkpoints/last/           the resume state (common.rundir.resume)
      best/                       model.safetensors + model.json of the best epoch (common.rundir.weights)
      .pending-<writer>/          a result set being written (common.rundir.swap)
      ...                         what the pipeline's commands write (its declared run_outputs)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.rundir.files import atomic_write_text, read_jsonl
from common.rundir.swap import committed_dir, recover_results

BEST_DIR = "best"
LAST_DIR = "checkpoints/last"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "metrics.jsonl"
LOG_FILE = "train.log"

FLOOR_OUTPUTS = (CONFIG_FILE, HISTORY_FILE, LOG_FILE, "checkpoints", BEST_DIR, "best.old", "best.tmp", ".pending",
                 ".pending-*")
"""What ``common.engine.fit`` itself writes into a run directory (the loop's history, log, checkpoints, best model,
their swap siblings and result-set staging folders). ``.lock`` is not one: the running command holds it."""

RUN_MARKERS = (CONFIG_FILE, HISTORY_FILE, "checkpoints", BEST_DIR)
"""Any of these makes a folder a medvl run directory (``--overwrite`` replaces only such a folder)."""


def find_model_dir(run_dir: Path) -> Path:
    """Accept a run directory or its ``best/`` directory and return the one holding the model files."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DataError(run_dir, "run directory does not exist")
    if not run_dir.is_dir():
        raise DataError(run_dir, "not a directory")
    recover_results(run_dir)
    for candidate in (committed_dir(run_dir / BEST_DIR), run_dir):
        if (candidate / META_FILE).is_file():
            return candidate
    raise DataError(run_dir, f"no trained model here (expected {BEST_DIR}/{META_FILE}); train first")


def read_history(path: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` records, each with an integer ``step`` (what resume truncates by)."""
    if path.exists() and not path.is_file():
        raise DataError(path, "is not a file")
    records = read_jsonl(path) if path.is_file() else []
    for number, record in enumerate(records, 1):
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise DataError(path, f"record {number} has no integer 'step'")
    return records


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` whole (it is small): a kill never leaves a partial line."""
    atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in history))
