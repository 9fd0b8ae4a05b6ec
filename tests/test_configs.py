"""Every YAML file in configs/ loads with its own script's parser, in one key style, and each key takes effect."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from common.cli import parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


def test_there_are_configs_for_both_pipelines():
    assert {p.parent.name for p in CONFIGS} >= {"pneumonia", "cxr_localize"}


def script_of(path: Path) -> str:
    """<script>.yaml, <script>.<variant>.yaml for several configs of one script (train.contrastive.yaml), or a
    recipe named for itself whose usage line (``# python -m <package>.<script> --config ...``) names its script."""
    usage = re.search(r"python -m (\S+) --config", path.read_text())
    return usage.group(1) if usage else f"{path.parent.name}.{path.stem.split('.')[0]}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_with_its_script(path):
    script = importlib.import_module(script_of(path))
    values = yaml.safe_load(path.read_text())
    assert values and all(key == key.lower() and "-" not in key for key in values), "keys must be snake_case"
    args = parse_args(script.get_args_parser(), ["--config", str(path)])
    for key, value in values.items():
        assert getattr(args, key) == value, key
