"""One-line errors for bad input: a researcher should see the file and the problem, not a traceback."""

from __future__ import annotations

import contextlib
import contextvars
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


_COMMAND: contextvars.ContextVar[tuple[str, contextlib.ExitStack] | None] = contextvars.ContextVar(
    "medvl_command", default=None)


def current_command() -> tuple[str, contextlib.ExitStack] | None:
    """``(name, exit stack)`` of the innermost ``cli_entry`` command running in this context, or None.

    What a command acquires for its whole life (``common.run_guard``'s run lock) is pushed on the exit stack and
    released when ``main`` returns or raises, also when it is called in-process (tests, ablation drivers).
    """
    return _COMMAND.get()


def _command_name(fn: Callable) -> str:
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return module


def cli_entry(fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a script's ``main`` so a MedvlError prints ``error: <file>: <what>`` and returns exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            with contextlib.ExitStack() as stack:
                token = _COMMAND.set((_command_name(fn), stack))
                try:
                    return fn(*args, **kwargs)
                finally:
                    _COMMAND.reset(token)
        except MedvlError as err:
            print(f"error: {err.source}: {err.message}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapper
