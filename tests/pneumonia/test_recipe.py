"""The pieces of the longer PneumoniaMNIST recipe: weight EMA, mixup/CutMix, class weights, TTA and the ensemble."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from common.ema import WeightEMA
from common.engine import TrainConfig
from common.errors import ConfigError
from common.metrics.classification import best_threshold
from common.rundir import load_model_files
from common.runs import load_run
from pneumonia import ensemble, train
from pneumonia.data import MEAN, STD
from pneumonia.model import PneumoniaNet, build_from_record, predict_proba, tta_views


def _ema_after(decays, history):
    """The closed form of k updates with decay d_t: prod(d) w0 + sum_i (1 - d_i) prod_{j > i} d_j w_i."""
    total = torch.zeros_like(history[0])
    for i, weights in enumerate(history):
        later = float(np.prod(decays[i:]))  # decays[i] belongs to update i + 1
        total += (later if i == 0 else (1 - decays[i - 1]) * later) * weights
    return total


@pytest.mark.parametrize("warmup", [False, True])
def test_weight_ema_is_the_closed_form_average(warmup):
    """For weights and float buffers alike; with warm-up the decay of update t is min(d, (1 + t) / (10 + t))."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    decay = 0.8
    ema = WeightEMA(model, decay, warmup=warmup)
    history = [{k: v.clone() for k, v in model.state_dict().items()}]
    generator = torch.Generator().manual_seed(0)
    steps = 40
    for step in range(1, steps + 1):
        with torch.no_grad():
            for value in model.state_dict().values():
                if value.dtype.is_floating_point:
                    value.copy_(torch.randn(value.shape, generator=generator))
                else:
                    value.add_(1)
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model, step)
    decays = [min(decay, (1 + t) / (10 + t)) if warmup else decay for t in range(1, steps + 1)]
    assert (decays[0] < 0.2) == warmup and decays[-1] == decay
    for name, value in ema.module.state_dict().items():
        if value.dtype.is_floating_point:
            expected = _ema_after(decays, [h[name] for h in history])
            assert torch.allclose(value, expected, atol=1e-5), name
        else:
            assert torch.equal(value, history[-1][name])  # the step counter is copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError):
        WeightEMA(model, 1.0)
    with pytest.raises(ConfigError):
        TrainConfig(ema_decay=1.5)


def _numbered_batch(n=8, size=6):
    """Image i is the constant i, so a mixed pixel tells which images it came from."""
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, size, size).clone()
    labels = torch.tensor([0.0, 1.0] * (n // 2))
    return images, labels


def test_mixup_mixes_images_and_targets_with_the_drawn_weight():
    torch.manual_seed(1)
    images, labels = _numbered_batch()
    mixed, targets, lam = train.mix_batch(images, labels, mixup_alpha=0.4)
    assert 0.0 < lam < 1.0
    partner = ((mixed[:, 0, 0, 0] - lam * images[:, 0, 0, 0]) / (1 - lam)).round().long()
    assert sorted(partner.tolist()) == list(range(len(labels)))  # a permutation of the batch
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[partner], atol=1e-5)
    assert torch.allclose(targets, lam * labels + (1 - lam) * labels[partner], atol=1e-6)
    same, same_targets, one = train.mix_batch(images, labels)
    assert one == 1.0 and same is images and same_targets is labels


def test_cutmix_target_weight_is_the_share_of_own_pixels():
    torch.manual_seed(3)
    images, labels = _numbered_batch(size=10)
    for _ in range(5):
        mixed, targets, lam = train.mix_batch(images, labels, cutmix_alpha=1.0)
        for i in range(len(labels)):
            pasted = mixed[i][mixed[i] != images[i]]
            if pasted.numel() == 0:  # paired with itself (or an empty box): its own target
                assert targets[i] == pytest.approx(labels[i].item())
                continue
            assert pasted.numel() / mixed[i].numel() == pytest.approx(1 - lam)
            partner = pasted.unique()
            assert len(partner) == 1  # one box from one other image
            expected = lam * labels[i] + (1 - lam) * labels[int(partner.item())]
            assert targets[i].item() == pytest.approx(expected.item())


def test_balanced_class_weights_put_the_constant_optimum_at_one_half():
    """With 3 pneumonia to 1 normal, plain BCE's best constant is 0.75 and the balanced one's is 0.5."""
    labels = np.array([1, 1, 1, 0] * 4)
    negative, positive = train.class_weights(labels, "balanced")
    assert (negative, positive) == pytest.approx((2.0, 2 / 3))
    assert negative * (labels == 0).sum() == pytest.approx(positive * (labels == 1).sum())
    targets = torch.as_tensor(labels, dtype=torch.float32)
    for weights, optimum in (((1.0, 1.0), 0.75), ((negative, positive), 0.5)):
        logit = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([logit], max_iter=50)

        def closure(weights=weights, logit=logit, optimizer=optimizer):
            optimizer.zero_grad()
            loss = train.weighted_bce(logit.expand(len(targets)), targets, *weights)
            loss.backward()
            return loss

        optimizer.step(closure)
        assert torch.sigmoid(logit).item() == pytest.approx(optimum, abs=1e-4)
    p = torch.tensor([0.2, 0.7])
    y = torch.tensor([0.3, 1.0])  # soft targets (mixup, smoothing) are weighted per class share
    manual = -(positive * y * p.log() + negative * (1 - y) * (1 - p).log()).mean()
    assert train.weighted_bce(torch.logit(p), y, negative, positive).item() == pytest.approx(manual.item(), rel=1e-5)


def test_shift_tta_averages_the_one_pixel_shifts():
    images = torch.randn(3, 1, 5, 5)
    views = tta_views(images, "shift")
    black = (0 - MEAN) / STD
    array = images.numpy()
    expected = []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        moved = np.full_like(array, black)
        for y in range(5):
            for x in range(5):
                if 0 <= y - dy < 5 and 0 <= x - dx < 5:
                    moved[..., y, x] = array[..., y - dy, x - dx]
        expected.append(moved)
    assert len(views) == 5 and torch.equal(views[0], images)
    for view, reference in zip(views[1:], expected):
        assert np.array_equal(view.numpy(), reference)
    torch.manual_seed(0)
    model = PneumoniaNet("resnet-tiny", width=8, tta="shift").eval()
    with torch.no_grad():
        by_hand = torch.stack([torch.sigmoid(model(torch.from_numpy(v))) for v in [array, *expected]]).mean(0)
        assert torch.allclose(model.probabilities(images), by_hand, atol=1e-6)
    assert tta_views(images, "none") == [images]


def _recipe_args(data_root, out, *extra):
    return ["--data-root", str(data_root), "--output-dir", str(out), "--arch", "resnet-tiny", "--width", "8",
            "--epochs", "2", "--train-limit", "96", "--batch-size", "16", "--no-progress", "--seed", "2",
            "--device", "cpu", "--precision", "fp32", "--ema-decay", "0.9", "--ema-warmup", "--mixup-alpha", "0.4",
            "--cutmix-alpha", "1.0", "--label-smoothing", "0.1", "--class-weight", "balanced", "--tta", "shift",
            "--drop-path", "0.1", "--dropout", "0.1", "--monitor", "val_loss", "--mode", "min", *extra]


@pytest.mark.slow
def test_recipe_run_saves_the_average_and_resumes_exactly(pneumonia_phantom, tmp_path):
    """The best model is the EMA (not the raw weights) and a run stopped mid-epoch, resumed, ends identically."""
    root = pneumonia_phantom.parent
    assert train.main(_recipe_args(root, tmp_path / "full")) == 0
    assert train.main(_recipe_args(root, tmp_path / "cut", "--max-steps", "9")) == 0
    assert train.main(_recipe_args(root, tmp_path / "cut", "--resume")) == 0
    full, meta = load_model_files(tmp_path / "full" / "best")
    resumed, _ = load_model_files(tmp_path / "cut" / "best")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert meta["kwargs"] == {"width": 8, "drop_rate": 0.1, "drop_path_rate": 0.1, "tta": "shift"}
    last = tmp_path / "full" / "checkpoints" / "last"
    from safetensors.torch import load_file

    raw = load_file(last / "model.safetensors")
    averaged = load_file(last / "ema" / "model.safetensors")
    history = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
    key = "head.weight"
    assert not torch.equal(raw[key], averaged[key])
    if best_epoch == len(history):
        assert torch.equal(full[key], averaged[key])
    model = load_run(tmp_path / "full", "pneumonia", build_from_record).model
    assert model.tta == "shift"


@pytest.fixture(scope="module")
def second_run(pneumonia_phantom, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pneumonia_second")
    assert train.main(["--data-root", str(pneumonia_phantom.parent), "--output-dir", str(run_dir), "--arch",
                       "resnet-tiny", "--width", "16", "--epochs", "2", "--batch-size", "32", "--lr", "3e-3",
                       "--no-progress", "--seed", "1"]) == 0
    return run_dir


@pytest.mark.slow
def test_ensemble_scores_the_mean_probability(trained_pneumonia_run, second_run, tmp_path):
    first_run, npz = trained_pneumonia_run
    out = tmp_path / "ensemble"
    assert ensemble.main(["--run-dirs", str(first_run), str(second_run), "--output-dir", str(out),
                          "--n-boot", "50"]) == 0
    arrays = np.load(npz)
    members = [load_run(run, "pneumonia", build_from_record).model for run in (first_run, second_run)]
    mean = {split: np.mean([predict_proba(m, arrays[f"{split}_images"].reshape(-1, 28, 28)) for m in members], axis=0)
            for split in ("val", "test")}
    labels = {split: arrays[f"{split}_labels"].reshape(-1) for split in ("val", "test")}
    predictions = pd.read_csv(out / "predictions" / "test.csv")
    assert np.allclose(predictions["prob_pneumonia"], mean["test"], atol=1e-6)
    results = json.loads((out / "results.json").read_text())
    assert results["threshold"] == pytest.approx(best_threshold(labels["val"], mean["val"], "youden"))
    assert results["auroc"] == pytest.approx(roc_auc_score(labels["test"], mean["test"]), abs=1e-9)
    from medmnist import Evaluator

    official = Evaluator("pneumoniamnist", "test", root=str(npz.parent)).evaluate(
        predictions["prob_pneumonia"].to_numpy()[:, None])
    assert results["auroc"] == pytest.approx(official.AUC, abs=1e-12)
    assert results["acc_at_0.5"] == pytest.approx(official.ACC, abs=1e-12)
    assert results["n_members"] == 2
    singles = []
    for run_dir, member in zip((first_run, second_run), members):
        threshold = json.loads((run_dir / "best" / "model.json").read_text())["thresholds"]["decision"]
        probs = predict_proba(member, arrays["test_images"].reshape(-1, 28, 28))
        singles.append(((probs >= threshold) == labels["test"]).mean())
    assert results["single_acc_mean"] == pytest.approx(np.mean(singles))
    assert results["single_acc_sd"] == pytest.approx(np.std(singles, ddof=1))


def test_ensemble_refuses_one_run(trained_pneumonia_run, tmp_path, capsys):
    run_dir, _ = trained_pneumonia_run
    assert ensemble.main(["--run-dirs", str(run_dir), "--output-dir", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --run-dirs:")
