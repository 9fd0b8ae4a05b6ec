"""A small IU X-ray-format phantom shared by the cxr_localize tests (copied before a test damages it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.phantoms.iu import write_iu


@pytest.fixture(scope="session")
def small_iu(tmp_path_factory) -> Path:
    """24 patients at 64 px: enough for the loader and error paths."""
    return write_iu(tmp_path_factory.mktemp("iu_small") / "iu", n=24, seed=1, size=64)


@pytest.fixture
def iu_copy(small_iu, tmp_path) -> Path:
    """A private copy of the small phantom that a test may break."""
    return Path(shutil.copytree(small_iu, tmp_path / "iu"))
