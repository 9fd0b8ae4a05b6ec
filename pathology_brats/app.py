"""The pathology_brats tab of ``python -m common.app``: a histology tile (and caption) -> its class."""

from __future__ import annotations

from pathlib import Path

from common.app import AppSpec


def predictor(run_dir: Path, device: str = "auto"):
    from pathology_brats.predict import TilePredictor

    return TilePredictor(run_dir, device)


APP = AppSpec(name="pathology_brats", title="BraTS-Path tiles", input="picture", predictor=predictor,
              text="caption (optional; fused and text runs read it)",
              description="An H&E tile (PNG/JPEG/TIFF or RGB DICOM) -> the class and the probability of each class "
                          "of the run's schema. A fused run without a caption gets an empty one, and says so.")
