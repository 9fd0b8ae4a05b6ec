"""The loop's data paths: the device-resident split follows the sampler, augmentation is seeded by position, the
DataLoader path draws the same per-sample randomness at any worker count, and the loop reads the loss rarely."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from common import device_data
from common.device_data import (
    Compose,
    EvalBatches,
    IntensityJitter,
    RandomAffine,
    TensorData,
    TrainBatches,
    model_to_channels_last,
)
from common.engine import EpochSampler, TrainConfig, fit
from common.errors import ConfigError, DataError
from common.rundir import save_model

CPU = torch.device("cpu")


def _images(n=40, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=gen, dtype=torch.uint8)
    return images, (images.float().mean((1, 2, 3)) > 127.5).float()


def _decode(batch):
    images, labels = batch
    return images.float().div(255).sub(0.5).div(0.5), labels


def _augment():
    return Compose(RandomAffine(degrees=10, translate=0.1, scale=(0.9, 1.1), fill=-1.0),
                   IntensityJitter(brightness=0.1, contrast=0.1))


def _data(augment=True, n=40):
    images, labels = _images(n)
    return TensorData((images, labels), decode=_decode, batch_augment=_augment() if augment else None)


def _epoch(batches, sampler, epoch, skip=0):
    sampler.set_epoch(epoch, skip)
    return [tuple(t.clone() for t in batch) for batch in batches]


def test_device_batches_follow_the_sampler_and_match_the_loader_path():
    data = _data()
    sampler = EpochSampler(len(data), seed=7)
    on_device = TrainBatches(data, sampler, 16, CPU, on_device=True)
    loader = TrainBatches(data, sampler, 16, CPU, on_device=False)
    assert on_device.on_device and not loader.on_device
    a, b = _epoch(on_device, sampler, 2), _epoch(loader, sampler, 2)
    assert [len(x[0]) for x in a] == [16, 16, 8]
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    sampler.set_epoch(2)
    order = list(sampler)
    plain = TrainBatches(_data(augment=False), sampler, 16, CPU, on_device=True)
    images, labels = torch.cat([x[0] for x in _epoch(plain, sampler, 2)]), torch.cat([x[1] for x in a])
    expected_images, expected_labels = _decode(tuple(t[order] for t in data.tensors))
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    augmented = torch.cat([x[0] for x in a])
    assert not torch.equal(augmented, images)  # the augmentation did something


def test_augmentation_after_a_resume_point_is_the_uninterrupted_one():
    data = _data()
    sampler = EpochSampler(len(data), seed=3)
    batches = TrainBatches(data, sampler, 8, CPU)
    full = _epoch(batches, sampler, 1)
    tail = _epoch(batches, sampler, 1, skip=16)
    assert len(tail) == len(full) - 2
    for x, y in zip(full[2:], tail, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert not torch.equal(full[0][0], _epoch(batches, sampler, 2)[0][0])  # another epoch, other draws


def test_two_processes_draw_what_one_process_draws_for_each_sample():
    one = EpochSampler(10, seed=5)
    one.set_epoch(4)
    draws_by_sample = dict(zip(list(one), one.draws(3).unbind()))
    for rank in range(2):
        shard = EpochSampler(10, seed=5, rank=rank, world=2)
        shard.set_epoch(4)
        for index, draws in zip(list(shard), shard.draws(3).unbind()):
            assert torch.equal(draws, draws_by_sample[index])
    shard.set_epoch(4, skip=2)
    full = EpochSampler(10, seed=5, rank=1, world=2)
    full.set_epoch(4)
    assert torch.equal(shard.draws(3), full.draws(3)[2:])


def test_random_affine_values():
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)
    middle = torch.full((2, 4), 0.5)  # zero angle, unit zoom, no shift
    assert torch.allclose(RandomAffine(degrees=90, translate=0.2, scale=(0.8, 1.2))((x,), middle)[0], x, atol=1e-4)
    turned = RandomAffine(degrees=90)((x,), torch.tensor([[1.0, 0.5, 0.5, 0.5]] * 2))[0]
    assert torch.allclose(turned, torch.rot90(x, -1, (-2, -1)), atol=1e-4)  # pixel centres land on pixel centres
    shifted = RandomAffine(translate=1 / 6, fill=-5.0)((x,), torch.tensor([[0.5, 0.5, 1.0, 0.5]] * 2))[0]
    assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-4)
    assert torch.allclose(shifted[..., 0], torch.tensor(-5.0))  # what comes from outside is the fill
    mask = (x > 40).float()
    right = torch.tensor([[0.5, 0.5, 1.0, 0.5]] * 2)
    _, moved_mask = RandomAffine(translate=1 / 6, key=0, mask_key=1)((x, mask), right)
    assert torch.equal(moved_mask[..., 1:], mask[..., :-1]) and set(moved_mask.unique().tolist()) <= {0.0, 1.0}
    wide = torch.zeros(1, 1, 4, 8)
    wide[0, 0, 1, 2] = 1.0  # (x, y) = (-1.5, -0.5) from the centre; a quarter turn takes it to (0.5, -1.5)
    assert RandomAffine(degrees=90)((wide,), torch.tensor([[1.0, 0.5, 0.5, 0.5]]))[0][0, 0].argmax() == 4


def test_intensity_jitter_values():
    x = torch.tensor([[[[0.0, 2.0]]]])
    out = IntensityJitter(brightness=0.5, contrast=0.5, key="image")({"image": x}, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(out["image"], torch.tensor([[[[-1.0, 2.0]]]]))  # contrast 1.5 around 1, brightness -0.5


def test_tensor_data_and_placement():
    data = _data(augment=False)
    image, label = data[3]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and label.shape == ()
    assert data.to("cpu") is data and data.nbytes == 40 * 64 + 40 * 4
    with pytest.raises(ValueError, match="differ in length"):
        TensorData((torch.zeros(3), torch.zeros(4)))
    assert device_data.as_tensor_data(TensorDataset(torch.zeros(5, 2))).gather(slice(0, 2))[0].shape == (2, 2)
    evaluation = EvalBatches(data, 16, CPU)
    assert len(evaluation) == 3 and torch.equal(torch.cat([b[1] for b in evaluation]), data.tensors[1])


def test_a_split_that_does_not_fit_goes_through_the_loader(monkeypatch):
    monkeypatch.setattr(device_data, "fits_on_device", lambda nbytes, device, fraction=0.5: False)
    data = _data()
    assert not TrainBatches(data, EpochSampler(len(data), 0), 8, CPU).on_device
    assert TrainBatches(data, EpochSampler(len(data), 0), 8, CPU, on_device=True).on_device

    class Plain(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(2)

    with pytest.raises(ConfigError, match="not held as tensors"):
        TrainBatches(Plain(), EpochSampler(4, 0), 2, CPU, on_device=True)


class _NoisyDataset(Dataset):
    """Per-sample randomness from the global generators, as torchvision transforms use them."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        return torch.full((3,), float(index)) + torch.rand(3)


def test_worker_randomness_depends_on_position_not_on_workers_or_resume():
    sampler = EpochSampler(24, seed=2)
    one = _epoch(TrainBatches(_NoisyDataset(), sampler, 5, CPU, num_workers=1), sampler, 1)
    two = TrainBatches(_NoisyDataset(), sampler, 5, CPU, num_workers=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, _epoch(two, sampler, 1), strict=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one[2:], _epoch(two, sampler, 1, skip=10), strict=True))
    state = torch.get_rng_state()
    fetched = device_data.SeededFetch(_NoisyDataset()).__getitems__([(11, 0), (11, 1)])
    assert torch.equal(torch.get_rng_state(), state)  # in the main process the loop's own stream is untouched
    assert torch.equal(fetched[1], device_data.SeededFetch(_NoisyDataset()).__getitems__([(11, 0), (11, 1)])[1])


def test_main_process_loading_draws_from_the_checkpointed_global_stream():
    """Without workers, ``__getitem__`` randomness comes from the global generator, as it always has."""
    sampler = EpochSampler(24, seed=2)
    batches = TrainBatches(_NoisyDataset(), sampler, 5, CPU)
    torch.manual_seed(5)
    first = _epoch(batches, sampler, 1)
    torch.manual_seed(5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, _epoch(batches, sampler, 1), strict=True))


class _ConvTask:
    metric_names = ("loss",)

    def training_loss(self, model, batch):
        images, labels = batch
        return F.binary_cross_entropy_with_logits(model(images).squeeze(-1), labels)

    def validate(self, model, loader, device):
        losses = [F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="sum") for x, y in loader]
        return {"loss": float(sum(losses)) / len(loader.dataset)}

    def save_best(self, model, metrics, directory):
        save_model(directory, model, {"metrics": metrics})


def _conv_net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # fused: sensitive to memory layout


def _history(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def _config(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 8, "progress": False, "device": "cpu", "precision": "fp32",
                          "warmup_steps": 2, **kw})


@pytest.mark.parametrize("channels_last", [False, True])
def test_fit_resumes_exactly_with_device_data_and_augmentation(tmp_path, channels_last):
    data, val = _data(), _data(augment=False, n=16)
    runs = {}
    for name, kw in (("full", {}), ("part", {"max_steps": 7}), ("part", {"resume": True})):
        model, opt = _conv_net()
        runs[name] = fit(model, opt, data, val, _ConvTask(), _config(channels_last=channels_last, **kw),
                         tmp_path / name), model
    (full, model_full), (resumed, model_resumed) = runs["full"], runs["part"]
    assert resumed.completed and resumed.global_step == full.global_step == 15
    assert _history(tmp_path / "full") == _history(tmp_path / "part")
    for (name, a), b in zip(model_full.state_dict().items(), model_resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(full.epoch_seconds) == 3 and len(resumed.epoch_seconds) == 2  # the rest of epoch 2, then epoch 3


def test_device_path_and_loader_path_train_the_same_weights(tmp_path):
    weights = []
    for on_device in (True, False):
        model, opt = _conv_net()
        fit(model, opt, _data(), _data(augment=False, n=16), _ConvTask(),
            _config(epochs=2, data_on_device=on_device), tmp_path / str(on_device))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_channels_last_conversion_keeps_values():
    model, _ = _conv_net()
    x = _data(augment=False).gather(slice(0, 4))[0]
    model.eval()
    before = model(x)
    model_to_channels_last(model)
    assert model[3].weight.is_contiguous(memory_format=torch.channels_last) and not model[3].weight.is_contiguous()
    assert torch.allclose(model(device_data.to_memory_format(x, True)), before, atol=1e-5)


class _CountedLoss(torch.Tensor):
    """A loss that counts how often the loop reads a value back from it (or from sums of it) on the host."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("item", "__float__", "__bool__", "tolist", "__format__"):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class _CountingTask(_ConvTask):
    def training_loss(self, model, batch):
        return super().training_loss(model, batch).as_subclass(_CountedLoss)


@pytest.mark.parametrize(("log_every", "expected"), [(100, 2), (2, 2 + 5)])
def test_the_loop_reads_the_loss_once_per_log_interval(tmp_path, log_every, expected):
    """40 samples / batch 8 = 5 steps per epoch, 2 epochs: a read per epoch, plus one every ``log_every`` steps."""
    model, opt = _conv_net()
    _CountedLoss.reads = 0
    fit(model, opt, _data(), None, _CountingTask(), _config(epochs=2, monitor="train_loss", log_every=log_every),
        tmp_path / "run")
    assert _CountedLoss.reads == expected


def test_a_non_finite_loss_stops_the_run_before_a_checkpoint(tmp_path):
    class Exploding(_ConvTask):
        def training_loss(self, model, batch):
            return super().training_loss(model, batch) * float("inf")

    model, opt = _conv_net()
    with pytest.raises(DataError, match="training loss became (nan|inf)"):
        fit(model, opt, _data(), None, Exploding(), _config(monitor="train_loss", checkpoint_every=2), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints" / "last").exists()
