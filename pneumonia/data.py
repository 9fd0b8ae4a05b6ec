"""PneumoniaMNIST in the MedMNIST ``.npz`` format, checked before use, and its torch Dataset.

Never downloads: a missing file says where to get it and where to put it.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.device_data import RandomAffine, TensorData
from common.errors import DataError

log = logging.getLogger("medvl.pneumonia")

FLAG = "pneumoniamnist"
SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
LABELS = ("normal", "pneumonia")
DOWNLOAD_PAGE = "https://zenodo.org/records/10519652"


def npz_name(size: int) -> str:
    return f"{FLAG}.npz" if size == 28 else f"{FLAG}_{size}.npz"


def resolve_npz(data_root: Path | str | None, size: int = 28) -> Path:
    """Find the ``.npz`` for ``size`` under ``data_root`` (a directory, or the file itself)."""
    if data_root is None:
        raise DataError("--data-root", "no data directory given; pass --data-root DIR holding "
                                       f"{npz_name(size)}")
    if size not in SIZES:
        raise DataError("--image-size", f"PneumoniaMNIST comes in sizes {SIZES}, not {size}")
    root = Path(data_root)
    path = root if root.suffix == ".npz" else root / npz_name(size)
    if not path.is_file():
        folder = root.parent if root.suffix == ".npz" else root
        fetch = f"import medmnist; medmnist.PneumoniaMNIST(split='train', size={size}, download=True, root='{folder}')"
        raise DataError(path, f"file not found; download {npz_name(size)} from {DOWNLOAD_PAGE} "
                              f"(or python -c \"{fetch}\") and put it in {folder}")
    return path


@dataclass
class MedMNISTSplits:
    """The three splits of one ``.npz`` as uint8 images (N, H, W) and int64 labels (N,)."""

    path: Path
    size: int
    images: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {name: int((self.labels[s] == i).sum()) for i, name in enumerate(LABELS)} for s in self.labels}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _official_info(size: int) -> tuple[dict[str, int] | None, str | None]:
    try:
        from medmnist import INFO
    except ImportError:
        return None, None
    info = INFO[FLAG]
    return info["n_samples"], info.get("MD5" if size == 28 else f"MD5_{size}")


def load_medmnist(path_or_root: Path | str, size: int = 28, splits: tuple[str, ...] = SPLITS) -> MedMNISTSplits:
    """Load and check a PneumoniaMNIST ``.npz``.

    A wrong structure (missing key, shape, dtype, labels outside {0, 1}, images and labels of different
    lengths) is a DataError naming the file; split counts or an MD5 that differ from medmnist's INFO table only
    warn, since subsets, phantoms and re-packed copies are legitimate.
    """
    path = resolve_npz(path_or_root, size)
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataError(path, f"not a readable .npz archive (corrupt or truncated: {err})") from err
    data = MedMNISTSplits(path=path, size=size)
    with archive:
        for split in splits:
            for kind in ("images", "labels"):
                if f"{split}_{kind}" not in keys:
                    raise DataError(path, f"missing key '{split}_{kind}' (has {sorted(keys)})")
            try:
                images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
                raise DataError(path, f"cannot read '{split}' arrays (corrupt or truncated: {err})") from err
            data.images[split], data.labels[split] = _check_split(path, split, size, images, labels)
    _compare_with_official(data)
    return data


def _check_split(path: Path, split: str, size: int, images: np.ndarray, labels: np.ndarray):
    if images.dtype != np.uint8:
        raise DataError(path, f"'{split}_images' has dtype {images.dtype}, expected uint8")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (size, size):
        raise DataError(path, f"'{split}_images' has shape {images.shape}, expected (N, {size}, {size})")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(path, f"'{split}_labels' has shape {labels.shape}, expected (N, 1)")
    if len(labels) != len(images):
        raise DataError(path, f"'{split}' has {len(images)} images but {len(labels)} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(path, f"'{split}_labels' has dtype {labels.dtype}, expected integers 0/1")
    bad = np.setdiff1d(np.unique(labels), [0, 1])
    if bad.size:
        raise DataError(path, f"'{split}_labels' holds {bad.tolist()}; PneumoniaMNIST labels are 0 (normal) and "
                              "1 (pneumonia)")
    return images, labels.astype(np.int64)


def _compare_with_official(data: MedMNISTSplits) -> None:
    official_counts, official_md5 = _official_info(data.size)
    if official_counts is None:
        return
    counts = {s: len(v) for s, v in data.labels.items()}
    differs = {s: (counts[s], official_counts[s]) for s in counts if counts[s] != official_counts[s]}
    if differs:
        log.warning("%s: split sizes differ from the official PneumoniaMNIST (%s); a subset or a phantom?",
                    data.path, ", ".join(f"{s} {n} vs {o}" for s, (n, o) in differs.items()))
        return
    md5 = _md5(data.path)
    if official_md5 and md5 != official_md5:
        log.warning("%s: MD5 %s differs from medmnist's %s although the split counts match (a re-packed copy?)",
                    data.path, md5, official_md5)


MEAN, STD = 0.5, 0.5


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float normalised as in MedMNIST's reference code (on whatever device they are)."""
    return images.float().div(255.0).sub(MEAN).div(STD)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) normalised as in MedMNIST's reference code."""
    return normalise(torch.from_numpy(np.ascontiguousarray(images))).unsqueeze(1)


def _decode(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch
    return normalise(images), labels


def augmentation() -> RandomAffine:
    """Small: a shift by up to 1/14 of the side, a +-10 degree rotation and a 5% zoom, black outside the image.

    No horizontal flip, which would move the heart to the wrong side of a radiograph.
    """
    return RandomAffine(degrees=10, translate=1 / 14, scale=(0.95, 1.05), fill=(0.0 - MEAN) / STD)


class PneumoniaDataset(TensorData):
    """(image tensor (1, H, W), float label); images stay uint8 until a batch is gathered.

    The split is a ``TensorData``, so the training loop holds it on the device and gathers batches there; with
    ``augment`` the loop applies ``augmentation()`` to every training batch on the device.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool = False):
        tensors = (torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
                   torch.as_tensor(np.asarray(labels), dtype=torch.float32))
        super().__init__(tensors, decode=_decode, batch_augment=augmentation() if augment else None)
        self.images, self.labels, self.augment = images, labels, augment
