"""The cxr_localize tab of ``python -m common.app``: a chest X-ray and its report -> the mask ``predict`` draws."""

from __future__ import annotations

from pathlib import Path

from common.app import AppSpec


def predictor(run_dir: Path, device: str = "auto"):
    from cxr_localize.predict import LocalizePredictor

    return LocalizePredictor(run_dir, device)


APP = AppSpec(name="cxr_localize", title="CXR localize", input="picture", predictor=predictor,
              text="report text", text_required=True,
              description="A chest X-ray and its report -> the mask of what the report describes, at the image's "
                          "size, its overlay, and the share of predicted mass per lung.")
