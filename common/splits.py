"""Patient-level (group) splits, saved as CSV, with a leakage check.

Images of one patient must never sit in two splits, or test scores measure memory of the patient. ``group_split``
assigns whole groups; with labels it stratifies by each group's majority label.

Assignment (deterministic for a seed): groups are taken stratum by stratum (stratum = the group's most frequent
label, ties to the smallest), shuffled by the seed and then ordered largest first; each group goes to the split
whose sample count in that stratum is furthest below its target ``fraction * stratum size`` (ties to the earlier
split). Largest-first greedy filling keeps the proportions close even when group sizes vary; a split with
fraction 0 receives nothing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataError
from common.rundir import atomic_write_text, read_csv

SPLIT_COLUMNS = ("id", "group", "split")


def group_split(groups, labels=None, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                names: Sequence[str] = ("train", "val", "test")) -> np.ndarray:
    """The split name of every sample, keeping each group in one split.

    Args:
        groups: group id per sample (patient id), shape (N,).
        labels: optional class label per sample, shape (N,), to stratify by.
        fractions: target share of samples per split; must sum to 1.
        seed: shuffling seed.
        names: split names, one per fraction.

    Returns:
        String array of shape (N,) with one of ``names`` per sample.
    """
    fractions = np.asarray(fractions, dtype=float)
    if len(fractions) != len(names):
        raise ConfigError("fractions", f"{len(fractions)} fractions for {len(names)} split names {list(names)}")
    if (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0, atol=1e-6):
        raise ConfigError("fractions", f"split fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {groups.shape}")
    group_ids, sample_group = np.unique(groups, return_inverse=True)
    sizes = np.bincount(sample_group, minlength=len(group_ids))
    if labels is None:
        group_stratum = np.zeros(len(group_ids), dtype=int)
    else:
        labels = np.asarray(labels)
        if labels.shape != groups.shape:
            raise ValueError(f"labels shape {labels.shape} differs from groups shape {groups.shape}")
        _, label_index = np.unique(labels, return_inverse=True)
        counts = np.zeros((len(group_ids), label_index.max() + 1 if label_index.size else 1), dtype=int)
        np.add.at(counts, (sample_group, label_index), 1)
        group_stratum = counts.argmax(axis=1)

    rng = np.random.default_rng(seed)
    open_splits = np.flatnonzero(fractions > 0)
    group_split_index = np.empty(len(group_ids), dtype=int)
    for stratum in np.unique(group_stratum):
        members = rng.permutation(np.flatnonzero(group_stratum == stratum))
        members = members[np.argsort(-sizes[members], kind="stable")]
        target = fractions * sizes[members].sum()
        filled = np.zeros(len(fractions))
        for g in members:
            deficit = target[open_splits] - filled[open_splits]
            k = open_splits[int(np.argmax(deficit))]
            group_split_index[g] = k
            filled[k] += sizes[g]
    return np.asarray(names, dtype=str)[group_split_index[sample_group]]


def check_no_leakage(groups, assignments, source: str | Path) -> None:
    """Raise DataError naming the first group (in sample order) found in two splits."""
    first_split: dict = {}
    for group, split in zip(np.asarray(groups).tolist(), np.asarray(assignments).tolist()):
        seen = first_split.setdefault(group, split)
        if seen != split:
            raise DataError(source, f"group {group} appears in splits {seen} and {split}")


def split_csv_text(ids, groups, assignments, source: str | Path = "split.csv") -> str:
    """``id,group,split`` rows as CSV text; a split that leaks a group is refused."""
    ids, groups, assignments = (np.asarray(a) for a in (ids, groups, assignments))
    if not len(ids) == len(groups) == len(assignments):
        raise DataError(source, f"ids, groups and splits differ in length: {len(ids)}, {len(groups)}, "
                                f"{len(assignments)}")
    check_no_leakage(groups, assignments, source)
    frame = pd.DataFrame({"id": ids, "group": groups, "split": assignments})
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue()


def save_split_csv(path: str | Path, ids, groups, assignments) -> Path:
    """Write ``id,group,split`` rows atomically; a split that leaks a group is refused."""
    return atomic_write_text(Path(path), split_csv_text(ids, groups, assignments, path))


def load_split_csv(path: str | Path) -> pd.DataFrame:
    """Read a split CSV (ids and groups kept as strings, so ``00012`` stays ``00012``) and check it for leakage."""
    path = Path(path)
    frame = read_csv(path, SPLIT_COLUMNS, "split file does not exist", dtype=str, keep_default_na=False)
    check_no_leakage(frame["group"], frame["split"], path)
    return frame
