"""IU X-ray (OpenI / Kaggle layout) loading for report-conditioned localisation.

    python -c "from cxr_localize.data import load_iu; print(len(load_iu('data/iu_phantom', image_size=128)))"

Layout: ``indiana_reports.csv`` (uid, MeSH, Problems, image, indication, comparison, findings, impression),
``indiana_projections.csv`` (uid, filename, projection), ``images/images_normalized/<filename>`` and the masks in
``masked/<filename>``; an optional ``lungs/<filename>`` (0 outside, 1 the patient's right lung, 2 the left) is
used by the laterality test when present.

Report text, one rule for every row: the findings section (``findings+impression`` appends the impression) with
templated normal sentences removed; when that leaves nothing the cleaned impression stands in, and when that is
empty too the text is ``EMPTY_TEXT``. Images are padded to a square (centred, black) and resized; masks follow
with nearest-neighbour resampling. Bad rows (a report-less uid, an image that does not decode or is blank, a mask of
another size or with grey values) stop loading with the file named, or with ``skip_bad`` are skipped and counted.

With ``mask_threshold`` (``--mask-threshold T``) a mask of another size than its image, or with values other than
0/1 or 0/255, is read instead as a soft mask: resized to its image's size as the original notebook resized masks
(PIL bilinear on the 8-bit mask, which is what torchvision's ``Resize`` does to a PIL image; a 0/1 mask is first
scaled to 0/255), divided by 255, padded and resized with the image (bilinear), and binarised: lesion where the value
is at least T. Masks that already match and are binary take the exact nearest-neighbour path either way.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.errors import DataError
from common.images import imagenet_normalize, read_grey, square_resize
from common.rundir import read_csv
from common.splits import group_split

log = logging.getLogger("medvl.cxr_localize")

REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
IMAGE_DIR = Path("images") / "images_normalized"
MASK_DIR = "masked"
LUNG_DIR = "lungs"
REPORT_COLUMNS = ("uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression")
PROJECTION_COLUMNS = ("uid", "filename", "projection")
TEXT_SOURCES = ("findings", "findings+impression")
SPLIT_LEVELS = ("patient", "image")
PROJECTIONS = ("Frontal", "Lateral", "all")
EMPTY_TEXT = "No findings."

_NORMAL = re.compile(
    r"\b(normal|normally|unremarkable|clear|intact|midline|within (normal )?limits|no acute|stable|negative|free of|"
    r"without (acute|evidence|focal)|"
    r"no (evidence|focal|pleural|pneumothorax|effusion|consolidation|edema|infiltrate|airspace|acute|large|"
    r"displaced|definite|typical|active|significant))\b", re.IGNORECASE)
_FINDING = re.compile(
    r"\b(opacit(y|ies)|nodul(e|es|ar)|mass(es)?|density|densities|consolidation|infiltrates?|atelectasis|"
    r"effusions?|pneumothorax|lesions?|granulomas?|scarring|pneumonia|cardiomegaly|enlarged|enlargement|edema|"
    r"fractures?|emphysema|fibrosis|calcifi\w*)\b", re.IGNORECASE)
_NEGATION = re.compile(r"\b(no|without|negative for|free of|clear of|resolved|not)\b", re.IGNORECASE)
_NO_CHANGE = re.compile(r"\bno (significant |interval )?change\b", re.IGNORECASE)
_NEGATIVE_START = re.compile(r"^\s*(there (is|are) )?no\b", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z]{2}")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_SIDE_WORD = re.compile(r"\b(left|right)(?=(ward|wards|sided)?\b)", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def is_boilerplate(sentence: str) -> bool:
    """A templated normal statement: says something is normal or absent, and no finding in it is present.

    A finding word counts as present unless a negation ("no", "without", ...) comes before it in the sentence.
    """
    sentence = _NO_CHANGE.sub("unchanged", sentence)
    if not (_NORMAL.search(sentence) or _NEGATIVE_START.search(sentence)):
        return False
    for match in _FINDING.finditer(sentence):
        if not _NEGATION.search(sentence[: match.start()]):
            return False
    return True


def strip_boilerplate(text: str) -> str:
    """Drop templated normal sentences and list debris ("1.", "."), so what reaches the encoder is abnormal."""
    return " ".join(s for s in split_sentences(text) if _WORD.search(s) and not is_boilerplate(s))


def _clean(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return strip_boilerplate(str(value))


def report_text(findings, impression, source: str = "findings") -> str:
    """The model's text for one report (see the module docstring for the rule)."""
    if source not in TEXT_SOURCES:
        raise ValueError(f"text source must be one of {TEXT_SOURCES}, not {source!r}")
    text = _clean(findings)
    if source == "findings+impression":
        text = " ".join(t for t in (text, _clean(impression)) if t)
    if not text:
        text = _clean(impression)
    return text or EMPTY_TEXT


def swap_left_right(text: str) -> str:
    """Exchange left and right (also in ``left-sided``, ``leftward``), keeping each word's capitalisation."""

    def swap(match: re.Match) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _SIDE_WORD.sub(swap, text)


def named_side(text: str) -> str | None:
    """``left`` or ``right`` when the text names only that side, else None (both, neither)."""
    sides = {m.group(1).lower() for m in _SIDE_WORD.finditer(text)}
    return sides.pop() if len(sides) == 1 else None


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    frame = read_csv(path, columns, "file not found (expected the IU X-ray layout: indiana_reports.csv, "
                                    "indiana_projections.csv, images/images_normalized/, masked/)", dtype={"uid": str})
    frame["uid"] = frame["uid"].astype(str).str.strip()
    return frame


def read_tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both CSVs, checked for their columns; projections sorted by file name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data directory does not exist")
    reports = _read_csv(root / REPORTS_CSV, REPORT_COLUMNS)
    projections = _read_csv(root / PROJECTIONS_CSV, PROJECTION_COLUMNS)
    if projections.empty:
        raise DataError(root / PROJECTIONS_CSV, "lists no images (only a header)")
    if reports.empty:
        raise DataError(root / REPORTS_CSV, "holds no reports (only a header)")
    projections["filename"] = projections["filename"].astype(str).str.strip()
    if (projections["filename"] == "").any() or projections["filename"].isin(["nan"]).any():
        row = int(np.flatnonzero((projections["filename"] == "") | (projections["filename"] == "nan"))[0]) + 2
        raise DataError(root / PROJECTIONS_CSV, f"line {row}: empty filename")
    _refuse_repeats(projections["filename"], root / PROJECTIONS_CSV, "file name", "images")
    _refuse_repeats(reports["uid"], root / REPORTS_CSV, "uid", "reports")
    projections = projections.sort_values("filename", kind="stable").reset_index(drop=True)
    return reports, projections


def _refuse_repeats(values: pd.Series, path: Path, what: str, kind: str) -> None:
    """One line naming the first value listed twice and both lines (header = line 1): a second row for one image
    or report would be trained on twice, or (a uid with two reports) pair the image with a text chosen silently."""
    repeated = values.duplicated(keep=False).to_numpy()
    if repeated.any():
        first = int(np.flatnonzero(repeated)[0])
        second = int(np.flatnonzero(repeated & (values == values.iloc[first]).to_numpy())[1])
        raise DataError(path, f"{what} {values.iloc[first]!r} is listed twice (lines {first + 2} and {second + 2}); "
                              f"each of the {kind} must appear once")


def split_assignments(projections: pd.DataFrame, level: str = "patient", seed: int = 0,
                      fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> pd.Series:
    """Split name per image file, computed over every listed image so both training phases agree.

    ``patient`` keeps all images of a uid in one split; ``image`` splits files independently (patients leak).
    """
    if level not in SPLIT_LEVELS:
        raise ValueError(f"split level must be one of {SPLIT_LEVELS}, not {level!r}")
    groups = projections["uid"] if level == "patient" else projections["filename"]
    splits = group_split(groups.to_numpy(), fractions=fractions, seed=seed)
    return pd.Series(splits, index=projections["filename"].to_numpy())


def _open(path: Path, what: str) -> Image.Image:
    """Any bit depth or mode as 8-bit grey (16-bit rescaled, alpha over black); see ``common.images``."""
    return read_grey(path, what)


def _open_image(path: Path) -> Image.Image:
    """An image, refused when blank (every pixel one value: a failed export, nothing to localise in)."""
    image = _open(path, "image")
    low, high = image.getextrema()
    if low == high:
        raise DataError(path, f"image is blank (every pixel is {low})")
    return image


def _is_binary(values: np.ndarray) -> bool:
    present = set(values.tolist())
    return present <= {0, 1} or present <= {0, 255}


def load_mask(path: Path, image_size: tuple[int, int], threshold: float | None = None) -> Image.Image:
    """A mask at its image's size: 8-bit 0/255 (mode ``L``) when it is binary and of the image's size, else (with a
    ``threshold``) soft values in [0, 1] (mode ``F``, see ``soft_mask``); without one, such a mask is a DataError."""
    mask = _open(path, "mask")
    values = np.unique(np.asarray(mask))
    if mask.size == image_size and _is_binary(values):
        return mask.point(lambda v: 255 if v else 0)
    if threshold is not None:
        return soft_mask(mask, image_size)
    if mask.size != image_size:
        raise DataError(path, f"mask is {mask.size[0]}x{mask.size[1]} but its image is {image_size[0]}x"
                              f"{image_size[1]}; pass --mask-threshold T to resize and binarise such masks")
    raise DataError(path, f"mask is not binary (values {values[:6].tolist()}{'...' if len(values) > 6 else ''}; "
                          "expected 0/1 or 0/255); pass --mask-threshold T to binarise such masks")


def soft_mask(mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    """An 8-bit mask as values in [0, 1] at ``image_size`` (mode ``F``), resized as the original notebook did.

    The notebook's ``T.Resize`` + ``T.ToTensor`` on a mode-``L`` PIL mask is PIL's bilinear resize (antialiased
    when shrinking) of the 8-bit values, divided by 255; this is the same call. A 0/1 mask is scaled to 0/255 first,
    so that it keeps its resolution through the resize instead of rounding to 0.
    """
    if np.asarray(mask).max() <= 1:
        mask = mask.point(lambda v: 255 * v)
    if mask.size != image_size:
        mask = mask.resize(image_size, Image.Resampling.BILINEAR)
    return Image.fromarray(np.asarray(mask, dtype=np.float32) / 255.0, mode="F")


def mask_to_grid(mask: Image.Image, image_size: int, threshold: float | None) -> np.ndarray:
    """A loaded mask padded and resized with its image, as booleans: binary masks by nearest neighbour, soft ones
    (mode ``F``) bilinearly and then at least ``threshold``."""
    if mask.mode == "F":
        return square_resize(mask, image_size, Image.Resampling.BILINEAR) >= threshold
    return square_resize(mask, image_size, Image.Resampling.NEAREST) > 127


@dataclass
class IUSamples:
    """Images of one or more splits, loaded and resized, with what was skipped."""

    filenames: list[str]
    uids: list[str]
    texts: list[str]
    splits: list[str]
    images: np.ndarray
    masks: np.ndarray | None
    lungs: np.ndarray | None
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.filenames)

    def subset(self, split: str) -> IUSamples:
        keep = [i for i, s in enumerate(self.splits) if s == split]
        pick = lambda array: None if array is None else array[keep]  # noqa: E731
        return IUSamples([self.filenames[i] for i in keep], [self.uids[i] for i in keep],
                         [self.texts[i] for i in keep], [split] * len(keep), self.images[keep], pick(self.masks),
                         pick(self.lungs), self.skipped)


def load_iu(root: Path, *, image_size: int = 256, text_source: str = "findings", projection: str = "Frontal",
            with_masks: bool = True, splits: tuple[str, ...] | None = None, split_level: str = "patient",
            seed: int = 0, skip_bad: bool = False, limit: int | None = None,
            mask_threshold: float | None = None) -> IUSamples:
    """Load the IU X-ray images (with masks: only the annotated ones) of the requested splits.

    Args:
        root: directory in the IU X-ray layout.
        image_size: side of the square the images are padded and resized to.
        text_source: ``findings`` or ``findings+impression``.
        projection: ``Frontal``, ``Lateral`` or ``all``.
        with_masks: keep only images that have a mask in ``masked/`` and load the masks; otherwise images only.
        splits: split names to load (None: all); the split is computed over every listed image.
        split_level: ``patient`` (by uid) or ``image``.
        seed: split seed.
        skip_bad: skip and count bad rows instead of stopping at the first.
        limit: load at most this many images (after the split filter), for quick runs.
        mask_threshold: resize masks of another size than their image, or not strictly binary, and binarise them
            at this value (see the module docstring); None refuses such masks.
    """
    root = Path(root)
    reports, projections = read_tables(root)
    assignment = split_assignments(projections, split_level, seed)
    if projection != "all":
        projections = projections[projections["projection"].astype(str).str.lower() == projection.lower()]
    by_uid = reports.drop_duplicates("uid").set_index("uid")
    skipped: Counter = Counter()
    rows = []
    for row in projections.itertuples(index=False):
        if splits is not None and assignment[row.filename] not in splits:
            continue
        if with_masks and not (root / MASK_DIR / row.filename).is_file():
            continue
        rows.append(row)
    if limit is not None:
        rows = rows[:limit]
    filenames, uids, texts, split_names, images, masks, lungs = [], [], [], [], [], [], []
    lung_dir = root / LUNG_DIR
    for row in rows:
        try:
            reason = "uid without report"
            if row.uid not in by_uid.index:
                raise DataError(root / PROJECTIONS_CSV, f"uid {row.uid} (image {row.filename}) has no report in "
                                                        f"{REPORTS_CSV}")
            reason = "bad image"
            image = _open_image(root / IMAGE_DIR / row.filename)
            reason = "bad mask"
            mask = load_mask(root / MASK_DIR / row.filename, image.size, mask_threshold) if with_masks else None
        except DataError as err:
            if not skip_bad:
                raise
            skipped[reason] += 1
            log.warning("skipped %s: %s", err.source, err.message)
            continue
        report = by_uid.loc[row.uid]
        filenames.append(row.filename)
        uids.append(row.uid)
        texts.append(report_text(report["findings"], report["impression"], text_source))
        split_names.append(str(assignment[row.filename]))
        images.append(square_resize(image, image_size, Image.Resampling.BILINEAR))
        if mask is not None:
            masks.append(mask_to_grid(mask, image_size, mask_threshold))
        lung_path = lung_dir / row.filename
        if with_masks and lung_path.is_file():
            lungs.append(square_resize(_open(lung_path, "lung mask"), image_size, Image.Resampling.NEAREST))
    if skipped:
        log.warning("skipped %d bad row(s) of %s: %s", sum(skipped.values()), root, dict(skipped))
    if not filenames:
        raise DataError(root, f"no usable images{' with masks' if with_masks else ''} in the requested split(s) "
                              f"{list(splits) if splits else 'all'}")
    size = (0, image_size, image_size)
    return IUSamples(
        filenames, uids, texts, split_names,
        np.stack(images) if images else np.zeros(size, np.uint8),
        np.stack(masks) if with_masks else None,
        np.stack(lungs) if with_masks and len(lungs) == len(filenames) else None,
        skipped,
    )


class LocalizationDataset(Dataset):
    """(image, mask, text embedding) triplets; training adds mild jitter and, if asked, a text-aware flip.

    Text embeddings are looked up in a precomputed table (the text encoder is frozen). A horizontal flip swaps
    the lungs, so it is only used with ``flip_index``: for each sample the table row of its left/right-swapped
    report.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, text_table: torch.Tensor, text_index: np.ndarray,
                 augment: bool = False, flip_index: np.ndarray | None = None):
        self.images, self.masks = images, masks
        self.text_table, self.text_index = text_table, np.asarray(text_index)
        self.augment, self.flip_index = augment, flip_index

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = imagenet_normalize(self.images[i])
        mask = torch.as_tensor(self.masks[i]).float().unsqueeze(0)
        text = int(self.text_index[i])
        if self.augment:
            image, mask = jitter(image, mask)
        if self.flip_index is not None and torch.rand(()) < 0.5:
            image, mask, text = image.flip(-1), mask.flip(-1), int(self.flip_index[i])
        return {"image": image, "mask": mask, "text": self.text_table[text]}


def jitter(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A small shift (up to 4% of the side) and contrast/brightness change; never a flip or a large rotation."""
    size = image.shape[-1]
    max_shift = max(1, int(0.04 * size))
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,)))
    image = torch.roll(image, (dy, dx), dims=(-2, -1))
    mask = torch.roll(mask, (dy, dx), dims=(-2, -1))
    gain, bias = 1 + 0.1 * (2 * torch.rand(()) - 1), 0.1 * (2 * torch.rand(()) - 1)
    return image * gain + bias, mask


class ImageDataset(Dataset):
    """Normalised images alone (phase-1 reconstruction), with the same jitter as training."""

    def __init__(self, images: np.ndarray, augment: bool = False):
        self.images, self.augment = images, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = imagenet_normalize(self.images[i])
        if self.augment:
            image, _ = jitter(image, image[:1])
        return {"image": image}
