"""What this pipeline's commands share: the flags that find a trained run and the data it was trained on
(``evaluate``, ``explain``, ``report``, ``retrieval``), which ``pneumonia.model.load_run_and_data`` reads."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """``--run-dir`` (required) and ``--data-root`` (default: the run's own data)."""
    parser.add_argument("--run-dir", type=Path, required=True, help="a trained pneumonia run (RUN/best/model.json)")
    parser.add_argument("--data-root", type=Path, default=None, help="defaults to the data the run was trained on")


__all__ = ["add_run_args"]
