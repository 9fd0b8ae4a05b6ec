"""The training loop's data paths: a split held as tensors on the device, or DataLoader workers when it is not.

Small data (MedMNIST images, cached features, cached preprocessed volumes) is moved to the training device once
and every batch is gathered there by index: no per-sample Python, no collate, no host-to-device copy per step.
Augmentation then runs on the whole batch as tensor ops (``RandomAffine``, ``IntensityJitter``). Data that is not
held as tensors, or does not fit, goes through DataLoader workers with pinned memory and persistent workers.

Both paths follow the loop's ``EpochSampler`` order, and a resumed run draws what the uninterrupted run drew:
batch augmentation reads uniform draws the sampler makes per sample, a function of (seed, epoch, position), so
two DDP processes also draw for each sample what one process draws. A dataset's own per-sample randomness
(torchvision transforms in ``__getitem__``) comes from the global generators: in the main process these are part
of the checkpoint, as they always were; in DataLoader workers, which have their own, it runs from a seed per batch
(``SeededFetch``), so it does not depend on the number of workers or on where a run was resumed.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common.errors import ConfigError

log = logging.getLogger("medvl.data")

DEVICE_MEMORY_FRACTION = 0.5
"""Largest share of the device's free memory a split may take before it stays on the host."""

Batch = Any


class EpochOrder(Protocol):
    """What the data paths need from the loop's sampler (``common.engine.EpochSampler``)."""

    seed: int
    epoch: int
    skip: int
    rank: int

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...

    def draws(self, count: int) -> torch.Tensor: ...


class BatchAugment(Protocol):
    """Augmentation of a whole batch on the device, driven by ``draws`` uniform numbers per sample.

    The loop hands over the draws so that the randomness is fixed by (seed, epoch, position) and not by any
    generator state: see the module docstring.
    """

    draws: int

    def __call__(self, batch: Batch, uniforms: torch.Tensor) -> Batch: ...


class TensorData(Dataset):
    """A split as equal-length tensors (a tuple or a dict of them): what the loop can hold on the device.

    ``decode`` runs on every gathered batch (for example uint8 -> normalised float, so the stored copy stays four
    times smaller); ``batch_augment`` runs on training batches only. ``data[i]`` is one decoded, unaugmented
    sample, so the same object also works as an ordinary map-style Dataset.
    """

    def __init__(self, tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                 decode: Callable[[Batch], Batch] | None = None, batch_augment: BatchAugment | None = None):
        self.tensors: tuple[torch.Tensor, ...] | dict[str, torch.Tensor] = (
            dict(tensors) if isinstance(tensors, Mapping) else tuple(tensors))
        values = list(self.tensors.values()) if isinstance(self.tensors, dict) else list(self.tensors)
        if not values or any(not isinstance(t, torch.Tensor) or t.dim() == 0 for t in values):
            raise ValueError("TensorData needs one or more tensors with a leading sample dimension")
        if len({len(t) for t in values}) != 1:
            raise ValueError(f"TensorData tensors differ in length: {[len(t) for t in values]}")
        self.decode, self.batch_augment = decode, batch_augment

    def _values(self) -> list[torch.Tensor]:
        return list(self.tensors.values()) if isinstance(self.tensors, dict) else list(self.tensors)

    def __len__(self) -> int:
        return len(self._values()[0])

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in self._values())

    @property
    def device(self) -> torch.device:
        return self._values()[0].device

    def gather(self, indices: torch.Tensor | slice) -> Batch:
        """The decoded batch at ``indices`` (a LongTensor on the data's device, or a slice)."""
        if isinstance(self.tensors, dict):
            batch: Batch = {k: t[indices] for k, t in self.tensors.items()}
        else:
            batch = tuple(t[indices] for t in self.tensors)
        return self.decode(batch) if self.decode is not None else batch

    def __getitem__(self, index: int) -> Batch:
        batch = self.gather(slice(index, index + 1))
        if isinstance(batch, dict):
            return {k: v[0] for k, v in batch.items()}
        return tuple(v[0] for v in batch)

    def to(self, device: torch.device | str) -> TensorData:
        """A shallow copy whose tensors live on ``device`` (the same object when they already do)."""
        if self.device == torch.device(device):
            return self
        moved = copy.copy(self)
        if isinstance(self.tensors, dict):
            moved.tensors = {k: t.to(device) for k, t in self.tensors.items()}
        else:
            moved.tensors = tuple(t.to(device) for t in self.tensors)
        return moved


def as_tensor_data(dataset: Dataset) -> TensorData | None:
    """The dataset as ``TensorData`` when it is held as tensors (``TensorData`` or torch's ``TensorDataset``)."""
    if isinstance(dataset, TensorData):
        return dataset
    if isinstance(dataset, TensorDataset):
        return TensorData(dataset.tensors)
    return None


def fits_on_device(nbytes: int, device: torch.device, fraction: float = DEVICE_MEMORY_FRACTION) -> bool:
    """Whether a split of ``nbytes`` may live on ``device``: at most ``fraction`` of its free memory.

    On the CPU the tensors are in host memory already, so holding them "on the device" costs nothing.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= fraction * free
    if device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "recommended_max_memory"):
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return nbytes <= fraction * free
    return True


def default_num_workers(device: torch.device, num_processes: int = 1) -> int:
    """DataLoader workers when none are asked for: none on the CPU, where workers would take the cores the model
    computes on; otherwise up to 4 per process, leaving one core per process for the loop itself."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, num_processes) - 1))


# --- batch structure helpers -------------------------------------------------------------------------------------

def _get(batch: Batch, key: int | str) -> torch.Tensor:
    return batch[key]


def _replace(batch: Batch, key: int | str, value: torch.Tensor) -> Batch:
    if isinstance(batch, dict):
        return {**batch, key: value}
    items = list(batch)
    items[key] = value
    return type(batch)(items) if isinstance(batch, list | tuple) else items


def to_memory_format(batch: Batch, channels_last: bool) -> Batch:
    """Floating image tensors of a batch in channels-last layout (4-D) or channels-last-3d (5-D)."""
    if not channels_last:
        return batch

    def convert(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if value.dim() == 4:
                return value.contiguous(memory_format=torch.channels_last)
            if value.dim() == 5:
                return value.contiguous(memory_format=torch.channels_last_3d)
        return value

    if isinstance(batch, dict):
        return {k: convert(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(convert(v) for v in batch)
    return convert(batch)


def model_to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Convolution weights in channels-last layout (2-D) or channels-last-3d (3-D), other tensors untouched."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            module.to(memory_format=torch.channels_last)
        elif isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
            module.to(memory_format=torch.channels_last_3d)
    return model


# --- batch augmentation ------------------------------------------------------------------------------------------

def _span(uniforms: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * uniforms


class RandomAffine:
    """Random rotation, scale and translation of a batch of images (N, C, H, W) as one ``grid_sample``.

    Args:
        degrees: rotation drawn uniformly from [-degrees, degrees].
        translate: shift drawn uniformly from [-translate, translate] times the side, per axis.
        scale: zoom drawn uniformly from this range.
        fill: value of pixels that come from outside the image (e.g. the normalised black).
        key: which entry of the batch (tuple index or dict key) holds the images.
        mask_key: an entry moved by the same transform with nearest-neighbour sampling and zero fill.
    """

    draws = 4

    def __init__(self, degrees: float = 0.0, translate: float = 0.0, scale: tuple[float, float] = (1.0, 1.0),
                 fill: float = 0.0, key: int | str = 0, mask_key: int | str | None = None):
        self.degrees, self.translate, self.scale, self.fill = degrees, translate, scale, fill
        self.key, self.mask_key = key, mask_key

    def grid(self, uniforms: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The sampling grid: for every output pixel, where it comes from in the input (normalised coordinates)."""
        n, _, height, width = shape
        u = uniforms.float()
        angle = _span(u[:, 0], -self.degrees, self.degrees) * (math.pi / 180)
        zoom = _span(u[:, 1], *self.scale)
        shift_x = _span(u[:, 2], -self.translate, self.translate) * 2  # normalised coordinates span 2 per side
        shift_y = _span(u[:, 3], -self.translate, self.translate) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # Inverse map in pixel units, p_in = R(-angle) (p_out - shift) / zoom, rescaled to normalised units so
        # that non-square images rotate without shearing.
        a, b = cos, sin * (height / width)
        c, d = -sin * (width / height), cos
        theta = torch.stack([torch.stack([a, b, -(a * shift_x + b * shift_y)], 1),
                             torch.stack([c, d, -(c * shift_x + d * shift_y)], 1)], 1)
        return F.affine_grid(theta, [n, 1, height, width], align_corners=False)

    def __call__(self, batch: Batch, uniforms: torch.Tensor) -> Batch:
        images = _get(batch, self.key)
        grid = self.grid(uniforms.to(images.device), images.shape).to(images.dtype)
        moved = F.grid_sample(images - self.fill, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False) + self.fill
        batch = _replace(batch, self.key, moved)
        if self.mask_key is not None:
            mask = _get(batch, self.mask_key)
            moved_mask = F.grid_sample(mask.float(), grid.to(torch.float32), mode="nearest", padding_mode="zeros",
                                       align_corners=False).to(mask.dtype)
            batch = _replace(batch, self.mask_key, moved_mask)
        return batch


class IntensityJitter:
    """Per-image contrast (around the image's mean) and brightness jitter: x -> (x - mean) * c + mean + b."""

    draws = 2

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, key: int | str = 0):
        self.brightness, self.contrast, self.key = brightness, contrast, key

    def __call__(self, batch: Batch, uniforms: torch.Tensor) -> Batch:
        images = _get(batch, self.key)
        u = uniforms.to(images.device, images.dtype)
        shape = (-1,) + (1,) * (images.dim() - 1)
        gain = _span(u[:, 0], 1 - self.contrast, 1 + self.contrast).view(shape)
        offset = _span(u[:, 1], -self.brightness, self.brightness).view(shape)
        mean = images.mean(dim=tuple(range(1, images.dim())), keepdim=True)
        return _replace(batch, self.key, (images - mean) * gain + mean + offset)


class Compose:
    """Several batch augmentations in order, each reading its own columns of the draws."""

    def __init__(self, *augments: BatchAugment):
        self.augments = augments
        self.draws = sum(a.draws for a in augments)

    def __call__(self, batch: Batch, uniforms: torch.Tensor) -> Batch:
        start = 0
        for augment in self.augments:
            batch = augment(batch, uniforms[:, start : start + augment.draws])
            start += augment.draws
        return batch


# --- the two paths -------------------------------------------------------------------------------------------------

def batch_seed(seed: int, epoch: int, rank: int, number: int) -> int:
    """The seed of one batch's per-sample randomness on the DataLoader path."""
    return (((seed * 1_000_003 + epoch) * 65_537 + rank) * 1_000_033 + number) % (1 << 63)


class SeededBatchSampler:
    """The sampler's order in batches whose keys carry the batch's seed, so workers need no RNG state of their own."""

    def __init__(self, sampler: EpochOrder, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = list(self.sampler)
        first = self.sampler.skip // self.batch_size
        for number, start in enumerate(range(0, len(indices), self.batch_size), first):
            seed = batch_seed(self.sampler.seed, self.sampler.epoch, self.sampler.rank, number)
            yield [(seed, i) for i in indices[start : start + self.batch_size]]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


class SeededFetch(Dataset):
    """A dataset whose per-sample randomness (torch, numpy and ``random`` global generators) runs from a seed per
    batch, for DataLoader workers; the generators are restored afterwards, so it is harmless in the main process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        seed = keys[0][0]
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
        try:
            # The dataset's own batch fetch where it has one (it may read rows together or pad them to each other).
            fetch = getattr(self.dataset, "__getitems__", None)
            indices = [index for _, index in keys]
            return fetch(indices) if fetch is not None else [self.dataset[index] for index in indices]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]


class TrainBatches:
    """The training split's batches, on the device and augmented, in the sampler's order for its current epoch.

    Chooses the path once: the device-resident one when the dataset is held as tensors and it fits (or
    ``on_device`` forces it), else DataLoader workers (pinned memory on CUDA, persistent
    workers). Iterating yields the batches of the sampler's epoch from its ``skip`` on.
    """

    def __init__(self, dataset: Dataset, sampler: EpochOrder, batch_size: int, device: torch.device, *,
                 num_workers: int = 0, on_device: bool | None = None, channels_last: bool = False):
        self.sampler, self.batch_size, self.device = sampler, batch_size, device
        self.channels_last = channels_last
        self.augment: BatchAugment | None = getattr(dataset, "batch_augment", None)
        self.data = _device_copy(dataset, device, on_device, "training")
        self.loader = None
        if self.data is None:
            # Its own generator: starting an epoch draws a base seed, which must not come from the global stream.
            generator = torch.Generator().manual_seed(sampler.seed)
            pin = device.type == "cuda"
            if num_workers == 0:
                self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, pin_memory=pin,
                                         generator=generator)
            else:
                self.loader = DataLoader(SeededFetch(dataset), batch_sampler=SeededBatchSampler(sampler, batch_size),
                                         num_workers=num_workers, pin_memory=pin,
                                         persistent_workers=True, generator=generator)
        self.on_device = self.data is not None

    def describe(self) -> str:
        if self.on_device:
            return f"held on {self.device} ({self.data.nbytes / 2**20:.1f} MiB), batches gathered there"
        pinned = ", pinned memory" if self.device.type == "cuda" else ""
        return f"DataLoader with {self.loader.num_workers} worker(s){pinned}"

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        draws = None
        if self.augment is not None:
            draws = self.sampler.draws(self.augment.draws).to(self.device, non_blocking=True)
        if self.on_device:
            order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.device, non_blocking=True)
            batches = (self.data.gather(order[s : s + self.batch_size]) for s in range(0, len(order), self.batch_size))
        else:
            self.loader.generator.manual_seed(self.sampler.seed * 7_919 + self.sampler.epoch)
            batches = (send_to_device(b, self.device, non_blocking=True) for b in self.loader)
        for number, batch in enumerate(batches):
            if draws is not None:
                with torch.no_grad():
                    start = number * self.batch_size
                    batch = self.augment(batch, draws[start : start + self.batch_size])
            yield to_memory_format(batch, self.channels_last)


class EvalBatches:
    """A validation split's batches in order: gathered on the device when held there, else from a DataLoader.

    Has ``.dataset`` (the split as given) and ``len``, and can be iterated more than once.
    """

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, *, num_workers: int = 0,
                 on_device: bool | None = None):
        self.dataset, self.batch_size = dataset, batch_size
        self.data = _device_copy(dataset, device, on_device, "validation")
        self.loader = None
        if self.data is None:
            self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                     pin_memory=device.type == "cuda",
                                     persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self.loader is not None:
            yield from self.loader
            return
        for start in range(0, len(self.data), self.batch_size):
            yield self.data.gather(slice(start, start + self.batch_size))


def _device_copy(dataset: Dataset, device: torch.device, on_device: bool | None, role: str) -> TensorData | None:
    """The dataset moved to ``device`` when the device-resident path applies to it, else None."""
    data = as_tensor_data(dataset)
    if on_device is False:
        return None
    if data is None:
        if on_device:
            raise ConfigError("--data-on-device", f"the {role} data of this pipeline is not held as tensors "
                                                  "(TensorData or TensorDataset)")
        return None
    if on_device is None and not fits_on_device(data.nbytes, device):
        log.info("%s data (%.0f MiB) does not fit in %.0f%% of the free memory of %s; using DataLoader workers",
                 role, data.nbytes / 2**20, DEVICE_MEMORY_FRACTION * 100, device)
        return None
    return data.to(device)


__all__ = ["TensorData", "as_tensor_data", "fits_on_device", "default_num_workers", "BatchAugment", "RandomAffine",
           "IntensityJitter", "Compose", "TrainBatches", "EvalBatches", "SeededFetch", "SeededBatchSampler",
           "batch_seed", "to_memory_format", "model_to_channels_last", "DEVICE_MEMORY_FRACTION"]
