"""One-line errors for bad input: a researcher should see the file and the problem, not a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_BAD_INPUT = 2


class MedvlError(Exception):
    """An error about user input that names where it came from.

    Args:
        source: the file, directory or flag at fault (printed first).
        message: what is wrong with it, in one line.
    """

    def __init__(self, source: str | Path, message: str):
        self.source = str(source)
        self.message = message
        super().__init__(f"{self.source}: {message}")


class DataError(MedvlError):
    """A data file is missing, unreadable or has the wrong structure."""


class ConfigError(MedvlError):
    """A flag, config file or model name is wrong."""


def cli_entry(fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a script's ``main`` so a MedvlError prints ``error: <file>: <what>`` and returns exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except MedvlError as err:
            print(f"error: {err.source}: {err.message}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapper
