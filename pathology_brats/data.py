"""BraTS-Path tiles: folder-per-class JPGs or a labels CSV, unlabeled validation patches, a stratified split.

    python -c "from pathology_brats.data import load_tiles; print(load_tiles('data/histology_phantom'))"

Layouts:
    ROOT/<CLS>/BraTSPath_<CLS>_<7 digits>.jpg      a folder per class code of the schema
    --labels-csv CSV                                 columns ``Input Path, Ground-Truth`` (the seed's
                                                     ``Balanced_classes.csv``); labels are class codes (``CT``)
                                                     or the schema's integer codes
    ROOT/val/BraTSPath_Val*.jpg                      unlabeled validation patches, for submissions

A tile is identified by its path relative to ``--data-root`` (``Tiles.ids``) everywhere: split, captions,
predictions, evaluation. The real label CSV names 1,397 file names twice, under ``New-Data-384-Collated-JPG/<CLS>/``
and ``Validation-Data-384-Collated-JPG/<CLS>/``, so the file name alone would map two rows to one tile. A CSV path
resolves against ``--data-root`` by the longest suffix of it that exists there (the CSVs in circulation carry the
absolute or project-relative prefixes of whoever wrote them); when no suffix exists, the path is kept as written
(relative) or by its ``<CLS>/<file>`` tail (absolute), and the image is reported missing when it is decoded, so a
label file can be validated without its images.

Rows that name the same file name (in the real CSV: the same image copied into both folders, always with one label)
form one group for the split (``Tiles.groups``), so no file name sits in two splits; names whose labels disagree,
and a path listed twice, are errors naming the rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.rundir import read_csv
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
    root: Path | None = None
    """The data root that ``ids`` are relative to (None: ids are file names)."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def ids(self) -> list[str]:
        """Paths relative to the data root (POSIX): the key of split rows, captions and predictions."""
        return [tile_id(p, self.root) for p in self.paths]

    @property
    def groups(self) -> list[str]:
        """File names: the challenge's SubjectID, and the split's group (copies of one image stay together)."""
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


def tile_id(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` as POSIX text (the file name when there is no root or it lies elsewhere)."""
    if root is not None:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return Path(path).name


def _csv_parts(value: str) -> tuple[list[str], bool]:
    """The named parts of a CSV path (no root or drive) and whether it was absolute (``/...``, ``C:\\...``)."""
    parts = list(Path(value.replace("\\", "/")).parts)
    anchored = bool(parts) and (parts[0] == "/" or parts[0].endswith(":"))
    return (parts[1:] if anchored else parts), anchored


def resolve_csv_path(value: str, data_root: Path) -> Path | None:
    """The longest suffix of a CSV path that names a file under ``data_root``; None when no suffix does."""
    parts, _ = _csv_parts(value)
    for start in range(len(parts)):
        tail = parts[start:]
        if ".." in tail:
            continue
        candidate = data_root.joinpath(*tail)
        if candidate.is_file():
            return candidate
    return None


def check_groups(tiles: Tiles, what: Path) -> None:
    """One label per file name (copies of one image), no path twice: else one error naming the rows."""
    first_row: dict[str, int] = {}
    seen_path: dict[Path, int] = {}
    for row, (path, label) in enumerate(zip(tiles.paths, tiles.labels)):
        if path in seen_path:
            raise DataError(what, f"rows {seen_path[path] + 2} and {row + 2} name the same tile {path.name!r}")
        seen_path[path] = row
        earlier = first_row.setdefault(path.name, row)
        if tiles.labels[earlier] != label:
            raise DataError(what, f"rows {earlier + 2} and {row + 2} name the file {path.name!r} with different "
                                  f"labels ({tiles.schema.classes[tiles.labels[earlier]]} and "
                                  f"{tiles.schema.classes[label]})")


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
        found = resolve_csv_path(value, data_root)
        if found is not None:
            paths.append(found)
            continue
        parts, anchored = _csv_parts(value)
        if len(parts) < 2 or ".." in parts[-2:]:
            raise DataError(csv, f"line {line}: path {value!r} has no <class>/<file> tail to find under --data-root")
        paths.append(data_root.joinpath(*(parts[-2:] if anchored or ".." in parts else parts)))
    tiles = Tiles(paths, np.asarray(labels, dtype=np.int64), schema, csv, data_root)
    check_groups(tiles, csv)
    return tiles


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
    tiles = Tiles(paths, np.asarray(labels, dtype=np.int64), schema, data_root, data_root)
    check_groups(tiles, data_root)
    return tiles


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
    """``train``/``val`` per tile, each class split in the same proportion, copies of one file name together
    (tiles carry no patient id)."""
    return group_split(tiles.groups, tiles.labels, fractions=(1 - val_fraction, val_fraction), seed=seed,
                       names=("train", "val"))


__all__ = ["CSV_COLUMNS", "VAL_FOLDER", "Tiles", "tile_id", "resolve_csv_path", "check_groups", "read_labels_csv",
           "scan_folders", "load_tiles", "unlabeled_images", "stratified_split"]
