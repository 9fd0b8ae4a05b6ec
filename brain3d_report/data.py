"""Brain MRI cases for report generation: BraTS layouts, TextBraTS reports and splits, healthy controls, and MONAI
preprocessing with a persistent cache.

    python -m brain3d_report.data --data-root data/brain_phantom --split stratified --write-split split.csv

Layouts (ROOT = ``--data-root``, one folder per case):
    ROOT/<ID>/<ID>_flair.nii[.gz]      BraTS 2020 (``MICCAI_BraTS2020_TrainingData``), e.g. ``BraTS20_Training_001``
    ROOT/<ID>/<ID>-t2f.nii[.gz]        BraTS 2023 names (t2f is FLAIR), e.g. ``BraTS-GLI-00001-000``
    ROOT/healthy/sub-*.nii[.gz]        healthy controls (or ``--healthy-root``, e.g. the seed's
                                       ``HealthyBrains_Preprocessed/sub-*_preprocessed.nii.gz``); id = name up to ``_``

Reports (``--reports``):
    (not given)      ROOT/<ID>/<ID>_flair_text.txt, the TextBraTS file beside the volume
    DIR              DIR/<ID>/<ID>_flair_text.txt, a separate TextBraTS tree (``TextBraTS/TextBraTSData``)
    FILE.json        one ``{case_id: text}`` mapping
    textbrats        the 369 real TextBraTS reports of BraTS 2020 shipped in ``brain3d_report/textbrats``
Healthy controls take the report a mapping gives them, else one of ``HEALTHY_TEMPLATES`` chosen by a SHA-256 of the
id, so the choice is the same in every process (the seed's ``hash()`` changes with ``PYTHONHASHSEED``).

Splits (``--split``):
    stratified   grouped by case, stratified by lesion side (``report_side``), 70/10/20, seed 42 (the seed's)
    official     the TextBraTS split shipped with this package: Train.json fold 1 -> train (220), fold 0 -> val (56),
                 as TextBraTS's ``--fold 0`` uses it, Test.json -> test (93); cases it does not list are left out,
                 healthy controls are split 70/10/20 among themselves
    CSV          a ``split.csv`` written before (``id,group,split``), to evaluate on the split a run trained with

Volumes: LoadImage (nibabel), channel first, ``Orientation("RAS")``, p1-p99 scaling to [0, 1] with clipping, a
transpose to (1, D, H, W) and a resize to ``volume_size`` (default (64, 128, 128), the seed's training size).
Axes after the transpose, as the seed's ``(H, W, D) -> (D, H, W)`` of a canonical (RAS) array:
    D  inferior -> superior (axial slices)
    H  the patient's left -> right: the side of a lesion is H < H/2 (left) or H >= H/2 (right)
    W  posterior -> anterior
Headers are checked with nibabel before MONAI reads the data (``check_nifti``), so a bad file is one line that
names it. With a cache directory, preprocessed volumes are kept on disk (``monai.data.PersistentDataset``) in a
folder keyed by the preprocessing settings; epochs after the first read no NIfTI.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int, require, unit_interval
from common.errors import ConfigError, DataError, cli_entry
from common.run_guard import guard_command, path_values
from common.splits import group_split, load_split_csv, save_split_csv

log = logging.getLogger("medvl.brain3d_report")

DEFAULT_VOLUME_SIZE = (64, 128, 128)
"""(D, H, W) of a preprocessed volume: the seed's training size."""
PERCENTILES = (1.0, 99.0)
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_SPLIT_SEED = 42
SIDES = ("left", "right", "bilateral", "none", "unknown")
"""Lesion side read from a report: ``none`` for a report of no lesion, ``unknown`` for a lesion without a side."""
HEALTHY_FOLDER = "healthy"
PACKAGED_REPORTS = "textbrats"
FLAIR_SUFFIXES = ("_flair.nii.gz", "_flair.nii", "-t2f.nii.gz", "-t2f.nii")
REPORT_SUFFIX = "_flair_text.txt"
CACHE_FORMAT = 2
"""Bumped whenever the preprocessing changes in a way its settings do not show, to retire old caches."""

HEALTHY_TEMPLATES = (
    "No focal lesion is seen in the brain parenchyma. Grey and white matter show normal FLAIR signal, and there is no "
    "edema. The ventricles are normal in size and shape, without compression or midline shift.",
    "The brain shows no abnormal signal on the FLAIR sequence. No mass, edema or necrosis is observed. The ventricular "
    "system is symmetric and of normal size.",
    "No space-occupying lesion is identified. Signal intensity of the cerebral hemispheres is within normal limits, "
    "without areas of edema. Ventricular compression is not observed.",
    "FLAIR images show no focal abnormality. The cortical sulci and the ventricles are normal for age, and there is no "
    "mass effect.",
    "No lesion area is seen, and the parenchymal signal is homogeneous and unremarkable. There is no edema, necrosis "
    "or enhancement to suggest a tumor. The ventricles are not compressed.",
    "The study is unremarkable: no focal high-signal area, no edema and no mass effect. The ventricles and midline "
    "structures are normal.",
    "No abnormal high or low signal area is seen in the brain. There is no evidence of tumor, edema or ventricular "
    "compression.",
)
"""Reports of healthy controls (written for this project in the TextBraTS register); none names a side."""

_BILATERAL = re.compile(r"\bbilateral(ly)?\b|\bboth (cerebral )?hemispheres\b|\bboth sides\b")
_NO_LESION = re.compile(r"\bno\b[^.]{0,40}\b(lesion|mass|abnormal\w*|tumou?r)|\bunremarkable\b")


# --- cases -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One FLAIR volume with its report.

    Attributes:
        id: case id (``BraTS20_Training_001``, ``BraTS-GLI-00001-000``, ``sub-0001``).
        flair: the FLAIR NIfTI file.
        report: report text (whitespace collapsed); empty only when reports were not required.
        side: lesion side from the report, one of ``SIDES`` (``none`` for healthy controls).
        healthy: a healthy control (its report may be a template).
        split: ``train``, ``val`` or ``test``; empty when no split was asked for.
    """

    id: str
    flair: Path
    report: str
    side: str
    healthy: bool
    split: str = ""


@dataclass
class Cases:
    """The cases found under a data root, in order, plus what was left out and why."""

    cases: list[Case]
    source: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of each bad input passed over with ``skip_bad``."""
    unlisted: list[str] = field(default_factory=list)
    """Ids on disk that the chosen split does not list (left out, not an error)."""

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __getitem__(self, index: int) -> Case:
        return self.cases[index]

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    def split(self, name: str) -> list[Case]:
        """The cases of one split, in order."""
        return [c for c in self.cases if c.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {side: count}}`` for a summary table."""
        table: dict[str, Counter] = {}
        for case in self.cases:
            table.setdefault(case.split or "all", Counter())[case.side] += 1
        return {split: dict(sorted(counter.items())) for split, counter in table.items()}

    def __repr__(self) -> str:
        return f"Cases({self.source}: {len(self)} cases, {self.counts()}, skipped {len(self.skipped)})"


def report_side(text: str) -> str:
    """Lesion side named by a report: ``left``, ``right``, ``bilateral``, ``none`` or ``unknown``.

    The first sentence (TextBraTS's "The lesion area is in ...") decides; when it names no side, the whole report
    does. ``bilateral``, "both hemispheres" or both words make ``bilateral``. A report naming no side is ``none``
    when it says there is no lesion, else ``unknown``.
    """
    text = " ".join(str(text).lower().split())
    first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    for scope in (first, text):
        words = set(re.findall(r"[a-z]+", scope))
        if _BILATERAL.search(scope) or {"left", "right"} <= words:
            return "bilateral"
        if "left" in words:
            return "left"
        if "right" in words:
            return "right"
    return "none" if _NO_LESION.search(text) else "unknown"


def healthy_report(case_id: str) -> str:
    """The template report of a healthy control, chosen by a SHA-256 of its id (stable across processes)."""
    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    return HEALTHY_TEMPLATES[int.from_bytes(digest[:8], "big") % len(HEALTHY_TEMPLATES)]


def packaged_file(name: str) -> Path:
    """A file of the TextBraTS data shipped with the package (``reports.json``, ``Train.json``, ``Test.json``)."""
    return Path(str(resources.files("brain3d_report") / "textbrats" / name))


# --- NIfTI checks --------------------------------------------------------------------------------------------------

def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def check_nifti(path: Path, voxels: bool = False) -> tuple[int, ...]:
    """Check a NIfTI header, cheaply, before MONAI reads the voxels; returns the shape.

    Raises DataError (naming the file) when the file is unreadable, not 3-D, has a zero, singular or non-finite
    affine, or is shorter than its header says (truncated). A ``.nii.gz`` is checked against the uncompressed size
    its gzip trailer records; only when that disagrees is the stream decompressed to find out. With ``voxels`` the
    data are read too and refused as ``check_voxels`` does (NaN, all zero, constant, no brain); preprocessing does
    that check anyway, this is for callers that must refuse a file before they write anything.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = nib.load(path)
        shape = tuple(int(s) for s in image.shape)
        affine = np.asarray(image.affine, dtype=float)
        offset = int(image.dataobj.offset)
        itemsize = image.get_data_dtype().itemsize
    except Exception as err:  # nibabel raises many types (ImageFileError, HeaderDataError, EOFError, zlib.error...)
        raise DataError(path, f"not a readable NIfTI file ({_first_line(err)})") from err
    if len(shape) != 3:
        raise DataError(path, f"is {len(shape)}-D with shape {shape}; a 3-D volume is expected")
    if min(shape) < 2:
        raise DataError(path, f"shape {shape} has an axis of fewer than 2 voxels")
    if not np.isfinite(affine).all():
        raise DataError(path, "the header's affine has non-finite values (NaN or inf)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(path, "the header's affine is zero or singular, so the voxel axes have no orientation")
    _check_complete(path, offset + math.prod(shape) * itemsize)
    if voxels:
        try:
            check_voxels(np.asanyarray(image.dataobj))
        except BadVolume as err:
            raise DataError(path, str(err)) from err
    return shape


def _check_complete(path: Path, expected: int) -> None:
    if not path.name.endswith(".gz"):
        size = path.stat().st_size
        if size < expected:
            raise DataError(path, f"truncated: {size} bytes where the header needs {expected}")
        return
    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        if int.from_bytes(handle.read(4), "little") == expected % 2**32:
            return
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(path, f"truncated or corrupt gzip stream ({_first_line(err)})") from err
    if total < expected:
        raise DataError(path, f"truncated: {total} bytes of NIfTI where the header needs {expected}")


# --- discovery -----------------------------------------------------------------------------------------------------

def find_flair(case_dir: Path) -> Path:
    """The FLAIR file of a case folder: ``<ID>_flair.nii[.gz]`` (BraTS 2020) or ``<ID>-t2f.nii[.gz]`` (BraTS 2023).

    Two candidates (``.nii`` beside ``.nii.gz``, a 2020 and a 2023 name, or another case's file copied in) are refused
    with both names: taking one silently would train on whichever the suffix order happens to prefer.
    """
    case_dir = Path(case_dir)
    found = sorted(p for p in case_dir.iterdir() if p.is_file() and p.name.endswith(FLAIR_SUFFIXES))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DataError(case_dir, f"{len(found)} FLAIR files ({', '.join(p.name for p in found)}); keep one")
    raise DataError(case_dir, f"no FLAIR volume ({case_dir.name}_flair.nii[.gz] or {case_dir.name}-t2f.nii[.gz])")


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".nii", ".nii.gz"))


def _is_case_folder(folder: Path) -> bool:
    """A folder that holds a volume or a report, or is named like a BraTS case (so a missing FLAIR is reported)."""
    if folder.name.startswith(".") or not folder.is_dir():
        return False
    return folder.name.startswith("BraTS") or any(_is_nifti(p) or p.name.endswith(REPORT_SUFFIX)
                                                   for p in folder.iterdir())


def _healthy_id(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", path.name).split("_")[0]


class _Collector:
    """Raises each bad input as a DataError, or with ``skip_bad`` records and logs it."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []

    def bad(self, err: DataError) -> None:
        if not self.skip_bad:
            raise err
        log.warning("skipped %s: %s", err.source, err.message)
        self.skipped.append((err.source, err.message))


def _scan_cases(root: Path, healthy_root: Path | None, collector: _Collector) -> list[tuple[str, Path]]:
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (healthy_root is not None and folder.resolve() == healthy_root.resolve()) or not _is_case_folder(folder):
            continue
        try:
            flair = find_flair(folder)
            check_nifti(flair)
        except DataError as err:
            collector.bad(err)
            continue
        found.append((folder.name, flair))
    return found


def _scan_healthy(folder: Path, collector: _Collector) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        collector.bad(DataError(folder, "healthy-control folder does not exist"))
        return []
    files = sorted(p for p in folder.iterdir() if _is_nifti(p) and p.name.startswith("sub-"))
    if not files:
        collector.bad(DataError(folder, "no healthy volumes (sub-*.nii or sub-*.nii.gz) in this folder"))
        return []
    found: dict[str, Path] = {}
    for path in files:
        try:
            case_id = _healthy_id(path)
            if case_id in found:
                raise DataError(path, f"a second volume of {case_id} (first: {found[case_id].name})")
            check_nifti(path)
        except DataError as err:
            collector.bad(err)
            continue
        found[case_id] = path
    return list(found.items())


class _DuplicateKey(Exception):
    """A JSON object names one key twice."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _Reports:
    """Where reports come from: files beside the volumes, a TextBraTS tree, or a ``{case_id: text}`` JSON."""

    def __init__(self, reports: str | Path | None, root: Path):
        self.root, self.mapping, self.tree, self.json_path = root, None, None, None
        if reports is None:
            return
        path = packaged_file("reports.json") if str(reports) == PACKAGED_REPORTS else Path(reports)
        if path.is_dir():
            self.tree = path
            return
        if not path.is_file():
            raise DataError(path, "reports not found (give a {case_id: text} JSON, a TextBraTS folder or textbrats)")
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(path, f"not a JSON file of reports ({_first_line(err)})") from err
        except _DuplicateKey as err:  # json keeps the last of two equal keys without a word
            raise DataError(path, f"case {err.args[0]} has two reports; keep one") from err
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise DataError(path, "reports JSON must map case ids to report text")
        self.mapping, self.json_path = mapping, path

    def file_of(self, case_id: str) -> Path:
        base = self.tree if self.tree is not None else self.root
        return base / case_id / f"{case_id}{REPORT_SUFFIX}"

    def get(self, case_id: str, required: bool) -> str | None:
        """The report text; None when there is none (an error if ``required``); an empty report is always one."""
        if self.mapping is not None:
            if case_id not in self.mapping:
                if required:
                    raise DataError(self.json_path, f"no report for case {case_id}")
                return None
            text = " ".join(self.mapping[case_id].split())
            if not text:
                raise DataError(self.json_path, f"the report of case {case_id} is empty")
            return text
        path = self.file_of(case_id)
        if not path.is_file():
            if required:
                raise DataError(path, f"no report for case {case_id} (TextBraTS file missing)")
            return None
        try:
            text = " ".join(path.read_bytes().decode("utf-8").split())
        except UnicodeDecodeError as err:
            raise DataError(path, f"report is not UTF-8 text (byte {err.start})") from err
        if not text:
            raise DataError(path, "empty report")
        return text

    def get_healthy(self, case_id: str) -> str:
        if self.mapping is not None and case_id in self.mapping:
            return self.get(case_id, required=True)
        return healthy_report(case_id)


def official_split(train_json: Path | None = None, test_json: Path | None = None) -> dict[str, str]:
    """``{case_id: split}`` of the TextBraTS split (the packaged Train.json / Test.json unless given).

    The files are MONAI datalists ``{"training": [{"fold", "image": [<ID>/<ID>_flair.nii.gz, ...], ...}]}``. In
    Train.json fold 0 is the validation fold (TextBraTS's ``--fold 0``: "0 for validation and 1 for training").
    """
    out: dict[str, str] = {}
    seen: dict[str, tuple[Path, int]] = {}
    for path, test in ((Path(train_json or packaged_file("Train.json")), False),
                       (Path(test_json or packaged_file("Test.json")), True)):
        for k, entry in enumerate(_datalist(path)):
            image = entry.get("image") if isinstance(entry, dict) else None
            first = image[0] if isinstance(image, list) and image else image
            match = re.match(r"(.+?)(_flair|_t1ce|_t1|_t2|-t2f|-t1c|-t1n|-t2w)\.nii(\.gz)?$",
                             Path(str(first)).name) if isinstance(first, str) else None
            if match is None:
                raise DataError(path, f"entry {k}: image {first!r} is not named <ID>_flair.nii.gz")
            split = "test" if test else ("val" if entry.get("fold") == 0 else "train")
            if match.group(1) in seen:
                first, index = seen[match.group(1)]
                where = f"entry {index}" if first == path else f"{first} entry {index}"
                raise DataError(path, f"case {match.group(1)} is listed twice (entry {k} and {where})")
            seen[match.group(1)] = (path, k)
            out[match.group(1)] = split
    return out


def _datalist(path: Path) -> list:
    if not path.is_file():
        raise DataError(path, "split file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"not a JSON datalist ({_first_line(err)})") from err
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list):
        raise DataError(path, "expected a MONAI datalist: a list of entries, or {\"training\": [...]}")
    return data


def side_stratified_split(ids: Sequence[str], sides: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                          seed: int = DEFAULT_SPLIT_SEED) -> list[str]:
    """Train/val/test per case, grouped by case id and stratified by lesion side (``common.splits.group_split``)."""
    return group_split(np.asarray(ids), np.asarray(sides), fractions=fractions, seed=seed, names=SPLITS).tolist()


def load_cases(data_root: Path, *, reports: str | Path | None = None, healthy_root: Path | None = None,
               split: str | Path | None = "stratified", fractions: Sequence[float] = DEFAULT_FRACTIONS,
               seed: int = DEFAULT_SPLIT_SEED, skip_bad: bool = False, require_reports: bool = True) -> Cases:
    """Every case under ``data_root`` (and the healthy controls), with report, side and split.

    Args:
        data_root: folder of case folders (BraTS 2020 or 2023 names).
        reports: None (files beside the volumes), a TextBraTS folder, a ``{case_id: text}`` JSON, or ``textbrats``.
        healthy_root: folder of ``sub-*.nii[.gz]``; default ``data_root/healthy`` when it exists.
        split: ``stratified``, ``official``, a ``split.csv`` path, or None for no split.
        fractions: train/val/test shares of the stratified split (and of the healthy controls under ``official``).
        seed: split seed.
        skip_bad: skip and count bad cases instead of raising (``Cases.skipped``).
        require_reports: a case without a report is an error; with False it gets an empty report and side
            ``unknown`` (inference on new scans). An empty report file is an error either way.

    Returns:
        ``Cases``, sorted: tumour cases by id, then healthy controls by id.

    Raises:
        DataError: naming the file (or folder) at fault, unless ``skip_bad`` allows skipping it.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(root, "--data-root does not exist or is not a directory")
    collector = _Collector(skip_bad)
    default_healthy = root / HEALTHY_FOLDER
    healthy_dir = Path(healthy_root) if healthy_root is not None else (default_healthy if default_healthy.is_dir()
                                                                       else None)
    tumour = _scan_cases(root, healthy_dir, collector)
    healthy = _scan_healthy(healthy_dir, collector) if healthy_dir is not None else []
    tumour_files = dict(tumour)
    for case_id, path in healthy:
        if case_id in tumour_files:  # one id, two volumes: reports, splits and predictions could not tell them apart
            raise DataError(path, f"healthy control {case_id} has the id of the tumour case {tumour_files[case_id]}; "
                                  "rename one")
    if not tumour and not healthy and not collector.skipped:
        raise DataError(root, "no case folders with a FLAIR volume (<ID>/<ID>_flair.nii[.gz] or <ID>-t2f.nii[.gz])")
    source = _Reports(reports, root)

    assigned: dict[str, str] | None = None
    unlisted: list[str] = []
    if split is not None and str(split) not in ("stratified", "official"):
        assigned = _read_split_csv(Path(split), [i for i, _ in tumour + healthy], collector)
    elif str(split) == "official":
        assigned = official_split()
        ids = [i for i, _ in healthy]
        assigned.update(zip(ids, side_stratified_split(ids, ["none"] * len(ids), fractions, seed)))
    if assigned is not None:
        unlisted = [i for i, _ in tumour + healthy if i not in assigned]
        tumour = [(i, p) for i, p in tumour if i in assigned]
        healthy = [(i, p) for i, p in healthy if i in assigned]
        if unlisted:
            log.info("%d cases under %s are not in the split and are left out", len(unlisted), root)

    cases = []
    for case_id, flair in tumour:
        try:
            text = source.get(case_id, required=require_reports)
        except DataError as err:
            collector.bad(err)
            continue
        cases.append(Case(case_id, flair, text or "", report_side(text) if text else "unknown", False))
    for case_id, flair in healthy:
        try:
            cases.append(Case(case_id, flair, source.get_healthy(case_id), "none", True))
        except DataError as err:
            collector.bad(err)
    if not cases:
        raise DataError(root, f"no usable cases ({len(collector.skipped)} skipped, {len(unlisted)} not in the split)")

    if assigned is not None:
        cases = [_with_split(c, assigned[c.id]) for c in cases]
    elif split is not None:
        names = side_stratified_split([c.id for c in cases], [c.side for c in cases], fractions, seed)
        cases = [_with_split(c, s) for c, s in zip(cases, names)]
    return Cases(cases, root, collector.skipped, unlisted)


def _with_split(case: Case, split: str) -> Case:
    return Case(case.id, case.flair, case.report, case.side, case.healthy, split)


def _read_split_csv(path: Path, on_disk: list[str], collector: _Collector) -> dict[str, str]:
    frame = load_split_csv(path)
    bad = sorted(set(frame["split"]) - set(SPLITS))
    if bad:
        raise DataError(path, f"unknown split name(s) {', '.join(bad)}; expected {', '.join(SPLITS)}")
    rows: dict[str, int] = {}
    for line, case_id in enumerate(frame["id"], 2):  # line 1 is the header
        if case_id in rows:  # a case listed twice would be generated and scored twice, weighting it double
            raise DataError(path, f"case {case_id} is listed twice (lines {rows[case_id]} and {line})")
        rows[case_id] = line
    present = set(on_disk)
    for case_id in frame["id"]:
        if case_id not in present:
            collector.bad(DataError(path, f"case {case_id} is in the split but not under the data root"))
    return dict(zip(frame["id"], frame["split"]))


def save_split(cases: Cases | Sequence[Case], path: Path) -> Path:
    """Write ``split.csv`` (``id,group,split``; one volume per case, so group = id)."""
    ids = [c.id for c in cases]
    return save_split_csv(path, ids, ids, [c.split for c in cases])


# --- volumes -------------------------------------------------------------------------------------------------------

def parse_volume_size(values: Sequence[int]) -> tuple[int, int, int]:
    """``--volume-size`` as (D, H, W): three integers of at least 2."""
    size = tuple(int(v) for v in values)
    if len(size) != 3 or min(size) < 2:
        raise ConfigError("--volume-size", f"expected three sizes D H W of at least 2, got {' '.join(map(str, size))}")
    return size


def check_volume_size(volume_size: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """The token grid (D/pd, H/ph, W/pw) of a volume cut into (pd, ph, pw) patches; refuses a size that leaves a rest.

    Raises:
        ConfigError: on ``--volume-size``, naming the nearest sizes that divide.
    """
    size = parse_volume_size(volume_size)
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ConfigError("--volume-size", f"patch geometry must be three positive sizes, got {patch}")
    if any(s % p for s, p in zip(size, patch)):
        fits = " ".join(str(max(p, round(s / p) * p)) for s, p in zip(size, patch))
        raise ConfigError("--volume-size", f"{' '.join(map(str, size))} is not divisible by the patch "
                                           f"{' '.join(map(str, patch))}; try {fits}")
    return tuple(s // p for s, p in zip(size, patch))


def cache_key(volume_size: Sequence[int], percentiles: Sequence[float] = PERCENTILES) -> str:
    """A short digest of everything that shapes a preprocessed volume: a new setting gets a new cache folder."""
    import monai

    settings = {"volume_size": [int(s) for s in volume_size], "percentiles": [float(p) for p in percentiles],
                "axcodes": "RAS", "layout": "DHW",
                "scaling": "brain-percentiles", "resize": "trilinear+antialias", "format": CACHE_FORMAT,
                "monai": monai.__version__}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


MIN_BRAIN_SHARE = 0.001
"""A volume whose brain voxels (``brain_mask``) are fewer than this share (and fewer than 64) holds no brain."""


BACKGROUND_SHARE = 0.05
"""The smallest share of voxels at the minimum for the minimum to be taken as the background constant."""


def background_value(volume: torch.Tensor | np.ndarray) -> float:
    """The background constant of a skull-stripped volume: its minimum when at least ``BACKGROUND_SHARE`` of the
    voxels hold it (0 in BraTS 2020 and the healthy controls, a negative constant in z-scored volumes such as BraTS
    2015's ``*_subtrMeanDivStd``), else 0 (no constant background at the minimum: a few negative voxels from
    resampling, or a volume that is not skull-stripped)."""
    values = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    low = values.min()
    return float(low) if int((values == low).sum()) >= BACKGROUND_SHARE * values.numel() else 0.0


def brain_mask(volume: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The brain of a skull-stripped volume: the voxels above its background constant (``background_value``).

    "Non-zero voxels" would keep a z-scored volume's background and drop half its brain (the brain has mean 0);
    "above the background constant" is the brain under both conventions: on the six z-scored BraTS 2015 cases it
    equals their ``brainmask.nii.gz`` voxel for voxel, on a 0-background volume it is the non-zero voxels as before.
    """
    values = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    return values > background_value(values)


class BadVolume(ValueError):
    """The voxels of a volume cannot be reported on (NaN, all zero, constant, no brain); the message says which."""


def check_voxels(volume: torch.Tensor | np.ndarray) -> None:
    """Refuse voxel data that would be preprocessed into a meaningless input and still get a report.

    NaN or inf voxels turn the percentile scaling into NaN (and the training loss after it); an all-zero or constant
    volume scales to a blank; a volume with (almost) no voxel above its background (``brain_mask``) has no brain
    under the skull-stripped convention the scaling relies on. Each would be answered by the model with a fluent
    report of nothing.

    Raises:
        BadVolume: naming what is wrong, with counts.
    """
    values = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    total = values.numel()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        nan = int(torch.isnan(values).sum())
        raise BadVolume(f"{nan} NaN and {total - nan - int(finite.sum())} infinite of {total} voxels; a FLAIR "
                        "volume must be finite")
    low, high = float(values.min()), float(values.max())
    if low == high == 0:
        raise BadVolume(f"every one of the {total} voxels is 0 (an empty volume)")
    if low == high:
        raise BadVolume(f"every one of the {total} voxels is {low:g} (a constant volume holds no image)")
    background = background_value(values)
    brain = int((values > background).sum())
    if brain < max(64, MIN_BRAIN_SHARE * total):
        raise BadVolume(f"no brain: {brain} of {total} voxels are above {background:g}, the background (a "
                        "skull-stripped FLAIR whose background is one constant, 0 or a z-scored negative, is "
                        "expected)")


def _checked(volume: torch.Tensor) -> torch.Tensor:
    check_voxels(volume)
    return volume


def scale_brain_percentiles(volume: torch.Tensor, percentiles: Sequence[float] = PERCENTILES) -> torch.Tensor:
    """Map the p_low..p_high intensity range of the brain (``brain_mask``: the voxels above the background constant,
    0 or z-scored negative) to [0, 1], clipped; the background becomes 0.

    Percentiles of the whole volume are dominated by background: with a small lesion, p99 falls in normal tissue and
    the lesion is clipped to the same 1.0 as the brightest normal tissue (the phantom lost the tumour side in a third
    of its cases that way). Computing them over the brain, as BraTS pipelines do, keeps a hyperintense lesion above
    normal tissue.
    """
    brain = brain_mask(volume)
    values = volume[brain]
    if values.numel() < 16:
        values = volume.reshape(-1)
    low, high = np.percentile(values.numpy(), [float(percentiles[0]), float(percentiles[1])])
    scaled = (volume - float(low)) / max(float(high - low), 1e-8)
    return scaled.clamp(0, 1) * brain


def preprocess_transform(volume_size: Sequence[int] = DEFAULT_VOLUME_SIZE, percentiles: Sequence[float] = PERCENTILES):
    """The MONAI ``Compose`` from a FLAIR path (key ``image``) to a float32 (1, D, H, W) tensor in [0, 1]."""
    from monai import transforms as mt

    size = parse_volume_size(volume_size)
    return mt.Compose([
        mt.LoadImaged("image", reader="NibabelReader", image_only=True, dtype=np.float32),
        mt.EnsureChannelFirstd("image", channel_dim="no_channel"),
        # Labels given explicitly: nibabel's affines are RAS+, whatever default a MONAI release assumes.
        mt.Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        # The orientation was the last step that needs the affine; plain tensors cache smaller and load safely.
        mt.EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
        mt.Lambdad("image", _checked),
        mt.Lambdad("image", lambda volume: scale_brain_percentiles(volume, percentiles)),
        mt.Transposed("image", indices=(0, 3, 1, 2)),
        mt.Resized("image", spatial_size=size, mode="trilinear", anti_aliasing=True),
        mt.EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
    ])


def _stamp(path: Path) -> str:
    """Size and modification time: part of a volume's cache key, so a replaced file is preprocessed again."""
    stat = Path(path).stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _preprocess_error(path: Path, err: BaseException) -> DataError:
    """The one-line DataError naming ``path`` for a failure inside the MONAI chain (which wraps the cause)."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, BadVolume):
        return DataError(path, str(cause))
    return DataError(path, f"cannot preprocess ({_first_line(cause)})")


def _persistent_dataset(items: list[dict], transform, cache_dir: Path, volume_size: tuple[int, int, int]):
    """MONAI's ``PersistentDataset``, with every cache entry checked when read.

    MONAI recomputes an entry only when ``torch.load`` reports a bad magic number; a cut-short file (a kill during
    a copy, a full disk) raises from the zip reader instead, which used to be reported as a bad FLAIR on every rerun.
    Here an entry that does not load, or holds anything but a finite (1, D, H, W) float32 volume in [0, 1], is
    deleted with a warning naming it and preprocessed again from its NIfTI.
    """
    from monai.data import PersistentDataset

    expected = (1, *volume_size)

    class CheckedPersistentDataset(PersistentDataset):
        def _cachecheck(self, item_transformed):
            hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
            if hashfile.is_file():
                try:
                    entry = torch.load(hashfile, weights_only=True)
                    problem = _cache_entry_problem(entry, expected)
                except Exception as err:  # a damaged zip raises RuntimeError, a cut pickle EOFError or UnpicklingError
                    problem = f"does not load ({_first_line(err)})"
                if problem is None:
                    return entry
                log.warning("damaged volume-cache entry %s (of %s): %s; preprocessing it again", hashfile,
                            item_transformed.get("image"), problem)
                hashfile.unlink(missing_ok=True)
            return super()._cachecheck(item_transformed)

    return CheckedPersistentDataset(items, transform, cache_dir=cache_dir)


def _cache_entry_problem(entry, expected: tuple[int, ...]) -> str | None:
    image = entry.get("image") if isinstance(entry, dict) else None
    if not isinstance(image, torch.Tensor):
        return "no image tensor in it"
    if tuple(image.shape) != expected or image.dtype != torch.float32:
        return f"holds a {image.dtype} tensor of shape {tuple(image.shape)}, not float32 {expected}"
    if not bool(torch.isfinite(image).all()) or float(image.min()) < -1e-4 or float(image.max()) > 1 + 1e-4:
        return "holds values outside [0, 1]"
    return None


class BrainVolumes(Dataset):
    """``{"image": (1, D, H, W) float32, "id", "report", "side", "healthy", "split"}`` per case.

    Volumes go through ``preprocess_transform``; with ``cache_dir`` each preprocessed volume is saved once (MONAI
    ``PersistentDataset``, in a subfolder named by ``cache_key``) and read from there afterwards; a damaged entry is
    preprocessed again with a warning. Reports are not part of the cache, so an edited report needs no new cache.
    """

    def __init__(self, cases: Sequence[Case], volume_size: Sequence[int] = DEFAULT_VOLUME_SIZE,
                 cache_dir: Path | None = None, percentiles: Sequence[float] = PERCENTILES):
        from monai.data import Dataset as MonaiDataset

        self.cases = list(cases)
        self.volume_size = parse_volume_size(volume_size)
        transform = preprocess_transform(self.volume_size, percentiles)
        items = [{"image": str(c.flair), "stamp": _stamp(c.flair)} for c in self.cases]
        self.cache_dir = None
        if cache_dir is None:
            self.volumes = MonaiDataset(items, transform)
        else:
            self.cache_dir = Path(cache_dir) / f"volumes-{cache_key(self.volume_size, percentiles)}"
            self.volumes = _persistent_dataset(items, transform, self.cache_dir, self.volume_size)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        try:
            image = self.volumes[index]["image"]
        except Exception as err:  # MONAI wraps reader errors in RuntimeError; name the file, not the transform chain
            raise _preprocess_error(case.flair, err) from err
        return {"image": image, "id": case.id, "report": case.report, "side": case.side, "healthy": case.healthy,
                "split": case.split}


def make_dataset(cases: Sequence[Case], volume_size: Sequence[int] = DEFAULT_VOLUME_SIZE,
                 cache_dir: Path | None = None) -> BrainVolumes:
    """The dataset of ``cases`` (e.g. ``load_cases(...).split("train")``), cached under ``cache_dir`` if given."""
    return BrainVolumes(cases, volume_size, cache_dir)


def stack_volumes(dataset: BrainVolumes) -> torch.Tensor:
    """All volumes of a dataset as one (N, 1, D, H, W) tensor, to keep small data on the training device."""
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def split_volumes(cases: Cases, names: Sequence[str], volume_size: Sequence[int], cache_dir: Path | None,
                  skip_bad: bool = False) -> dict[str, torch.Tensor]:
    """The stacked (N, 1, D, H, W) volumes of the splits ``names`` of ``cases``.

    A volume whose voxels are refused (``check_voxels``: NaN, empty, constant, no brain) or that does not preprocess
    stops with a DataError naming its file; with ``skip_bad`` it is logged, recorded in ``cases.skipped`` and its case
    removed from ``cases``, so the split the run saves lists only cases it trained or validated on.
    """
    collector = _Collector(skip_bad)
    out = {}
    for name in names:
        dataset = make_dataset(cases.split(name), volume_size, cache_dir)
        volumes, bad = [], set()
        for index, case in enumerate(dataset.cases):
            try:
                volumes.append(dataset[index]["image"])
            except DataError as err:
                collector.bad(err)
                bad.add(case.id)
        if bad:
            cases.cases = [c for c in cases.cases if c.id not in bad]
        if volumes:
            out[name] = torch.stack(volumes)
    cases.skipped.extend(collector.skipped)
    return out


LEFT_RIGHT_AXIS = -2
"""The patient's left -> right axis of a preprocessed (..., D, H, W) volume: H."""
_SIDE_WORD = re.compile(r"\b(left|right)(?=ward|-|\b)", re.IGNORECASE)


def mirror_report(text: str) -> str:
    """The report of the left-right mirrored scan: "left" and "right" swapped (also in "leftward", "right-sided"),
    the case kept; "bilateral" and everything else unchanged."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _SIDE_WORD.sub(swap, text)


def mirror_volumes(volumes: torch.Tensor) -> torch.Tensor:
    """Volumes (..., D, H, W) mirrored across the mid-sagittal plane (a flip of H, the left -> right axis)."""
    return torch.flip(volumes, dims=(LEFT_RIGHT_AXIS,))


MIRRORED = "mirrored_"
"""Prefix of the fields a ``LeftRightMirror`` training set holds for each case's mirrored report."""


class LeftRightMirror:
    """Batch augmentation (``common.device_data.BatchAugment``): each case is mirrored with probability ``p``, its
    fields (``fields``: the volume or its encoding, token ids ...) replaced by those of the mirrored case, held beside
    them as ``mirrored_<field>``; those are dropped from the batch.

    A lesion's side is read from which half of the volume holds it, but with 84 lateral training cases a tiny model
    also learns each case by heart. Mirrored, every lesion is seen on both sides, so the side word can only follow
    the half the lesion is in. The draws come from the training loop (a function of seed, epoch and position), so a
    resumed run mirrors what the uninterrupted run mirrored."""

    draws = 1

    def __init__(self, fields: Sequence[str], p: float = 0.5):
        self.fields, self.p = tuple(fields), float(p)

    def __call__(self, batch: dict[str, torch.Tensor], uniforms: torch.Tensor) -> dict[str, torch.Tensor]:
        flip = uniforms[:, 0] < self.p
        out = {k: v for k, v in batch.items() if not k.startswith(MIRRORED)}
        for name in self.fields:
            original, mirrored = batch[name], batch[MIRRORED + name]
            out[name] = torch.where(flip.view(-1, *[1] * (original.dim() - 1)), mirrored, original)
        return out


class MirroredPairs:
    """Batch augmentation: every case of a batch is followed by its mirrored copy (its volume flipped left-right,
    'left' and 'right' swapped in its report), so a batch of B cases trains on 2B samples.

    In the contrastive stage the mirrored copy is the one negative that differs from a case only in the side: a
    random draw (``LeftRightMirror``) never puts the two in one batch, and a sentence embedder hardly separates a
    left report from its right twin (0.02 in centred cosine), so the side is left to the rare negatives of the other
    side. Here each batch asks the encoder and the text head to tell a case from its mirror image."""

    draws = 1

    def __call__(self, batch: dict[str, torch.Tensor], uniforms: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each field followed by its mirrored rows (a field with no mirrored counterpart: by itself again)."""
        return {k: torch.cat([v, batch.get(MIRRORED + k, v)]) for k, v in batch.items() if not k.startswith(MIRRORED)}


def load_volume(path: Path, volume_size: Sequence[int] = DEFAULT_VOLUME_SIZE) -> torch.Tensor:
    """One FLAIR file preprocessed like the training data: (1, D, H, W) float32 (for inference on a new scan)."""
    check_nifti(path)
    try:
        return preprocess_transform(volume_size)({"image": str(path)})["image"]
    except Exception as err:
        raise _preprocess_error(path, err) from err


# --- command line --------------------------------------------------------------------------------------------------

def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The data flags shared by the brain3d_report scripts."""
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", type=Path, default=None,
                       help="folder of case folders <ID>/<ID>_flair.nii[.gz] or <ID>/<ID>-t2f.nii.gz")
    group.add_argument("--reports", default=None,
                       help="reports: a {case_id: text} JSON, a TextBraTS folder <ID>/<ID>_flair_text.txt, or "
                            "'textbrats' (the packaged 369 reports); default: the text files beside the volumes")
    group.add_argument("--healthy-root", type=Path, default=None,
                       help="folder of healthy controls sub-*.nii[.gz] (default DATA_ROOT/healthy when present)")
    group.add_argument("--split", default="stratified",
                       help="stratified (by lesion side, 70/10/20 by default), official (TextBraTS Train/Test.json) "
                            "or a split.csv written by an earlier run")
    group.add_argument("--val-fraction", type=unit_interval, default=DEFAULT_FRACTIONS[1],
                       help="share of cases in val (stratified split)")
    group.add_argument("--test-fraction", type=unit_interval, default=DEFAULT_FRACTIONS[2],
                       help="share of cases in test (stratified split)")
    group.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help="seed of the stratified split")
    group.add_argument("--skip-bad", action="store_true",
                       help="skip and count cases with a missing FLAIR, a bad NIfTI, a missing/empty report or "
                            "(when training) voxels that are NaN, all zero, constant or hold no brain")
    group.add_argument("--volume-size", type=positive_int, nargs=3, default=list(DEFAULT_VOLUME_SIZE),
                       metavar=("D", "H", "W"), help="preprocessed volume size (default 64 128 128, the seed's)")
    return parser


def cases_from_args(args: argparse.Namespace) -> Cases:
    """``load_cases`` with the flags of ``add_data_args``."""
    require(args, data_root="the folder of case folders")
    if args.val_fraction + args.test_fraction >= 1:
        raise ConfigError("--val-fraction", f"val {args.val_fraction} + test {args.test_fraction} leaves no training "
                                            "cases")
    parse_volume_size(args.volume_size)
    fractions = (1 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
    return load_cases(args.data_root, reports=args.reports, healthy_root=args.healthy_root, split=args.split,
                      fractions=fractions, seed=args.split_seed, skip_bad=args.skip_bad)


def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(prog="python -m brain3d_report.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, parents=[base_parser()])
    add_data_args(parser)
    parser.add_argument("--write-split", type=Path, default=None, help="write the split as this split.csv")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("write_split",), beside=("data_root", "healthy_root"),
                  extra_reads=path_values(args, "split", "reports"))
    cases = cases_from_args(args)
    for split, sides in cases.counts().items():
        print(f"{split:>6}: {sum(sides.values()):4d} cases  " + "  ".join(f"{k} {v}" for k, v in sides.items()))
    if cases.unlisted:
        print(f"not in the split: {len(cases.unlisted)}")
    if cases.skipped:
        print(f"skipped: {len(cases.skipped)}")
        for path, reason in cases.skipped:
            print(f"  {path}: {reason}")
    if args.write_split is not None:
        print(f"wrote {save_split(cases, args.write_split)}")
    return 0


__all__ = ["Case", "Cases", "BrainVolumes", "load_cases", "report_side", "healthy_report", "official_split",
           "side_stratified_split", "save_split", "check_nifti", "find_flair", "check_volume_size",
           "parse_volume_size", "preprocess_transform", "cache_key", "make_dataset", "stack_volumes", "load_volume",
           "split_volumes", "check_voxels", "BadVolume", "brain_mask", "background_value",
           "add_data_args", "cases_from_args", "packaged_file", "mirror_report", "mirror_volumes",
           "LeftRightMirror", "DEFAULT_VOLUME_SIZE", "SIDES", "SPLITS",
           "HEALTHY_TEMPLATES"]


if __name__ == "__main__":
    raise SystemExit(main())
