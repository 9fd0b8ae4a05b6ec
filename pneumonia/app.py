"""The pneumonia tab of ``python -m common.app``: what ``pneumonia.predict`` gives for one uploaded chest X-ray."""

from __future__ import annotations

from pathlib import Path

from common.app import AppSpec


def predictor(run_dir: Path, device: str = "auto"):
    from pneumonia.predict import PneumoniaPredictor

    return PneumoniaPredictor(run_dir, device)


APP = AppSpec(name="pneumonia", title="Pneumonia", input="picture", predictor=predictor,
              description="A chest X-ray (PNG/JPEG/TIFF/BMP or DICOM) -> P(pneumonia) at the run's validation "
                          "threshold, Grad-CAM on the 28 px thumbnail the model sees, and the most similar archive "
                          "cases when the run has a retrieval index.")
