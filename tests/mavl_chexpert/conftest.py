"""A small CheXpert phantom and runs of both phases trained on it through the real CLIs (shared by the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

IMAGE_ARGS = ("--backbone", "vit-tiny", "--epochs", "12", "--batch-size", "16", "--no-progress", "--seed", "0",
              "--device", "cpu", "--precision", "fp32")


@pytest.fixture(scope="session")
def chexpert_phantom(tmp_path_factory) -> Path:
    """120 training patients (about 200 frontal images) and 48 test patients at 64 px."""
    from common.phantoms.chexpert import write_chexpert

    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    write_chexpert(root, n=120, seed=0, size=64)
    return root


@pytest.fixture(scope="session")
def image_run(tmp_path_factory, chexpert_phantom) -> Path:
    from mavl_chexpert import train_image

    run = tmp_path_factory.mktemp("mavl_image") / "run"
    assert train_image.main(["--data-root", str(chexpert_phantom), "--output-dir", str(run), *IMAGE_ARGS]) == 0
    return run


@pytest.fixture(scope="session")
def fusion_run(tmp_path_factory, chexpert_phantom, image_run) -> Path:
    from mavl_chexpert import train_fusion

    run = tmp_path_factory.mktemp("mavl_fusion") / "run"
    assert train_fusion.main(["--data-root", str(chexpert_phantom), "--image-run", str(image_run), "--output-dir",
                              str(run), "--text-encoder", "minilm", "--no-progress",
                              "--device", "cpu", "--precision", "fp32"]) == 0
    return run


HOLDOUT = "Consolidation"


@pytest.fixture(scope="session")
def holdout_image_run(tmp_path_factory, chexpert_phantom) -> Path:
    """Phase 1 with Consolidation held out (its labels reach no loss; the head has four outputs)."""
    from mavl_chexpert import train_image

    run = tmp_path_factory.mktemp("mavl_holdout_image") / "run"
    assert train_image.main(["--data-root", str(chexpert_phantom), "--output-dir", str(run), *IMAGE_ARGS,
                             "--holdout-classes", HOLDOUT]) == 0
    return run


@pytest.fixture(scope="session")
def holdout_fusion_run(tmp_path_factory, chexpert_phantom, holdout_image_run) -> Path:
    """MAVL's fusion over it (a disease scored as the probability that each aspect it states is shown), with the
    phantom's own aspect descriptions."""
    from mavl_chexpert import train_fusion

    run = tmp_path_factory.mktemp("mavl_holdout_fusion") / "run"
    assert train_fusion.main(["--data-root", str(chexpert_phantom), "--image-run", str(holdout_image_run),
                              "--output-dir", str(run), "--text-encoder", "minilm", "--fusion", "mavl",
                              "--aspect-combine", "all", "--descriptions", str(chexpert_phantom / "descriptions.json"),
                              "--epochs", "20",
                              "--no-progress", "--device", "cpu", "--precision", "fp32"]) == 0
    return run
