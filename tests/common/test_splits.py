import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError, DataError
from common.splits import check_no_leakage, group_split, load_split_csv, save_split_csv


def _cohort(n_groups=400, seed=0, positive_rate=0.25):
    """Patients with 1-4 images each; a patient's images share its label."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_groups)
    groups = np.repeat([f"p{i:04d}" for i in range(n_groups)], sizes)
    patient_label = (rng.random(n_groups) < positive_rate).astype(int)
    return groups, np.repeat(patient_label, sizes)


@pytest.mark.parametrize("seed", range(6))
def test_group_split_never_leaks_and_hits_fractions(seed):
    groups, labels = _cohort(seed=seed)
    for split_labels in (None, labels):
        splits = group_split(groups, split_labels, fractions=(0.7, 0.1, 0.2), seed=seed)
        check_no_leakage(groups, splits, "split")
        assert (pd.Series(splits).groupby(groups).nunique() == 1).all()
        shares = {name: np.mean(splits == name) for name in ("train", "val", "test")}
        assert shares == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2}, abs=0.02)


@pytest.mark.parametrize("seed", range(4))
def test_group_split_keeps_label_ratio(seed):
    groups, labels = _cohort(n_groups=600, seed=seed, positive_rate=0.2)
    splits = group_split(groups, labels, seed=seed)
    overall = labels.mean()
    for name in ("train", "val", "test"):
        assert labels[splits == name].mean() == pytest.approx(overall, abs=0.02), name


def test_group_split_is_seeded():
    groups, labels = _cohort()
    first = group_split(groups, labels, seed=7)
    assert np.array_equal(first, group_split(groups, labels, seed=7))
    assert not np.array_equal(first, group_split(groups, labels, seed=8))


def test_group_split_custom_names_and_empty_split():
    groups = np.arange(100) // 2
    splits = group_split(groups, fractions=(0.8, 0.0, 0.2), names=("fit", "unused", "holdout"))
    assert set(splits) == {"fit", "holdout"}
    assert np.mean(splits == "holdout") == pytest.approx(0.2)


def test_group_split_bad_fractions():
    with pytest.raises(ConfigError, match="sum to 1") as err:
        group_split(np.arange(10), fractions=(0.7, 0.2, 0.2))
    assert err.value.source == "fractions"
    with pytest.raises(ConfigError, match="2 fractions for 3 split names"):
        group_split(np.arange(10), fractions=(0.5, 0.5))


def test_check_no_leakage_names_group():
    groups = ["a", "b", "c", "b", "c"]
    splits = ["train", "train", "val", "train", "test"]
    with pytest.raises(DataError) as err:
        check_no_leakage(groups, splits, "splits.csv")
    assert err.value.source == "splits.csv"
    assert err.value.message == "group c appears in splits val and test"
    check_no_leakage(groups[:4], splits[:4], "splits.csv")


def test_split_csv_round_trip(tmp_path):
    ids = ["00012", "00013", "00020", "00031"]
    groups = ["007", "007", "010", "011"]
    splits = group_split(groups, fractions=(0.5, 0.0, 0.5), seed=0)
    path = save_split_csv(tmp_path / "split.csv", ids, groups, splits)
    frame = load_split_csv(path)
    assert list(frame.columns) == ["id", "group", "split"]
    assert frame["id"].tolist() == ids and frame["group"].tolist() == groups
    assert frame["split"].tolist() == splits.tolist()


def test_split_csv_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,patient,split\n1,a,train\n")
    with pytest.raises(DataError, match="missing column"):
        load_split_csv(bad)
    leaky = tmp_path / "leaky.csv"
    leaky.write_text("id,group,split\n1,a,train\n2,a,test\n")
    with pytest.raises(DataError, match="group a appears in splits train and test"):
        load_split_csv(leaky)
    with pytest.raises(DataError, match="group a appears"):
        save_split_csv(tmp_path / "out.csv", [1, 2], ["a", "a"], ["train", "test"])
    assert not (tmp_path / "out.csv").exists()
