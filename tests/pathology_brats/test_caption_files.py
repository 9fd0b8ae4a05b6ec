"""Caption files: the seed's CSV beside our JSONL, matching a caption to a tile by its path's tail, conflicts."""

from __future__ import annotations

import pytest

from common.errors import DataError
from pathology_brats.caption_files import check_captions, match_captions, read_captions


def test_the_seeds_csv_reads_like_our_jsonl(tmp_path):
    csv = tmp_path / "internal_val_with_captions.csv"
    csv.write_text('image,response\n../BraTS-Path/New-Data-384-Collated-JPG/WM/BraTSPath_WM_1.jpg,"Pale, sparse."\n'
                   "C:\\data\\CT\\BraTSPath_CT_2.jpg,Dense nuclei.\n")
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"image": "WM/BraTSPath_WM_1.jpg", "caption": "Pale, sparse."}\n'
                     '{"image": "BraTSPath_CT_2.jpg", "caption": "Dense nuclei."}\n')
    ids = ["New-Data-384-Collated-JPG/WM/BraTSPath_WM_1.jpg", "New-Data-384-Collated-JPG/CT/BraTSPath_CT_2.jpg"]
    expected = dict(zip(ids, ["Pale, sparse.", "Dense nuclei."]))
    assert match_captions(read_captions(csv), ids, csv) == expected
    assert match_captions(read_captions(jsonl), ids, jsonl) == expected


def test_the_caption_sharing_the_longest_tail_wins_and_a_tie_of_two_texts_is_an_error(tmp_path):
    captions = {"A/CT/BraTSPath_CT_1.jpg": "first", "B/CT/BraTSPath_CT_1.jpg": "second"}
    ids = ["A/CT/BraTSPath_CT_1.jpg", "B/CT/BraTSPath_CT_1.jpg"]
    assert match_captions(captions, ids, tmp_path / "c.jsonl") == {ids[0]: "first", ids[1]: "second"}
    with pytest.raises(DataError, match="give 'C/CT/BraTSPath_CT_1.jpg' different captions"):
        match_captions(captions, ["C/CT/BraTSPath_CT_1.jpg"], tmp_path / "c.jsonl")
    same = {"A/CT/BraTSPath_CT_1.jpg": "one", "B/CT/BraTSPath_CT_1.jpg": "one"}  # copies with one caption: fine
    assert match_captions(same, ["C/CT/BraTSPath_CT_1.jpg"], tmp_path / "c.jsonl") == {"C/CT/BraTSPath_CT_1.jpg": "one"}


def test_one_image_with_two_captions_and_missing_captions(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "caption": "y"}\n'
                    '{"image": "a.jpg", "caption": "z"}\n')
    with pytest.raises(DataError, match="records 1 and 3 give 'a.jpg' two different captions"):
        read_captions(path)
    path.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "a.jpg", "caption": "x"}\n')
    captions = read_captions(path)
    with pytest.raises(DataError, match="no caption for 1 image"):
        check_captions(captions, ["CT/a.jpg", "CT/b.jpg"], ["CT/a.jpg", "CT/b.jpg"], path)
    assert check_captions(captions, ["CT/a.jpg", "CT/b.jpg"], ["CT/a.jpg", "CT/b.jpg"], path,
                          skip_missing=True) == {"CT/a.jpg": "x"}
    with pytest.raises(DataError, match="1 caption\\(s\\) for images not in the data"):
        check_captions(captions, ["CT/c.jpg"], ["CT/c.jpg"], path)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,text\na.jpg,x\n")
    with pytest.raises(DataError, match="needs an 'image' column and one of response, caption"):
        read_captions(bad)
