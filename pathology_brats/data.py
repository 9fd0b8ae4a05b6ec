"""BraTS-Path tiles: folder-per-class JPGs or a labels CSV, unlabeled validation patches, a stratified split.

    python -c "from pathology_brats.data import load_tiles; print(load_tiles('data/histology_phantom'))"

Layouts:
    ROOT/<CLS>/BraTSPath_<CLS>_<7 digits>.jpg      a folder per class code of the schema
    --labels-csv CSV                                 columns ``Input Path, Ground-Truth`` (the seed's
                                                     ``Balanced_classes.csv``); labels are class codes (``CT``)
                                                     or the schema's integer codes
    ROOT/val/BraTSPath_Val*.jpg                      unlabeled validation patches, for submissions

A CSV path is used as given when it exists under ``--data-root``; otherwise its last two parts
(``<CLS>/<file>``) are looked up under ``--data-root``, because the CSVs in circulation carry the absolute or
project-relative prefixes of whoever wrote them. Image files are checked when they are decoded, not here, so a
label file can be validated without its images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.checkpoint import read_csv
from common.errors import DataError
from common.splits import group_split
from pathology_brats.schema import Schema

log = logging.getLogger("medvl.pathology_brats")

CSV_COLUMNS = ("Input Path", "Ground-Truth")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VAL_FOLDER = "val"


@dataclass
class Tiles:
    """Labelled tiles: absolute paths, integer labels of the schema, and where they came from."""

    paths: list[Path]
    labels: np.ndarray
    schema: Schema
    source: Path

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def ids(self) -> list[str]:
        """File names: the challenge's SubjectID and the key of captions and cached features."""
        return [p.name for p in self.paths]

    def counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.schema.classes))
        return {code: int(n) for code, n in zip(self.schema.classes, counts)}

    def take(self, index) -> Tiles:
        index = np.asarray(index)
        return replace(self, paths=[self.paths[i] for i in index], labels=self.labels[index])

    def __repr__(self) -> str:
        return f"Tiles({self.source}: {len(self)} tiles, {self.counts()})"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_labels_csv(csv: Path, data_root: Path, schema: Schema) -> Tiles:
    """Tiles of a ``Input Path, Ground-Truth`` CSV; a missing column or a label outside the schema names the line."""
    csv, data_root = Path(csv), Path(data_root)
    frame = read_csv(csv, CSV_COLUMNS, "labels CSV not found", dtype=str, keep_default_na=False)
    if frame.empty:
        raise DataError(csv, "no rows")
    paths, labels = [], []
    for line, (value, label) in enumerate(zip(frame["Input Path"], frame["Ground-Truth"]), start=2):
        try:
            labels.append(schema.label(label))
        except ValueError as err:
            raise DataError(csv, f"line {line}: {err}") from err
        rel = Path(value.replace("\\", "/"))
        direct = data_root / rel
        if not rel.is_absolute() and ".." not in rel.parts and direct.is_file():
            paths.append(direct)
            continue
        if len(rel.parts) < 2 or ".." in rel.parts[-2:]:
            raise DataError(csv, f"line {line}: path {value!r} has no <class>/<file> tail to find under --data-root")
        paths.append(data_root / rel.parts[-2] / rel.parts[-1])
    return Tiles(paths, np.asarray(labels, dtype=np.int64), schema, csv)


def scan_folders(data_root: Path, schema: Schema) -> Tiles:
    """Tiles of ``ROOT/<CLS>/*.jpg``; a folder of images named after no class of the schema is refused."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DataError(data_root, "--data-root does not exist or is not a directory")
    paths, labels = [], []
    for folder in sorted(p for p in data_root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if _is_image(p))
        if folder.name == VAL_FOLDER or not images:
            continue
        if folder.name.upper() not in schema.classes:
            raise DataError(folder, f"class folder {folder.name!r} is not a class of the {schema.year} schema "
                                    f"({', '.join(schema.classes)})")
        paths += images
        labels += [schema.classes.index(folder.name.upper())] * len(images)
    if not paths:
        raise DataError(data_root, f"no class folders with images ({', '.join(schema.classes)}) here")
    return Tiles(paths, np.asarray(labels, dtype=np.int64), schema, data_root)


def load_tiles(data_root: Path, schema: Schema, labels_csv: Path | None = None) -> Tiles:
    """From ``labels_csv`` when given, else from the class folders under ``data_root``."""
    if labels_csv is not None:
        return read_labels_csv(labels_csv, data_root, schema)
    return scan_folders(data_root, schema)


def unlabeled_images(folder: Path) -> list[Path]:
    """Every image file of a submission folder, sorted by name; an empty folder is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "image folder does not exist")
    images = sorted(p for p in folder.iterdir() if _is_image(p))
    if not images:
        raise DataError(folder, "no images (.jpg, .jpeg, .png) in this folder")
    return images


def stratified_split(tiles: Tiles, val_fraction: float, seed: int) -> np.ndarray:
    """``train``/``val`` per tile, each class split in the same proportion (tiles carry no patient id)."""
    return group_split(np.arange(len(tiles)), tiles.labels, fractions=(1 - val_fraction, val_fraction), seed=seed,
                       names=("train", "val"))


__all__ = ["CSV_COLUMNS", "VAL_FOLDER", "Tiles", "read_labels_csv", "scan_folders", "load_tiles", "unlabeled_images",
           "stratified_split"]
