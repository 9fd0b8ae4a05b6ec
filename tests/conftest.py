"""Shared fixtures: offline hub, headless plots, few threads, the real data beside the repo, a tiny trained run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker owns one core: more threads per worker oversubscribe the machine and stall torch.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is present; elsewhere they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repo (real data kept for development); tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pneumonia_phantom(tmp_path_factory) -> Path:
    """A PneumoniaMNIST-format phantom .npz (28 px) whose classes differ by learnable opacities."""
    from common.phantoms.cxr import write_medmnist

    return write_medmnist(tmp_path_factory.mktemp("pneumonia_phantom"), n=500, seed=3, size=28)


@pytest.fixture(scope="session")
def trained_pneumonia_run(tmp_path_factory, pneumonia_phantom) -> tuple[Path, Path]:
    """A small ResNet trained on the phantom through the real CLI: (run_dir, npz_path)."""
    from pneumonia import train

    run_dir = tmp_path_factory.mktemp("pneumonia_run")
    code = train.main(["--data-root", str(pneumonia_phantom.parent), "--output-dir", str(run_dir),
                       "--arch", "resnet-tiny", "--epochs", "4", "--batch-size", "32", "--lr", "3e-3",
                       "--no-progress", "--seed", "0"])
    assert code == 0
    return run_dir, pneumonia_phantom


@pytest.fixture(scope="session")
def small_iu(tmp_path_factory) -> Path:
    """24 patients at 64 px: enough for the loader and error paths."""
    from common.phantoms.iu import write_iu

    return write_iu(tmp_path_factory.mktemp("iu_small") / "iu", n=24, seed=1, size=64)


@pytest.fixture
def iu_copy(small_iu, tmp_path) -> Path:
    """A private copy of the small phantom that a test may break."""
    return Path(shutil.copytree(small_iu, tmp_path / "iu"))


HISTOLOGY_TILES_PER_CLASS = 16


@pytest.fixture(scope="session")
def histology_phantom(tmp_path_factory) -> Path:
    """The BraTS-Path phantom every pathology test reads (written once): ``HISTOLOGY_TILES_PER_CLASS`` tiles per
    class of the 2025 schema at 64 px, ``labels.csv``, captions and unlabelled ``val/`` tiles. Read-only: a test
    that breaks it works on a copy."""
    from common.phantoms.histology import write_histology

    root = tmp_path_factory.mktemp("histology_phantom")
    write_histology(root, n=HISTOLOGY_TILES_PER_CLASS, seed=1, size=64)
    return root


@pytest.fixture(scope="session")
def histology_run(tmp_path_factory, histology_phantom) -> tuple[Path, Path, Path]:
    """A small fused BraTS-Path run (frozen gigapath-tiny + MiniLM captions) trained on the histology phantom through
    the real CLI: (run_dir, phantom root, feature cache)."""
    from pathology_brats import train

    root = tmp_path_factory.mktemp("histology_run")
    run, cache = root / "run", root / "cache"
    assert train.main(["--data-root", str(histology_phantom), "--output-dir", str(run), "--encoder", "gigapath-tiny",
                       "--encoder-mode", "frozen", "--text-encoder", "minilm", "--width", "32", "--epochs", "3",
                       "--lr", "3e-3", "--feature-cache", str(cache), "--no-progress", "--device", "cpu",
                       "--precision", "fp32"]) == 0
    return run, histology_phantom, cache


@pytest.fixture(scope="session")
def brain_phantom(tmp_path_factory) -> tuple[Path, dict]:
    """The brain phantom the data and phantom tests read (written once): 20 tumour cases and 4 healthy controls at
    40 x 48 x 32 voxels, with its ``truth.json``."""
    import json

    from common.phantoms.brain import write_brain

    root = tmp_path_factory.mktemp("brain_phantom")
    return root, json.loads(write_brain(root, n=20, seed=3, size=(40, 48, 32), n_healthy=4).read_text())


@pytest.fixture(scope="session")
def small_brain_phantom(tmp_path_factory) -> Path:
    """12 tumour cases and 2 healthy controls at 32 x 32 x 32 voxels (written once), the data of the training tests
    and of ``brain_tiny_runs``. Read-only."""
    from common.phantoms.brain import write_brain

    root = tmp_path_factory.mktemp("brain_small")
    write_brain(root, n=12, seed=2, size=(32, 32, 32))
    return root


@pytest.fixture(scope="session")
def brain_tiny_runs(tmp_path_factory, small_brain_phantom) -> dict[str, Path]:
    """A one-epoch contrastive run (``r1``) and a warmup run from it (``r2``) on ``small_brain_phantom``, trained
    once per session through the real CLI: ``{"data", "r1", "r2", "cache"}``. Read-only: copy a run to write in it."""
    from brain3d_report import train

    base = tmp_path_factory.mktemp("brain_tiny_runs")
    dirs = {"data": small_brain_phantom, "r1": base / "r1", "r2": base / "r2", "cache": base / "cache"}
    common = ["--data-root", str(dirs["data"]), "--volume-size", "16", "32", "32", "--volume-cache",
              str(dirs["cache"]), "--no-progress", "--device", "cpu", "--precision", "fp32", "--epochs", "1"]
    assert train.main(["--stage", "contrastive", "--output-dir", str(dirs["r1"]), "--vision", "siglip-tiny", "--lm",
                       "tiny-gemma3", "--text-embedding", "lm", *common]) == 0
    assert train.main(["--stage", "warmup", "--output-dir", str(dirs["r2"]), "--init", str(dirs["r1"]),
                       "--max-text-len", "48", "--batch-size", "4", "--grad-accum", "1", "--lr", "2e-4", *common]) == 0
    return dirs


@pytest.fixture
def assert_one_error_line(capsys):
    """``check(needles)``: the command's stderr is one ``error: ...`` line, no traceback, naming every needle."""

    def check(needles) -> None:
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert "Traceback" not in captured.err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])

    return check
