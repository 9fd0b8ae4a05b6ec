"""Parent argparse parser shared by every script, YAML ``--config`` defaults, and the saved resolved config.

Flags and YAML keys go through the same converters (the ``type=`` of each flag: ``positive_int``,
``finite_float`` ...), so ``epochs: ten`` in a config and ``--epochs ten`` on the command line fail alike, with
one line that names the file or the flag. Argparse's own errors (unknown flag, bad choice) are turned into the
same one-line ``ConfigError`` instead of a usage dump.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError


class MedvlArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ``ConfigError``s naming the flag, printed by ``cli_entry`` in one line.

    Abbreviated flags are off: ``--epoch`` must not silently mean ``--epochs``, nor change meaning when a
    pipeline adds a flag that shares its prefix.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        match = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message)
        if match:
            raise ConfigError(match.group(1), match.group(2))
        match = re.match(r"the following arguments are required: (.*)", message)
        if match:
            raise ConfigError(match.group(1), "required")
        match = re.match(r"unrecognized arguments: (.*)", message)
        if match:
            raise ConfigError(match.group(1), f"unknown flag for {self.prog} (see --help)")
        raise ConfigError(self.prog, message)


def _number(kind: type, text: Any, what: str) -> Any:
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    try:
        value = kind(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {str(text)!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {str(text)!r}")
    return value


def _bounded(kind: type, what: str, check: Callable[[Any], bool]) -> Callable[[Any], Any]:
    def convert(text: Any) -> Any:
        value = _number(kind, text, what)
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    convert.__name__ = what.replace(" ", "_")
    return convert


positive_int = _bounded(int, "an integer >= 1", lambda v: v >= 1)
nonnegative_int = _bounded(int, "an integer >= 0", lambda v: v >= 0)
finite_float = _bounded(float, "a finite number", lambda v: True)
positive_float = _bounded(float, "a number > 0", lambda v: v > 0)
nonnegative_float = _bounded(float, "a number >= 0", lambda v: v >= 0)
unit_interval = _bounded(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
open_unit_interval = _bounded(float, "a number strictly between 0 and 1", lambda v: 0 < v < 1)
seed_int = _bounded(int, "a seed in 0..4294967295", lambda v: 0 <= v < 2**32)


def base_parser(*, output_dir: bool = False, seed: bool = False, device: bool = False, precision: bool = False,
                cache_dir: bool = False, quantization: bool = False) -> argparse.ArgumentParser:
    """The parent parser of every medvl script: ``--config`` plus the groups the script opts into.

    A script shows and accepts only flags it reads (the training group comes from ``engine.add_train_args``):
    ``output_dir`` and ``seed`` (the run), ``device`` and ``precision``, ``cache_dir`` and ``quantization``
    (models loaded through ``common.hf``).
    """
    parser = MedvlArgumentParser(add_help=False)
    group = parser.add_argument_group("common")
    group.add_argument("--config", type=Path, default=None, help="YAML file of defaults; flags on the command line win")
    if output_dir:
        group.add_argument("--output-dir", type=Path, default=None, help="directory the script writes into")
    if seed:
        group.add_argument("--seed", type=seed_int, default=0, help="seed of every random choice the script makes")
    if device:
        group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    if precision:
        group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                           help="autocast dtype; auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU "
                                "(bf16 on CPUs with AMX-BF16 for a model that gains from it: cpu_bf16)")
    if cache_dir or quantization:
        models = parser.add_argument_group("model loading")
        if cache_dir:
            models.add_argument("--cache-dir", type=Path, default=None, help="Hugging Face cache directory")
        if quantization:
            models.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"],
                                help="load the weights in 4-bit NF4 or 8-bit (bitsandbytes)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with YAML defaults from ``--config`` underneath the command-line flags.

    YAML keys use the flag names with ``-`` or ``_``; a key the parser does not know is a ConfigError so a
    typo in a config never silently does nothing.
    """
    if not isinstance(parser, MedvlArgumentParser):
        parser.error = MedvlArgumentParser.error.__get__(parser)  # one-line errors for any parser
    pre, _ = parser.parse_known_args(argv)
    config_path = getattr(pre, "config", None)
    if config_path is not None:
        target = _chosen_subparser(parser, pre)
        target.set_defaults(**load_config_defaults(target, Path(config_path)))
    return parser.parse_args(argv)


def _chosen_subparser(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> argparse.ArgumentParser:
    """The subcommand's parser when there is one (its flags, and YAML defaults, live there), else ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(namespace, action.dest, None))
            if chosen is not None:
                return _chosen_subparser(chosen, namespace)
    return parser


def _is_boolean(action: argparse.Action) -> bool:
    return isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction | argparse._StoreFalseAction)


def _convert(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """Convert one YAML value by the rules of its flag (type, booleans, nargs, choices)."""
    if value is None:
        return None
    if _is_boolean(action):
        if not isinstance(value, bool):
            raise ConfigError(path, f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, dict):
        raise ConfigError(path, f"{key}: expected a value, got a mapping")
    many = action.nargs not in (None, "?")
    if isinstance(value, list) != many:
        raise ConfigError(path, f"{key}: expected {'a list' if many else 'one value'}, got {value!r}")
    items = value if many else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise ConfigError(path, f"{key}: expected {action.nargs} values, got {len(items)}")
    converted = []
    for item in items:
        if isinstance(item, list | dict):
            raise ConfigError(path, f"{key}: expected a plain value, got {item!r}")
        if action.type is not None:
            if isinstance(item, bool):
                raise ConfigError(path, f"{key}: expected {getattr(action.type, '__name__', 'a value')}, got {item}")
            try:
                item = action.type(item if isinstance(item, str) else str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                raise ConfigError(path, f"{key}: {err}") from None
        elif not isinstance(item, str | int | float):
            raise ConfigError(path, f"{key}: expected text, got {item!r}")
        if action.choices is not None and item not in action.choices:
            raise ConfigError(path, f"{key}: {item!r} is not one of {sorted(map(str, action.choices))}")
        converted.append(item)
    return converted if many else converted[0]


def load_config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """Read a YAML config and map its keys onto the parser's destinations, checking each one."""
    if not path.is_file():
        raise ConfigError(path, "config file not found" if not path.exists() else "not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(path, f"not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise ConfigError(path, f"cannot read ({err.strerror})") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(path, f"not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise ConfigError(path, "config must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            known = ", ".join(sorted(actions))
            raise ConfigError(path, f"unknown key {key!r} (known: {known})")
        defaults[dest] = _convert(actions[dest], str(key), value, path)
    return defaults


UNSAVED_KEYS = ("config", "resume", "overwrite")


def require(args: argparse.Namespace, *names: str, **reasons: str) -> None:
    """Flags a script cannot run without (they may also come from ``--config``): a missing one is one error line.

    ``require(args, "data_root", output_dir="where the run is written")`` names the flag and, if given, why.
    """
    for name in (*names, *reasons):
        if getattr(args, name) is None:
            why = reasons.get(name)
            raise ConfigError(f"--{name.replace('_', '-')}", f"required: {why}" if why else "required")


def config_text(args: argparse.Namespace) -> str:
    """The resolved arguments as YAML, as ``config.yaml`` holds them (reusable with ``--config``)."""
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in UNSAVED_KEYS}
    return yaml.safe_dump(resolved, sort_keys=True)
