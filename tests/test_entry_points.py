"""Every ``python -m`` entry point of the repository prints its help (subcommands included) and exits 0."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from common.pipelines import discover

REPO = Path(__file__).resolve().parents[1]

PACKAGES = ("common", *(pipeline.name for pipeline in discover()), "benchmarks")
"""The floor, every declared pipeline (``common.pipelines``) and the benchmarks."""


def entry_points() -> list[str]:
    """Modules that run as scripts: a ``__main__.py`` or an ``if __name__ == "__main__"`` block."""
    modules = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")) if (REPO / package).is_dir() else []:
            text = path.read_text()
            if path.name == "__main__.py":
                modules.append(".".join(path.parent.relative_to(REPO).parts))
            elif 'if __name__ == "__main__"' in text:
                modules.append(".".join(path.with_suffix("").relative_to(REPO).parts))
    return modules


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    return [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices]


def test_discovery_finds_the_known_scripts():
    found = set(entry_points())
    assert {"pneumonia.train", "pneumonia.evaluate", "cxr_localize.evaluate", "common.phantoms",
            "benchmarks.retrieval", "common.demo"} <= found


@pytest.mark.parametrize("module", entry_points())
def test_help_prints_and_exits_0(module, capsys):
    script = importlib.import_module(module if not module.endswith("phantoms") else module + ".__main__")
    assert hasattr(script, "main") and hasattr(script, "get_args_parser"), module
    for prefix in ([], *[[name] for name in _subcommands(script.get_args_parser())]):
        with pytest.raises(SystemExit) as info:
            script.main([*prefix, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage:") and "--help" in out, (module, prefix)


def test_help_through_python_m():
    done = subprocess.run([sys.executable, "-m", "cxr_localize.evaluate", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and "--n-boot" in done.stdout and "95%" in done.stdout


def _parsers(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and each of its subcommands' parsers, depth first."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                found += _parsers(subparser, f"{name} {sub}")
    return found


@pytest.mark.parametrize("module", entry_points())
def test_every_flag_has_help(module):
    script = importlib.import_module(module if not module.endswith("phantoms") else module + ".__main__")
    if not hasattr(script, "get_args_parser"):
        pytest.skip(f"{module} builds its parser inside main (its --help is run by test_help)")
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, parser in _parsers(script.get_args_parser(), module) for action in parser._actions
               if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
               and not (action.help or "").strip() and action.help != argparse.SUPPRESS]
    assert not missing, "flags without help text: " + ", ".join(missing)


def test_train_config_fields_and_flags_are_one_definition():
    from dataclasses import fields

    from common.cli import base_parser
    from common.engine import TrainConfig, add_train_args, config_from_args

    parser = base_parser(output_dir=True, seed=True, device=True, precision=True)
    before = {action.dest for action in parser._actions}
    add_train_args(parser, epochs=3, monitor="val_auroc", mode="max")
    added = {action.dest for action in parser._actions} - before
    names = {spec.name for spec in fields(TrainConfig)}
    assert added == names - {"seed", "device", "precision"} and {"seed", "device", "precision"} <= before
    args = parser.parse_args(["--step-gamma", "0.5", "--eval-every", "2", "--step-size-epochs", "3", "--no-progress"])
    config = config_from_args(args)
    assert (config.step_gamma, config.eval_every, config.step_size_epochs, config.progress) == (0.5, 2, 3, False)
    assert (config.epochs, config.monitor, config.batch_size) == (3, "val_auroc", TrainConfig().batch_size)
    with pytest.raises(TypeError, match="no TrainConfig field"):
        add_train_args(base_parser(), epoch=3)
