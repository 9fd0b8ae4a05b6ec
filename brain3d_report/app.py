"""The brain3d_report tab of ``python -m common.app``: a FLAIR volume -> the report ``predict`` writes, and with a
phrase in the text box its LIME map (``predict --explain``) over the slices."""

from __future__ import annotations

import tempfile
from pathlib import Path

from common.app import AppSpec


def predictor(run_dir: Path, device: str = "auto"):
    from brain3d_report.predict import ReportPredictor

    return ReportPredictor(run_dir, Path(tempfile.mkdtemp(prefix="medvl-brain3d-")), device)


APP = AppSpec(name="brain3d_report", title="Brain MRI report", input="volume", predictor=predictor,
              file_types=(".nii", ".nii.gz", ".gz", ".dcm"),
              text='phrase to explain (optional), e.g. "left frontal": its LIME map over the slices',
              description="A FLAIR NIfTI (or the DICOM slices of one series) -> the generated report, and three "
                          "orthogonal slices of the volume with a slider; with a phrase, the LIME map of the "
                          "phrase's likelihood (brain3d_report.explain) over them.")
