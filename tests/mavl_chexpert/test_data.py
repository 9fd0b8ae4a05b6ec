"""CheXpert loading: label policies, path resolution, views, patient-level splits and sampling."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError, DataError
from mavl_chexpert.data import (
    COMPETITION,
    ROOT_NAME,
    encode_labels,
    find_root,
    load_table,
    resolve_labels,
    sample_patients,
    split_patients,
)

RAW = np.array([[1, 0, -1, np.nan, -1],
                [-1, -1, 1, 0, np.nan]])  # columns in COMPETITION order: Atelectasis, Cardiomegaly, ...


@pytest.mark.parametrize("policy, targets, masked", [
    ("ones", [[1, 0, 1, 0, 1], [1, 1, 1, 0, 0]], []),
    ("zeros", [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]], []),
    ("ignore", [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]], [(0, 2), (0, 4), (1, 0), (1, 1)]),
    # per-class: ones for Atelectasis and Edema (columns 0 and 3), zeros for the rest
    ("per-class", [[1, 0, 0, 0, 0], [1, 0, 1, 0, 0]], []),
])
def test_uncertainty_policies(policy, targets, masked):
    got, mask = encode_labels(RAW, COMPETITION, policy)
    assert got.tolist() == targets
    assert sorted(map(tuple, np.argwhere(~mask).tolist())) == masked


def test_per_class_maps_uncertain_edema_to_one():
    raw = np.array([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    got, _ = encode_labels(raw, COMPETITION, "per-class")
    assert dict(zip(COMPETITION, got[0])) == {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1,
                                              "Pleural Effusion": 0}


def test_label_names_resolve_and_unknown_ones_fail():
    assert resolve_labels("competition") == COMPETITION and len(resolve_labels("all")) == 14
    assert resolve_labels("pleural_effusion,EDEMA") == ("Pleural Effusion", "Edema")
    with pytest.raises(ConfigError, match="unknown label 'Effusion'"):
        resolve_labels("Effusion")


def test_table_resolves_paths_and_keeps_frontal_views(chexpert_phantom):
    table = load_table(chexpert_phantom, "train.csv")
    frame = pd.read_csv(chexpert_phantom / "train.csv")
    assert len(table) == int((frame["Frontal/Lateral"] == "Frontal").sum()) < len(frame)
    assert all(p.is_file() and p.is_relative_to(chexpert_phantom) for p in table.paths)
    assert all(str(r).startswith(f"{ROOT_NAME}/train/patient") for r in table.rel_paths)
    everything = load_table(chexpert_phantom, "train.csv", views="all")
    assert len(everything) == len(frame)
    # The parent of CheXpert-v1.0-small is accepted as --data-root too.
    assert find_root(chexpert_phantom.parent) == chexpert_phantom


def test_patient_split_never_leaks_and_sampling_keeps_whole_patients(chexpert_phantom):
    table = load_table(chexpert_phantom, "train.csv")
    split = split_patients(table, 0.25, seed=0)
    for patient in np.unique(table.patients):
        assert len(set(split[table.patients == patient])) == 1
    assert 0.15 < np.mean(split == "val") < 0.35
    sample = sample_patients(table, 0.3, seed=42)
    kept = set(sample.patients)
    assert len(kept) == round(0.3 * len(np.unique(table.patients)))
    assert sum(p in kept for p in table.patients) == len(sample)  # every image of a chosen patient


def _copy(chexpert_phantom, tmp_path):
    return shutil.copytree(chexpert_phantom, tmp_path / ROOT_NAME)


def test_missing_and_undecodable_images_name_the_line(chexpert_phantom, tmp_path):
    from mavl_chexpert.data import decode_images

    root = _copy(chexpert_phantom, tmp_path)
    table = load_table(root, "train.csv")
    table.paths[3].unlink()
    table.paths[5].write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=f"line {table.rows[3]}: .*image file not found"):
        decode_images(table, 32)
    images, kept = decode_images(table, 32, skip_bad=True)
    assert len(images) == len(table) - 2 and 3 not in kept and 5 not in kept


def test_paths_outside_the_root_are_refused(chexpert_phantom, tmp_path):
    root = _copy(chexpert_phantom, tmp_path)
    frame = pd.read_csv(root / "train.csv")
    frame.loc[0, "Path"] = "../../etc/passwd"
    frame.to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match="line 2: path '../../etc/passwd' lies outside --data-root"):
        load_table(root, "train.csv", views="all")


def test_the_real_chexpert_train_csv_parses(tmp_path):
    """CheXpert-v1.0-small's own train.csv (223,414 rows; shipped inside the torchxrayvision wheel, never copied)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None:
        pytest.skip("torchxrayvision (the real CheXpert train.csv) is not installed")
    real = Path(spec.origin).parent / "data" / "chexpert_train.csv.gz"
    root = tmp_path / ROOT_NAME
    root.mkdir()
    (root / "valid.csv").write_text("Path\n")
    frame = pd.read_csv(real)
    table = load_table(root, real, "all", "ignore", "all")
    assert len(table) == len(frame) == 223_414
    assert len(np.unique(table.patients)) == 64_540
    for j, name in enumerate(table.labels):
        assert int((table.raw[:, j] == -1).sum()) == int((frame[name] == -1).sum()), name
        assert int((~table.mask[:, j]).sum()) == int((frame[name] == -1).sum()), name  # ignore masks each -1
    frontal = load_table(root, real, "competition", "per-class", "frontal")
    assert len(frontal) == int((frame["Frontal/Lateral"] == "Frontal").sum()) == 191_027
    assert all(str(p).startswith(str(root / "train" / "patient")) for p in frontal.paths[:100])


@pytest.mark.parametrize("fraction", [0.0, 0.01])
def test_a_sample_fraction_that_keeps_fewer_than_two_patients_names_the_flag(chexpert_phantom, tmp_path, capsys,
                                                                              fraction):
    from mavl_chexpert import train_image

    table = load_table(chexpert_phantom, "train.csv")
    with pytest.raises(ConfigError) as info:
        sample_patients(table, fraction, seed=0)
    assert info.value.source == "--sample-frac" and f"keeps {round(fraction * 120)};" in info.value.message
    assert train_image.main(["--data-root", str(chexpert_phantom), "--output-dir", str(tmp_path / "run"),
                             "--sample-frac", str(fraction)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --sample-frac: ") and "at least 2" in err[0], err
    assert not (tmp_path / "run").exists()
