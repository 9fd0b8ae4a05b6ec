"""Bad input to the cxr_localize CLIs: exit 2, one line naming the file and the rows, nothing written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_localize import train
from cxr_localize.data import IMAGE_DIR, MASK_DIR, PROJECTIONS_CSV, REPORTS_CSV

TINY = ["--encoder-weights", "none", "--encoder", "resnet18", "--decoder-channels", "16", "16", "8", "8", "8",
        "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu",
        "--precision", "fp32", "--text-encoder", "tiny-clip", "--train-encoder"]


def _append_twice(name, column, what):
    def case(data):
        frame = pd.read_csv(data / name, dtype=str)
        row = frame.loc[0].copy()
        if name == REPORTS_CSV:
            row["findings"] = "A large mass in the left lung."
        frame.loc[len(frame)] = row
        frame.to_csv(data / name, index=False)
        return [str(data / name), f"{what} {frame.loc[0, column]!r} is listed twice (lines 2 and {len(frame) + 1})"]
    return case


def _masked(data):
    return sorted(p.name for p in (data / MASK_DIR).iterdir())


def _blank_image(data):
    name = _masked(data)[0]
    size = Image.open(data / IMAGE_DIR / name).size
    Image.fromarray(np.full(size[::-1], 7, np.uint8)).save(data / IMAGE_DIR / name)
    return [str(data / IMAGE_DIR / name), "image is blank (every pixel is 7)"]


def _all_masks(value, state):
    def case(data):
        for name in _masked(data):
            size = Image.open(data / MASK_DIR / name).size
            Image.fromarray(np.full(size[::-1], value, np.uint8)).save(data / MASK_DIR / name)
        return [str(data / MASK_DIR), f"training masks are {state}"]
    return case


CASES = {
    "uid with two reports": _append_twice(REPORTS_CSV, "uid", "uid"),
    "image listed twice": _append_twice(PROJECTIONS_CSV, "filename", "file name"),
    "blank image": _blank_image,
    "every training mask empty": _all_masks(0, "empty"),
    "every training mask full": _all_masks(255, "full"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, iu_copy, tmp_path, capsys):
    needles = CASES[case](iu_copy)
    capsys.readouterr()
    assert train.main(["--data-root", str(iu_copy), "--output-dir", str(tmp_path / "out"), *TINY]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "out").exists()
