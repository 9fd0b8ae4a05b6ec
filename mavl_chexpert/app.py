"""The mavl_chexpert tab of ``python -m common.app``: per-finding probabilities as ``predict`` computes them."""

from __future__ import annotations

from pathlib import Path

from common.app import AppSpec


def predictor(run_dir: Path, device: str = "auto"):
    from mavl_chexpert.predict import ChexpertPredictor

    return ChexpertPredictor(run_dir, device)


APP = AppSpec(name="mavl_chexpert", title="CheXpert findings", input="picture", predictor=predictor,
              description="A chest X-ray -> a probability and a label (validation threshold) per CheXpert finding; "
                          "fusion runs also name the description sentence that matched best.")
