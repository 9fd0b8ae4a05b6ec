"""Every ``python -m`` entry point of the repository prints its help (subcommands included) and exits 0."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PACKAGES = ("common", "pneumonia", "cxr_localize", "mavl_chexpert", "pathology_brats", "brain3d_report", "benchmarks")


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
