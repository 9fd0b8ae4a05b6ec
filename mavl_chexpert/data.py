"""CheXpert-v1.0-small loading: label policies, patient-level splits, decoded-image caches.

    python -c "from mavl_chexpert.data import load_table; print(load_table('data/chexpert_phantom', 'train.csv'))"

``--data-root`` is the ``CheXpert-v1.0-small`` folder that holds ``train.csv`` and ``valid.csv`` (its parent is
accepted too). ``Path`` values such as ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` resolve
inside that folder; a path that leaves it is refused. Labels: 1.0 positive, 0.0 negative, -1.0 uncertain, blank
not mentioned (= 0). Uncertain labels follow ``--uncertain``:

    ones       -1 -> 1 (U-Ones; the seed's choice)
    zeros      -1 -> 0 (U-Zeros)
    ignore     masked out of the loss and of the metrics
    per-class  ones for Atelectasis and Edema, zeros for the others (the CheXpert paper's best policy; LRFL's)

``valid.csv`` (or any CSV with ``Path`` and label columns, such as the 500-image official test set) is the test set:
only ``evaluate`` reads it. Training and validation come from ``train.csv``, split by patient.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.errors import ConfigError, DataError
from common.images import IMAGENET_MEAN, IMAGENET_STD, read_grey, square_resize
from common.rundir import read_csv
from common.splits import group_split

log = logging.getLogger("medvl.mavl_chexpert")

ROOT_NAME = "CheXpert-v1.0-small"
OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
LABEL_SETS = {"competition": COMPETITION, "all": OBSERVATIONS}
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore", "per-class")
PER_CLASS_ONES = ("Atelectasis", "Edema")
"""Observations whose uncertain label becomes 1 under ``per-class`` (Irvin et al. 2019, Table 2)."""
VIEWS = ("frontal", "all")
_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"(patient\d+/study\d+)")
STUDY_COLUMN = "Study"
"""Optional CSV column naming each row's study; without it the study is the path's ``patientN/studyM`` folder."""


def label_key(name: str) -> str:
    """``Pleural Effusion`` -> ``pleural_effusion`` (metric keys, config values)."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def resolve_labels(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``competition``, ``all``, or observation names (any case, ``_`` for spaces); unknown names are refused."""
    if isinstance(spec, str) and spec in LABEL_SETS:
        return LABEL_SETS[spec]
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    by_key = {label_key(o): o for o in OBSERVATIONS}
    out = []
    for name in names:
        if label_key(name) not in by_key:
            raise ConfigError("--labels", f"unknown label {name!r}; use competition, all, or names from "
                                          f"{', '.join(OBSERVATIONS)}")
        out.append(by_key[label_key(name)])
    if not out:
        raise ConfigError("--labels", "no label names given")
    return tuple(dict.fromkeys(out))


def find_root(data_root: Path) -> Path:
    """The folder holding ``train.csv``: ``data_root`` itself or its ``CheXpert-v1.0-small`` child."""
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise DataError(data_root, "--data-root does not exist or is not a directory")
    for candidate in (data_root, data_root / ROOT_NAME):
        if (candidate / "train.csv").is_file() or (candidate / "valid.csv").is_file():
            return candidate
    raise DataError(data_root, f"no train.csv or valid.csv here or in {ROOT_NAME}/ (point --data-root at the "
                               f"{ROOT_NAME} folder)")


def encode_labels(raw: np.ndarray, labels: tuple[str, ...], policy: str) -> tuple[np.ndarray, np.ndarray]:
    """(targets 0/1 float32, mask bool) from raw CSV values (1, 0, -1, NaN) under an uncertainty policy."""
    if policy not in UNCERTAIN_POLICIES:
        raise ConfigError("--uncertain", f"unknown policy {policy!r}; choose {', '.join(UNCERTAIN_POLICIES)}")
    raw = np.asarray(raw, dtype=np.float64)
    targets = np.where(raw == 1, 1.0, 0.0)
    mask = np.ones(raw.shape, dtype=bool)
    uncertain = raw == -1
    for j, name in enumerate(labels):
        if policy == "ones" or (policy == "per-class" and name in PER_CLASS_ONES):
            targets[uncertain[:, j], j] = 1.0
        elif policy == "ignore":
            mask[uncertain[:, j], j] = False
    return targets.astype(np.float32), mask


@dataclass
class Table:
    """Rows of one CheXpert CSV after checks: absolute image paths, patient ids, raw and encoded labels."""

    csv: Path
    rel_paths: np.ndarray
    paths: list[Path]
    rows: np.ndarray
    """1-based line numbers in the CSV (header = line 1), for error messages."""
    patients: np.ndarray
    studies: np.ndarray
    """Study of each row (``patientN/studyM``): CheXpert scores a study by the maximum over its views."""
    raw: np.ndarray
    labels: tuple[str, ...]
    targets: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, index: np.ndarray) -> Table:
        index = np.asarray(index)
        return replace(self, rel_paths=self.rel_paths[index], paths=[self.paths[i] for i in index],
                       rows=self.rows[index], patients=self.patients[index], studies=self.studies[index],
                       raw=self.raw[index],
                       targets=self.targets[index], mask=self.mask[index])

    def take_labels(self, columns: np.ndarray) -> Table:
        """The same rows with only the label ``columns`` (indices into ``labels``)."""
        columns = np.asarray(columns)
        return replace(self, raw=self.raw[:, columns], labels=tuple(self.labels[j] for j in columns),
                       targets=self.targets[:, columns], mask=self.mask[:, columns])

    def __repr__(self) -> str:
        return f"Table({self.csv.name}: {len(self)} images, {len(np.unique(self.patients))} patients)"


def _resolve_all(root: Path, values, csv: Path, lines: np.ndarray) -> list[Path]:
    """Image paths under ``root``, checked lexically (no per-row file-system call: the full CSV has 223k rows)."""
    base = os.path.normpath(str(root.resolve()))
    prefixes = (ROOT_NAME + "/", root.name + "/")
    out = []
    for value, line in zip(values, lines):
        text = str(value).replace("\\", "/")
        if text.startswith("/") or re.match(r"^[A-Za-z]:/", text):
            raise DataError(csv, f"line {line}: path {value!r} is absolute; paths must lie inside --data-root")
        for prefix in prefixes:
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
        path = os.path.normpath(os.path.join(base, text))
        if not path.startswith(base + os.sep):
            raise DataError(csv, f"line {line}: path {value!r} lies outside --data-root {root}")
        out.append(Path(path))
    return out


def load_table(data_root: Path, csv_name: str | Path, labels: tuple[str, ...] | str = COMPETITION,
               uncertain: str = "ones", views: str = "frontal") -> Table:
    """Read and check one CSV (``train.csv``, ``valid.csv`` or a test CSV given by path) under ``data_root``."""
    root = find_root(data_root)
    labels = resolve_labels(labels)
    if views not in VIEWS:
        raise ConfigError("--views", f"choose one of {', '.join(VIEWS)}, not {views!r}")
    csv = Path(csv_name) if Path(csv_name).is_absolute() or Path(csv_name).exists() else root / csv_name
    frame = read_csv(csv, missing="CSV file not found", dtype={"Path": str}, keep_default_na=True)
    if "Path" not in frame.columns:
        raise DataError(csv, f"no 'Path' column (has {', '.join(map(str, frame.columns[:8]))})")
    missing = [name for name in labels if name not in frame.columns]
    if missing:
        raise DataError(csv, f"missing label column(s) {', '.join(missing)}")
    lines = np.arange(len(frame)) + 2
    raw = np.empty((len(frame), len(labels)), dtype=np.float64)
    for j, name in enumerate(labels):
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isin(values, (1.0, 0.0, -1.0)) & ~np.isnan(values)
        bad |= np.isnan(values) & frame[name].notna().to_numpy()
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(csv, f"line {lines[first]}: {name} is {frame[name].iloc[first]}; labels must be 1, 0, "
                                 "-1 or blank")
        raw[:, j] = values
    check_duplicates(frame["Path"], raw, labels, lines, csv)
    if views == "frontal":
        if "Frontal/Lateral" in frame.columns:
            keep = frame["Frontal/Lateral"].astype(str).str.lower().eq("frontal").to_numpy()
        else:
            keep = frame["Path"].astype(str).str.contains("frontal", case=False).to_numpy()
        frame, lines, raw = frame[keep].reset_index(drop=True), lines[keep], raw[keep]
    paths = _resolve_all(root, frame["Path"], csv, lines)
    patients = np.array([(m.group(1) if (m := _PATIENT.search(str(v))) else str(Path(str(v)).parent))
                         for v in frame["Path"]], dtype=object)
    studies = study_ids(frame, patients, lines, csv)
    targets, mask = encode_labels(raw, labels, uncertain)
    return Table(csv, frame["Path"].astype(str).to_numpy(), paths, lines, patients, studies, raw, labels, targets,
                 mask)


def study_ids(frame: pd.DataFrame, patients: np.ndarray, lines: np.ndarray, csv: Path) -> np.ndarray:
    """Each row's study: the ``Study`` column when the CSV has one, else the path's ``patientN/studyM`` (an image
    outside such a folder is its own study). A study whose rows belong to two patients is refused, naming both
    lines: the maximum over its views would mix two people's images."""
    if STUDY_COLUMN in frame.columns:
        studies = frame[STUDY_COLUMN].astype(str).str.replace("\\", "/", regex=False).to_numpy(dtype=object)
    else:
        paths = frame["Path"].astype(str).str.replace("\\", "/", regex=False)
        studies = np.array([(m.group(1) if (m := _STUDY.search(p)) else p) for p in paths], dtype=object)
    owner: dict[str, tuple[str, int]] = {}
    for study, patient, line in zip(studies, patients, lines):
        first = owner.setdefault(study, (patient, line))
        if first[0] != patient:
            raise DataError(csv, f"study {study} mixes patients: line {first[1]} is {first[0]}, line {line} is "
                                 f"{patient}; every view of a study must come from one patient")
    return studies


def check_duplicates(paths: pd.Series, raw: np.ndarray, labels: tuple[str, ...], lines: np.ndarray,
                     csv: Path) -> None:
    """One image listed on two lines (with the same labels or, worse, with others) is refused, naming both lines:
    the duplicate counts twice in training and in every metric, and a conflicting pair is a label no one chose."""
    keys = paths.astype(str).str.replace("\\", "/", regex=False).map(os.path.normpath)
    repeated = keys.duplicated(keep=False).to_numpy()
    if not repeated.any():
        return
    first = int(np.flatnonzero(repeated)[0])
    second = int(np.flatnonzero(repeated & (keys == keys.iloc[first]).to_numpy())[1])
    a, b = raw[first], raw[second]
    differ = [f"{name} {_label_text(a[j])} vs {_label_text(b[j])}" for j, name in enumerate(labels)
              if not (a[j] == b[j] or (np.isnan(a[j]) and np.isnan(b[j])))]
    what = f"with conflicting labels ({', '.join(differ)})" if differ else "twice"
    raise DataError(csv, f"lines {lines[first]} and {lines[second]} list the same image {paths.iloc[first]} {what}; "
                         "each image must appear once")


def _label_text(value: float) -> str:
    return "blank" if np.isnan(value) else f"{value:g}"


def check_trainable(table: Table, policy: str, what: str = "", trained: np.ndarray | None = None) -> None:
    """Every trained class needs positive and negative training images (after the uncertainty policy): a class
    with one side only trains an output that can only ever say one thing, and its validation AUROC is undefined."""
    for j, name in enumerate(table.labels):
        if trained is not None and not trained[j]:
            continue
        known = table.targets[table.mask[:, j], j]
        positives = int(known.sum())
        negatives = len(known) - positives
        if positives == 0 or negatives == 0:
            raise DataError(table.csv, f"{name} has {positives} positive and {negatives} negative images in the "
                                       f"{len(table)} {what}training images (--uncertain {policy}); every trained "
                                       "class needs both (leave it out with --labels, or add images)")


def sample_patients(table: Table, fraction: float, seed: int) -> Table:
    """Keep a random ``fraction`` of the patients (all their images), as the seed's 30% sample but by patient.

    Raises:
        ConfigError: on ``--sample-frac`` when the fraction keeps fewer than two patients (one for training, one for
            validation); it used to be raised to two quietly, and the empty split that followed blamed train.csv.
    """
    if fraction >= 1.0:
        return table
    patients = np.unique(table.patients)
    rng = np.random.default_rng(seed)
    count = int(round(fraction * len(patients)))
    if count < 2:
        raise ConfigError("--sample-frac", f"{fraction:g} of the {len(patients)} patients of {table.csv} keeps "
                                           f"{count}; training and validation need at least 2 (use at least "
                                           f"{2 / len(patients):.3g})")
    chosen = set(rng.choice(patients, size=min(count, len(patients)), replace=False).tolist())
    return table.take(np.flatnonzero([p in chosen for p in table.patients]))


def split_patients(table: Table, val_fraction: float, seed: int) -> np.ndarray:
    """``train``/``val`` per image, every patient in one part, stratified by the patient's most common pattern."""
    pattern = np.array(["".join("1" if v else "0" for v in row) for row in table.targets.astype(bool)])
    return group_split(table.patients, pattern, fractions=(1 - val_fraction, val_fraction), seed=seed,
                       names=("train", "val"))


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
              "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
"""timm ``pretrained_cfg`` interpolation names -> PIL filters (``random`` is not a preprocessing for inference)."""


def resampling(name: str) -> Image.Resampling:
    if name not in RESAMPLING:
        raise ConfigError("interpolation", f"{name!r} is not one of {', '.join(RESAMPLING)}")
    return RESAMPLING[name]


def decode_images(table: Table, size: int, skip_bad: bool = False,
                  interpolation: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, size, size) images, indices kept): each JPG read once, padded to a square and resized with the
    weights' ``interpolation`` (runs recorded before it was recorded used bilinear).

    A missing, undecodable or blank (constant) image stops with its CSV line and file, or with ``skip_bad`` is
    skipped and counted.
    """
    images, kept = [], []
    resample = resampling(interpolation)
    for i, (path, line) in enumerate(zip(table.paths, table.rows)):
        try:
            image = read_grey(path)
            low, high = image.getextrema()
            if low == high:
                raise DataError(path, f"image is blank (every pixel is {low})")
        except DataError as err:
            if not skip_bad:
                raise DataError(table.csv, f"line {line}: {path}: {err.message}") from err
            continue
        images.append(square_resize(image, size, resample))
        kept.append(i)
    skipped = len(table) - len(kept)
    if skipped:
        log.warning("%s: skipped %d image(s) that are missing, blank or do not decode (--skip-bad)", table.csv, skipped)
    if not kept:
        raise DataError(table.csv, "no readable images")
    return np.stack(images), np.asarray(kept, dtype=np.int64)


@dataclass(frozen=True)
class Preprocessing:
    """What a run's images go through, read from its ``model.json`` (``preprocessing``)."""

    image_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_record(cls, record: dict) -> Preprocessing:
        """Runs recorded before interpolation was recorded resized bilinearly; their mean/std were ImageNet's."""
        return cls(int(record["image_size"]), str(record.get("interpolation", "bilinear")),
                   tuple(float(v) for v in record.get("mean", IMAGENET_MEAN)),
                   tuple(float(v) for v in record.get("std", IMAGENET_STD)))

    def decode(self, table: Table, skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return decode_images(table, self.image_size, skip_bad, self.interpolation)

    def dataset(self, images: np.ndarray, targets: np.ndarray | None = None, mask: np.ndarray | None = None,
                augment: bool = False) -> ChexpertDataset:
        """A dataset normalised with these statistics (no targets: a placeholder column for inference)."""
        if targets is None:
            targets, mask = np.zeros((len(images), 1), np.float32), np.ones((len(images), 1), bool)
        return ChexpertDataset(images, targets, mask, augment, mean=self.mean, std=self.std)


class ChexpertDataset(Dataset):
    """``{"image", "target", "mask", "index"}`` per image; ``index`` is the row in this split (for LRF's basis).

    Training augmentation follows the seed (rotation up to 10 degrees, a random resized crop of 80-100% of the
    area, brightness/contrast jitter 0.1) and never flips: the heart belongs on the patient's left.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, mask: np.ndarray, augment: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.images, self.targets, self.mask, self.augment = images, targets, mask, augment
        # grey x3 with the weights' mean/std (runs recorded before them used ImageNet's, the default)
        self.mean = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(3, 1, 1)
        if augment:
            from torchvision.transforms import v2

            size = images.shape[-1]
            self.transform = v2.Compose([
                v2.RandomRotation(10),
                v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True),
                v2.ColorJitter(brightness=0.1, contrast=0.1),
            ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(self.images[i]).unsqueeze(0)
        if self.augment:
            image = self.transform(image)
        grey = image[0].float().div(255.0).unsqueeze(0)
        return {"image": (grey - self.mean) / self.std, "target": torch.from_numpy(self.targets[i]),
                "mask": torch.from_numpy(self.mask[i]), "index": torch.tensor(i)}


__all__ = ["STUDY_COLUMN", "study_ids", "ROOT_NAME", "OBSERVATIONS", "COMPETITION", "LABEL_SETS",
           "UNCERTAIN_POLICIES", "VIEWS", "Table", "label_key", "resolve_labels", "find_root", "encode_labels",
           "load_table", "check_duplicates", "check_trainable", "sample_patients", "split_patients", "decode_images",
           "resampling", "Preprocessing", "ChexpertDataset"]
