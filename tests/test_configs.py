"""Every YAML file in configs/ loads with its own script's parser, in one key style, each key takes effect, and no
key repeats the parser's default: the parser's defaults are the defaults, a config holds only a recipe."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from common.cli import parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


def _script(path: Path):
    """The script a config file is for: the one its usage line (``# python -m <package>.<script> --config ...``)
    names; else <script>.yaml or <script>.<recipe>.yaml; else the pipeline's train script for <models>.<stage>.yaml
    (brain3d_report's twin.warmup.yaml)."""
    usage = re.search(r"python -m (\S+) --config", path.read_text())
    if usage:
        return importlib.import_module(usage.group(1))
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
