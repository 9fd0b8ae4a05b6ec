"""Run directories are transactions and hold no pickles: planted code never runs, kills never leave a mix."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from common.engine import TrainConfig, fit
from common.errors import ConfigError, DataError
from common.rundir import (
    committed_dir,
    find_model_dir,
    load_model_files,
    read_jsonl,
    recover_results,
    result_set,
    save_model,
    staged_dir,
    swap,
    swap_dir,
)
from common.rundir import resume as train_state
from tests.common.toy import ToyTask, toy_data, toy_model


class _Payload:
    """Unpickling this creates a marker file: the proof that code from a run directory ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _data(n=64):
    return toy_data(n, dim=5)


def _model():
    return toy_model(dim=5, hidden=8, dropout=0.2, seed=3, lr=1e-2)


_Task = ToyTask


def _config(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 8, "progress": False, "device": "cpu", "precision": "fp32",
                          **kw})


def _interrupted(run_dir, max_steps=5):
    model, opt = _model()
    fit(model, opt, _data(), _data(32), _Task(), _config(max_steps=max_steps), run_dir)
    return run_dir / "checkpoints" / "last"


def _resume(run_dir, **kw):
    model, opt = _model()
    return model, fit(model, opt, _data(), _data(32), _Task(), _config(resume=True, **kw), run_dir)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any pickle load during the test fails it, whatever file it would read."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    last = _interrupted(tmp_path / "run")
    names = sorted(p.name for p in last.iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_0.json",
                     "rng_0.safetensors", "trainer.json"]
    for path in last.glob("*.json"):
        json.loads(path.read_text())


def test_planted_pickles_never_run_on_resume(tmp_path, no_unpickling):
    run = tmp_path / "run"
    last = _interrupted(run)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                 "scheduler.bin", "pytorch_model.bin"):
        (last / name).write_bytes(payload)  # what Accelerate would have read
    model, result = _resume(run)
    assert result.global_step == 24 and not marker.exists()

    _interrupted(tmp_path / "run2")
    last = tmp_path / "run2" / "checkpoints" / "last"
    for path in list(last.iterdir()):
        path.write_bytes(payload)
    with pytest.raises(DataError):
        _resume(tmp_path / "run2")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.json",
                                  "rng_0.json", "rng_0.safetensors"])
@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_corrupt_or_missing_resume_file_is_named(tmp_path, name, damage):
    last = _interrupted(tmp_path / "run")
    path = last / name
    blob = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\x80\x04garbage" if damage == "garbage" else blob[: len(blob) // 2])
    with pytest.raises(DataError) as info:
        _resume(tmp_path / "run")
    assert info.value.source == str(path)


def test_wrong_types_in_trainer_json_are_named(tmp_path):
    last = _interrupted(tmp_path / "run")
    record = json.loads((last / "trainer.json").read_text())
    record["loop"]["global_step"] = "five"
    (last / "trainer.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="trainer.json"):
        _resume(tmp_path / "run")


def test_resume_is_exact_with_the_new_state_format(tmp_path):
    model_a, opt_a = _model()
    fit(model_a, opt_a, _data(), _data(32), _Task(), _config(), tmp_path / "a")
    _interrupted(tmp_path / "b", max_steps=11)  # mid-epoch 2
    model_b, result = _resume(tmp_path / "b")
    assert result.completed and result.global_step == 24
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "b" / "metrics.jsonl"))


def test_resume_refuses_changed_loop_settings(tmp_path):
    _interrupted(tmp_path / "run")
    model, opt = _model()
    with pytest.raises(ConfigError, match="batch_size 8 -> 16") as info:
        fit(model, opt, _data(), _data(32), _Task(), _config(resume=True, batch_size=16), tmp_path / "run")
    assert info.value.source == "--resume"
    with pytest.raises(ConfigError, match="train_size 64 -> 48"):
        fit(model, opt, _data(48), _data(32), _Task(), _config(resume=True), tmp_path / "run")


def test_non_empty_run_dir_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    model, opt = _model()
    fit(model, opt, _data(), _data(32), _Task(), _config(epochs=1), run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(model, opt, _data(), _data(32), _Task(), _config(epochs=1), run)
    with pytest.raises(ConfigError, match="unknown metric 'val_los'"):
        fit(model, opt, _data(), _data(32), _Task(), _config(epochs=1, overwrite=True, monitor="val_los"), run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    result = fit(model, opt, _data(), _data(32), _Task(), _config(epochs=2, overwrite=True), run)
    assert result.completed and len(read_jsonl(run / "metrics.jsonl")) == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        fit(model, opt, _data(), _data(32), _Task(), _config(), tmp_path / "file")


def test_empty_splits_and_undefined_monitor_are_errors(tmp_path):
    model, opt = _model()
    with pytest.raises(DataError, match="training split is empty"):
        fit(model, opt, _data(0), _data(32), _Task(), _config(), tmp_path / "a")
    with pytest.raises(DataError, match="validation split is empty"):
        fit(model, opt, _data(), _data(0), _Task(), _config(), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    class NanTask(_Task):
        def validate(self, model, loader, device):
            return {"loss": float("nan")}

    with pytest.raises(DataError, match="never a finite number"):
        fit(model, opt, _data(), _data(32), NanTask(), _config(epochs=1), tmp_path / "c")


def test_partial_last_line_of_metrics_is_dropped_on_resume(tmp_path):
    run = tmp_path / "run"
    _interrupted(run, max_steps=11)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "st')
    _, result = _resume(run)
    assert result.completed and [r["epoch"] for r in read_jsonl(metrics)] == [1, 2, 3]
    metrics.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_jsonl(metrics)


def test_best_is_replaced_whole(tmp_path, monkeypatch):
    final = tmp_path / "best"
    save_model(final, torch.nn.Linear(2, 1), {"epoch": 1})
    with pytest.raises(RuntimeError), staged_dir(final) as staged:
        save_model(staged, torch.nn.Linear(2, 1), {"epoch": 2})
        raise RuntimeError("killed after the weights, before the metadata")
    assert load_model_files(final)[1]["epoch"] == 1 and not (tmp_path / "best.tmp").exists()

    real_replace, calls = os.replace, {"n": 0}

    def dies_on_second_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    staged = tmp_path / "best.tmp"
    staged.mkdir()
    save_model(staged, torch.nn.Linear(2, 1), {"epoch": 3})
    monkeypatch.setattr(swap.os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        swap_dir(staged, final)
    monkeypatch.setattr(swap.os, "replace", real_replace)
    assert not final.exists() and committed_dir(final).name == "best.old"
    assert load_model_files(find_model_dir(tmp_path))[1]["epoch"] == 1  # readers see the old model, whole
    with staged_dir(final) as staged:
        save_model(staged, torch.nn.Linear(2, 1), {"epoch": 4})
    assert load_model_files(final)[1]["epoch"] == 4 and not (tmp_path / "best.old").exists()


def _write_set(run, tag):
    with result_set(run) as staging:
        for name in ("results.json", "results.md", "predictions/test.csv"):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(tag)


def _set(run):
    return {name: (run / name).read_text() for name in ("results.json", "results.md", "predictions/test.csv")}


def test_result_set_is_old_or_new(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _write_set(run, "old")
    with pytest.raises(RuntimeError), result_set(run) as staging:
        (staging / "results.json").write_text("new")
        raise RuntimeError("crash while writing the set")
    assert set(_set(run).values()) == {"old"} and not (run / ".pending").exists()

    real_replace, calls = os.replace, {"n": 0}

    def dies_after_first_move(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:  # the commit record, the first file, then the kill
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(swap.os, "replace", dies_after_first_move)
    with pytest.raises(KeyboardInterrupt):
        _write_set(run, "new")
    monkeypatch.setattr(swap.os, "replace", real_replace)
    recover_results(run)  # what every medvl tool does before it touches the run directory
    assert set(_set(run).values()) == {"new"} and not (run / ".pending").exists()


def test_optimizer_state_round_trip(tmp_path):
    model, opt = _model()
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    train_state.save_optimizer(opt, tmp_path)
    fresh_model, fresh = _model()
    train_state.load_optimizer(fresh, tmp_path)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, entries in a["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, b["state"][index][name])
    other = torch.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.raises(DataError, match="optimizer"):
        train_state.load_optimizer(other, tmp_path)
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("blocker", ["predictions-file", "results-dir"])
def test_result_set_refuses_a_blocked_target_before_committing(tmp_path, blocker):
    run = tmp_path / "run"
    run.mkdir()
    (run / "figures").mkdir()
    (run / "figures" / "old.png").write_text("old")
    if blocker == "predictions-file":
        (run / "predictions").write_text("a file where a folder belongs")
        expected = run / "predictions"
    else:
        (run / "results.json").mkdir()
        expected = run / "results.json"
    with pytest.raises(DataError) as info:
        _write_set(run, "new")
    assert info.value.source == str(expected)
    assert not (run / ".pending").exists() and not (run / "results.md").exists()
    assert (run / "figures" / "old.png").read_text() == "old"


def test_damaged_history_and_rng_name_their_file(tmp_path):
    run = tmp_path / "run"
    last = _interrupted(run, max_steps=11)
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "step": "eight"}\n')
    with pytest.raises(DataError, match="record 1 has no integer 'step'"):
        _resume(run)
    metrics.write_text('{"epoch": 1, "step": 8}\n')
    record = json.loads((last / "rng_0.json").read_text())
    record["numpy"] = record["numpy"][:3]
    (last / "rng_0.json").write_text(json.dumps(record))
    with pytest.raises(DataError) as info:
        _resume(run)
    assert info.value.source == str(last / "rng_0.json")


def test_a_one_sample_last_batch_with_batchnorm_is_one_line(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="17 training samples leave a last batch") as info:
        fit(model, opt, _data(17), _data(32), _Task(), _config(), tmp_path / "run")  # 17 = 2 x 8 + 1
    assert info.value.source == "--batch-size"
    assert fit(model, opt, _data(18), _data(32), _Task(), _config(epochs=1), tmp_path / "ok").completed


def test_a_planted_commit_record_cannot_write_outside_the_run(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    outside.mkdir()
    (outside / "important.txt").write_text("safe")
    (run / "figures").symlink_to(outside, target_is_directory=True)
    (run / "up.txt").write_text("stays")
    pending = run / ".pending"
    (pending / "figures").mkdir(parents=True)
    (pending / "figures" / "important.txt").write_text("pwned")
    (pending / "COMMIT.json").write_text(json.dumps({"files": ["figures/important.txt", "../up.txt"]}))
    recover_results(run)
    assert (outside / "important.txt").read_text() == "safe" and (run / "up.txt").read_text() == "stays"
    assert not pending.exists()
    pending.mkdir()
    (pending / "COMMIT.json").write_text('{"files": 5}')
    recover_results(run)
    assert not pending.exists()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "myproject"
    (folder / "reports").mkdir(parents=True)
    (folder / "reports" / "thesis.tex").write_text("keep")
    model, opt = _model()
    with pytest.raises(ConfigError, match="not a medvl run directory"):
        fit(model, opt, _data(), _data(32), _Task(), _config(overwrite=True), folder)
    assert (folder / "reports" / "thesis.tex").read_text() == "keep"
