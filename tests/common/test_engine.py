"""The training loop: exact resume, accumulation, schedules, best-by-metric and early stopping."""

from __future__ import annotations

import json

import pytest
import torch

from common.engine import EpochSampler, TrainConfig, build_scheduler, fit
from common.errors import ConfigError
from common.rundir import load_model_files
from tests.common.toy import ToyTask, toy_data, toy_model

_data, _model = toy_data, toy_model


def _history(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def _config(**kw):
    base = dict(epochs=3, batch_size=8, grad_accum=2, warmup_steps=2, clip_grad_norm=1.0, progress=False,
                device="cpu", precision="fp32")
    return TrainConfig(**{**base, **kw})


def test_resume_mid_epoch_is_exact(tmp_path):
    data = _data()
    model_a, opt_a = _model()
    full = fit(model_a, opt_a, data, data, ToyTask(), _config(), tmp_path / "a")
    model_b, opt_b = _model()
    part = fit(model_b, opt_b, data, data, ToyTask(), _config(max_steps=8), tmp_path / "b")
    assert part.global_step == 8 and full.global_step == 18  # 12 batches / 2 per step * 3 epochs
    model_c, opt_c = _model()
    resumed = fit(model_c, opt_c, data, data, ToyTask(), _config(resume=True), tmp_path / "b")
    assert resumed.global_step == full.global_step and resumed.best_value == full.best_value
    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, c), name
    assert _history(tmp_path / "a") == _history(tmp_path / "b")
    best_a, _ = load_model_files(tmp_path / "a" / "best")
    best_b, _ = load_model_files(tmp_path / "b" / "best")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_training_learns_and_keeps_best_by_mode(tmp_path):
    data = _data()
    model, opt = _model()
    scripted = [0.2, 0.9, 0.5]
    config = _config(monitor="val_score", mode="max", device="auto", precision="auto")  # the GPU path where present
    result = fit(model, opt, data, data, ToyTask(scripted), config, tmp_path)
    assert result.best_epoch == 2 and result.best_value == 0.9
    _, meta = load_model_files(tmp_path / "best")
    assert meta["metrics"]["val_score"] == 0.9
    history = _history(tmp_path)
    assert history[-1]["val_loss"] < history[0]["val_loss"] < 0.69  # better than chance and improving
    assert [bool(h.get("is_best")) for h in history] == [True, True, False]


def test_early_stopping(tmp_path):
    data = _data()
    model, opt = _model()
    config = _config(epochs=10, monitor="val_score", mode="min", patience=2)
    result = fit(model, opt, data, data, ToyTask([0.5, 0.4, 0.45, 0.41, 0.3] + [0.1] * 5), config, tmp_path)
    assert result.stopped_early and result.best_epoch == 2 and len(result.history) == 4


def test_grad_accumulation_matches_large_batch(tmp_path):
    """4 micro-batches of 8 with accumulation 4 give the same update as one batch of 32 (no dropout, no shuffle)."""
    data = _data(32)

    def linear():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 1)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    results = []
    for batch, accum in ((32, 1), (8, 4)):
        model, opt = linear()
        fit(model, opt, data, None, ToyTask(), TrainConfig(epochs=1, batch_size=batch, grad_accum=accum,
                                                           scheduler="constant", progress=False, device="cpu",
                                                           precision="fp32", monitor="train_loss"),
            tmp_path / f"b{batch}")
        results.append(model.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_schedulers_warmup_and_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(epochs=2, warmup_steps=4, scheduler="cosine"), steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.02
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step = build_scheduler(opt, TrainConfig(epochs=4, scheduler="step", step_size_epochs=1, step_gamma=0.5), 3)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        step.step()
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(20, seed=5), EpochSampler(20, seed=5)
    a.set_epoch(3)
    b.set_epoch(3, skip=7)
    assert list(b) == list(a)[7:] and sorted(a) == list(range(20))
    a.set_epoch(4)
    assert list(a) != list(b)
    shards = [list(EpochSampler(10, 0, rank=r, world=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and set().union(*shards) == set(range(10))


def test_bad_config_values():
    with pytest.raises(ConfigError, match="scheduler"):
        TrainConfig(scheduler="linear-ish")
    with pytest.raises(ConfigError, match="mode"):
        TrainConfig(mode="maximum")
