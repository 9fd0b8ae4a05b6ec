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


def _floor_flags() -> set[str]:
    """The flags of the floor's parsers (``common.cli.base_parser``, ``common.engine.add_train_args``,
    ``common.predict.predict_parser``): a pipeline shares these through the floor, not its own ``shared.py``."""
    from common.cli import base_parser
    from common.engine import add_train_args
    from common.predict import predict_parser

    train = base_parser()
    add_train_args(train)
    parsers = (base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True,
                           quantization=True), predict_parser(None, text=True), train)
    return {flag for parser in parsers for action in parser._actions for flag in action.option_strings}


def _flag_modules(package_dir: Path) -> dict[str, list[str]]:
    """flag -> the modules of ``package_dir`` whose ``add_argument`` calls define it (an AST scan, not an import)."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                        found.setdefault(arg.value, set()).add(path.relative_to(package_dir).as_posix())
    return {flag: sorted(modules) for flag, modules in found.items()}


def repeated_flags(package_dir: Path, floor: set[str]) -> dict[str, list[str]]:
    """The flags (other than the floor's) that two or more modules of a pipeline define: each belongs in one
    ``add_*_arg`` function of the pipeline's ``shared.py``, which every command that takes it calls."""
    return {flag: modules for flag, modules in _flag_modules(package_dir).items()
            if len(modules) > 1 and flag not in floor}


def test_repeated_flags_finds_a_flag_two_modules_define(tmp_path):
    (tmp_path / "train.py").write_text('parser.add_argument("--schema", default="2025", help="edition")\n'
                                       'parser.add_argument("--seed", type=int, help="seed")\n')
    (tmp_path / "evaluate.py").write_text('group.add_argument("--schema", help="edition")\n'
                                          'group.add_argument("--seed", type=int, help="seed")\n'
                                          'group.add_argument("--only-here", help="x")\n')
    (tmp_path / "shared.py").write_text('def add_x_arg(parser):\n    parser.add_argument("--x", help="x")\n')
    assert repeated_flags(tmp_path, floor={"--seed"}) == {"--schema": ["evaluate.py", "train.py"]}


@pytest.mark.parametrize("pipeline", [pipeline.name for pipeline in discover()])
def test_a_pipeline_defines_each_flag_in_one_module(pipeline):
    floor = _floor_flags()
    assert {"--seed", "--batch-size", "--run-dir", "--cache-dir"} <= floor
    repeated = repeated_flags(REPO / pipeline, floor)
    assert not repeated, (f"{pipeline}: flags defined in more than one module (move each into an add_*_arg in "
                          f"{pipeline}/shared.py): "
                          + "; ".join(f"{flag} in {', '.join(modules)}" for flag, modules in sorted(repeated.items())))
