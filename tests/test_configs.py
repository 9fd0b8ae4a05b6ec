"""Every YAML file in configs/ loads with its own script's parser, in one key style, each key takes effect, and no
key repeats the parser's default: the parser's defaults are the defaults, a config holds only a recipe."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import yaml

from common.cli import parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


def _script(path: Path):
    # <script>.yaml, <script>.<recipe>.yaml for the recipes of one script, or <models>.<stage>.yaml for the
    # pipeline's train script when the first part names no script (brain3d_report's twin.warmup.yaml)
    first = path.stem.split(".")[0]
    if importlib.util.find_spec(f"{path.parent.name}.{first}") is None:
        first = "train"
    return importlib.import_module(f"{path.parent.name}.{first}")


def test_there_are_configs():
    assert {p.parent.name for p in CONFIGS} >= {"pneumonia"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_with_its_script(path):
    values = yaml.safe_load(path.read_text())
    assert values and all(key == key.lower() and "-" not in key for key in values), "keys must be snake_case"
    args = parse_args(_script(path).get_args_parser(), ["--config", str(path)])
    for key, value in values.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_repeats_no_default(path):
    defaults = vars(parse_args(_script(path).get_args_parser(), []))
    repeated = [key for key, value in yaml.safe_load(path.read_text()).items() if defaults.get(key) == value]
    assert not repeated, f"{path.name} repeats the parser's defaults for {', '.join(repeated)}"
