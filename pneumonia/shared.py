"""What this pipeline's commands share: the flags that find a trained run and the data it was trained on
(``evaluate``, ``explain``, ``report``, ``retrieval``), which ``pneumonia.model.load_run_and_data`` reads. A flag
more than one command takes is defined here once (``add_*_arg``), so its name, type and help agree."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import positive_int
from common.vlm import VLM_PRESETS
from pneumonia.data import SPLITS


def add_data_root_arg(parser, help: str = "defaults to the data the run was trained on") -> None:
    parser.add_argument("--data-root", type=Path, default=None, help=help)


def add_split_arg(parser, help: str) -> None:
    """``--split``: the split a command reads (the test split once per finished run); each says what it does."""
    parser.add_argument("--split", default="test", choices=SPLITS, help=help)


def add_n_boot_arg(parser) -> None:
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the 95%% intervals")


def add_vlm_arg(parser, default: str | None) -> None:
    """``--vlm``: the report VLM (``predict`` writes no report without one: its default is None)."""
    parser.add_argument("--vlm", default=default,
                        help=f"preset ({', '.join(VLM_PRESETS)}), a save_pretrained directory or a hub id owner/name"
                             + ("" if default else " (default: no VLM report)"))


def add_prompt_arg(parser, default: str, help: str, choices: tuple[str, ...] | None = None) -> None:
    """``--prompt``: ``report`` takes any of its prompts or all; ``predict`` one of those it offers."""
    parser.add_argument("--prompt", default=default, choices=choices, help=help)


def add_max_new_tokens_arg(parser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=200,
                        help="longest VLM report generated, in tokens")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """``--run-dir`` (required) and ``--data-root`` (default: the run's own data)."""
    parser.add_argument("--run-dir", type=Path, required=True, help="a trained pneumonia run (RUN/best/model.json)")
    add_data_root_arg(parser)


__all__ = ["add_data_root_arg", "add_split_arg", "add_n_boot_arg", "add_vlm_arg", "add_prompt_arg",
           "add_max_new_tokens_arg", "add_run_args"]
