"""Parent argparse parser shared by every script, YAML ``--config`` defaults, and the saved resolved config."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

from common.checkpoint import atomic_write_text
from common.errors import ConfigError


def base_parser() -> argparse.ArgumentParser:
    """Flags every medvl script understands; pipelines add theirs on top via ``parents=[base_parser()]``."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common")
    group.add_argument("--config", type=Path, default=None, help="YAML file of defaults; flags on the command line win")
    group.add_argument("--output-dir", type=Path, default=None, help="run directory (created)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    group.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    group.add_argument("--cache-dir", type=Path, default=None, help="Hugging Face cache directory")
    group.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/last")
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with YAML defaults from ``--config`` underneath the command-line flags.

    YAML keys use the flag names with ``-`` or ``_``; a key the parser does not know is a ConfigError so a
    typo in a config never silently does nothing.
    """
    pre, _ = parser.parse_known_args(argv)
    config_path = getattr(pre, "config", None)
    if config_path is not None:
        parser.set_defaults(**load_config_defaults(parser, Path(config_path)))
    return parser.parse_args(argv)


def load_config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """Read a YAML config and map its keys onto the parser's destinations, checking each one."""
    if not path.is_file():
        raise ConfigError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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
        action = actions[dest]
        if action.type is not None and value is not None and not isinstance(value, list | bool):
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ConfigError(path, f"{key}: {value!r} is not one of {sorted(map(str, action.choices))}")
        defaults[dest] = value
    return defaults


def save_config(args: argparse.Namespace, run_dir: Path) -> Path:
    """Write the resolved arguments as ``config.yaml`` so a run can be repeated with ``--config``."""
    skipped = ("config", "resume")
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skipped}
    path = Path(run_dir) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(resolved, sort_keys=True))
    return path
