"""BraTS-Path tiles: the real label file, folder layout, path resolution, errors and the stratified split."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import DataError
from pathology_brats.data import load_tiles, read_labels_csv, scan_folders, stratified_split, unlabeled_images
from pathology_brats.schema import get_schema


def test_the_real_balanced_classes_csv_parses_under_2025(shared_data, tmp_path):
    csv = shared_data / "bratspath" / "balanced_classes.csv"
    tiles = read_labels_csv(csv, tmp_path, get_schema("2025"))
    assert len(tiles) == 26_791
    assert tiles.counts() == {"CT": 3000, "PN": 3000, "MP": 3000, "NC": 3000, "IC": 3000, "WM": 3000, "LI": 3000,
                              "DM": 3000, "PL": 2791}
    # No image exists here: a row keeps its path as written, so the two folders' copies stay two tiles.
    assert tiles.ids[0] == "BraTS-Path/BraTS-Path2025-Train-2-JPG/Validation-Data-384-Collated-JPG/CT/" \
                           "BraTSPath_CT_0007553.jpg"
    assert len(set(tiles.ids)) == 26_791 and len(set(tiles.groups)) == 26_791 - 1_397
    with pytest.raises(DataError, match="line 3002: 'DM' is not a class of the 2024 schema"):  # 2024 had no DM
        read_labels_csv(csv, tmp_path, get_schema("2024"))


def test_a_csv_path_resolves_by_its_longest_existing_suffix(tmp_path):
    root = tmp_path / "BraTS-Path"
    for folder in ("New-Data-384-Collated-JPG/CT", "Old/Validation-Data-384-Collated-JPG/CT", "CT"):
        (root / folder).mkdir(parents=True)
        (root / folder / "BraTSPath_CT_0000001.jpg").write_bytes(b"jpg")
    csv = tmp_path / "labels.csv"
    csv.write_text("Input Path,Ground-Truth\n"
                   "/home/someone/BraTS-Path/New-Data-384-Collated-JPG/CT/BraTSPath_CT_0000001.jpg,CT\n"
                   "BraTS-Path/Old/Validation-Data-384-Collated-JPG/CT/BraTSPath_CT_0000001.jpg,CT\n"
                   "C:\\data\\CT\\BraTSPath_CT_0000001.jpg,CT\n")
    tiles = read_labels_csv(csv, root, get_schema("2025"))
    # Matching on <CLS>/<file> alone would have mapped all three rows to CT/BraTSPath_CT_0000001.jpg.
    assert tiles.ids == ["New-Data-384-Collated-JPG/CT/BraTSPath_CT_0000001.jpg",
                         "Old/Validation-Data-384-Collated-JPG/CT/BraTSPath_CT_0000001.jpg",
                         "CT/BraTSPath_CT_0000001.jpg"]
    assert set(tiles.groups) == {"BraTSPath_CT_0000001.jpg"}


@pytest.mark.parametrize("rows, needle", [
    ("A/CT/BraTSPath_CT_1.jpg,CT\nB/CT/BraTSPath_CT_1.jpg,PN\n", "rows 2 and 3 name the file 'BraTSPath_CT_1.jpg' "
                                                                  "with different labels (CT and PN)"),
    ("A/CT/BraTSPath_CT_1.jpg,CT\nA/CT/BraTSPath_CT_2.jpg,CT\nA/CT/BraTSPath_CT_1.jpg,CT\n",
     "rows 2 and 4 name the same tile"),
])
def test_copies_with_other_labels_and_repeated_rows_are_refused(rows, needle, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("Input Path,Ground-Truth\n" + rows)
    with pytest.raises(DataError) as info:
        read_labels_csv(csv, tmp_path, get_schema("2025"))
    assert info.value.source == str(csv) and needle in info.value.message


def _folders(root, classes=("CT", "PN"), per_class=3, extra=()):
    for code in (*classes, *extra):
        (root / code).mkdir(parents=True)
        for k in range(per_class):
            (root / code / f"BraTSPath_{code}_{k:07d}.jpg").write_bytes(b"jpg")
    (root / "val").mkdir()
    (root / "val" / "BraTSPath_Val_0000001.jpg").write_bytes(b"jpg")
    return root


def test_folder_layout_and_csv_layout_agree(tmp_path):
    root = _folders(tmp_path / "d")
    schema = get_schema("2025")
    tiles = scan_folders(root, schema)
    assert tiles.counts()["CT"] == 3 and tiles.counts()["PN"] == 3 and set(tiles.labels) == {0, 1}
    csv = tmp_path / "labels.csv"
    csv.write_text("Input Path,Ground-Truth\n" + "".join(
        f"/elsewhere/{p.parent.name}/{p.name},{schema.label(p.parent.name)}\n" for p in tiles.paths))
    from_csv = load_tiles(root, schema, csv)
    assert from_csv.paths == tiles.paths and from_csv.labels.tolist() == tiles.labels.tolist()
    assert [p.name for p in unlabeled_images(root / "val")] == ["BraTSPath_Val_0000001.jpg"]


@pytest.mark.parametrize("text, needle", [
    ("Path,Label\nCT/x.jpg,CT\n", "missing column(s) Input Path, Ground-Truth"),
    ("Input Path,Ground-Truth\nCT/a.jpg,CT\nCT/b.jpg,XX\n", "line 3: 'XX' is not a class of the 2025 schema"),
    ("Input Path,Ground-Truth\nCT/a.jpg,12\n", "line 2: '12' is not a class"),
    ("Input Path,Ground-Truth\nx.jpg,CT\n", "line 2: path 'x.jpg' has no <class>/<file> tail"),
    ("Input Path,Ground-Truth\n/x.jpg,CT\n", "line 2: path '/x.jpg' has no <class>/<file> tail"),
])
def test_bad_label_files_name_the_line(text, needle, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=None) as info:
        read_labels_csv(csv, tmp_path, get_schema("2025"))
    assert info.value.source == str(csv) and needle in info.value.message


def test_a_folder_outside_the_schema_and_an_empty_submission_folder(tmp_path):
    root = _folders(tmp_path / "d", extra=("LI",))
    with pytest.raises(DataError, match="'LI' is not a class of the 2024 schema"):
        scan_folders(root, get_schema("2024"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        unlabeled_images(tmp_path / "empty")


def test_split_keeps_class_proportions(tmp_path):
    root = _folders(tmp_path / "d", classes=("CT", "PN", "MP"), per_class=20)
    tiles = scan_folders(root, get_schema("2025"))
    split = stratified_split(tiles, 0.25, seed=0)
    for label in range(3):
        assert np.sum((tiles.labels == label) & (split == "val")) == 5
