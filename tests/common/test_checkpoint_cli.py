"""Checkpoint files round-trip and never half-write; YAML configs merge under flags and reject unknown keys."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
import yaml

from common import rundir
from common.cli import base_parser, config_text, parse_args
from common.errors import ConfigError, DataError, cli_entry
from common.rundir.files import _atomic_replace


def test_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(5, 3))
    rundir.save_model(tmp_path / "best", model, {"arch": "toy", "threshold": 0.37})
    state, meta = rundir.load_model_files(rundir.find_model_dir(tmp_path))
    assert meta["arch"] == "toy" and meta["threshold"] == 0.37 and "versions" in meta
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(state)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_damaged_files_are_data_errors(tmp_path):
    rundir.save_model(tmp_path, torch.nn.Linear(2, 2), {})
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="cannot read weights"):
        rundir.load_model_files(tmp_path)
    (tmp_path / "model.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        rundir.load_model_files(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        rundir.find_model_dir(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no trained model"):
        rundir.find_model_dir(tmp_path / "empty")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "results.json"
    rundir.atomic_write_json(target, {"dice": 0.8})

    def failing(handle):
        handle.write(b"{partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _atomic_replace(target, failing)
    assert json.loads(target.read_text()) == {"dice": 0.8}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)


def _parser():
    parser = argparse.ArgumentParser(parents=[base_parser(seed=True)])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--arch", choices=["a", "b"], default="a")
    return parser


def test_yaml_defaults_under_flags_and_saved(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\naugment: false\narch: b\nseed: 7\n")
    args = parse_args(_parser(), ["--config", str(config), "--epochs", "5"])
    assert (args.epochs, args.augment, args.arch, args.seed) == (5, False, "b", 7)
    rundir.atomic_write_text(tmp_path / "run" / "config.yaml", config_text(args))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["epochs"] == 5 and saved["arch"] == "b" and "config" not in saved
    again = parse_args(_parser(), ["--config", str(tmp_path / "run" / "config.yaml")])
    assert (again.epochs, again.arch, again.seed) == (5, "b", 7)


@pytest.mark.parametrize("text, needle", [("epoch: 3\n", "unknown key 'epoch'"), ("arch: c\n", "not one of"),
                                          ("[1, 2]\n", "mapping"), ("a: [\n", "not valid YAML")])
def test_bad_configs(tmp_path, text, needle):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        parse_args(_parser(), ["--config", str(config)])


def test_cli_entry_prints_one_line_and_exit_2(capsys):
    @cli_entry
    def main():
        raise DataError("/data/x.npz", "missing key 'train_images'")

    assert main() == 2
    assert capsys.readouterr().err == "error: /data/x.npz: missing key 'train_images'\n"
