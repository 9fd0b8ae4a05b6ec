"""Bad inputs of the floor's own commands: exit code 2, one line naming the flag, nothing written. The pipelines'
tables are in their test folders (``tests/<pipeline>/test_bad_input*.py``)."""

from __future__ import annotations

import pytest

from common.phantoms import __main__ as phantoms
from common.phantoms.cxr import write_medmnist

# --- common.phantoms -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["cxr", "--format", "iu", "--size", "4"], "--size"),
    (["cxr", "--format", "iu", "--n", "3"], "--n"),
    (["cxr", "--format", "medmnist", "--size", "30"], "--size"),
    (["cxr", "--format", "medmnist", "--n", "0"], "--n"),
    (["cxr", "--format", "dicom"], "--format"),
    (["cxr", "--format", "iu", "--seed", "x"], "--seed"),
])
def test_phantom_bad_sizes(argv, needle, tmp_path, assert_one_error_line):
    assert phantoms.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert_one_error_line([needle])
    assert not (tmp_path / "out").exists()


def test_phantom_out_is_a_file(tmp_path, assert_one_error_line):
    (tmp_path / "f").write_text("x")
    assert phantoms.main(["cxr", "--format", "medmnist", "--out", str(tmp_path / "f")]) == 2
    assert_one_error_line(["--out", "is a file"])
    assert write_medmnist(tmp_path / "ok", n=12).is_file()
