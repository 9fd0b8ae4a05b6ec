"""BraTS-Path: Prov-GigaPath tiles + VLM captions, cross-attention fusion, challenge scoring (in progress)."""

from common.pipelines import Pipeline

PIPELINE = Pipeline(
    name="pathology_brats", title="BraTS-Path",
    run_outputs=("split.csv", "data.json", "predictions", "figures", "results.json", "results.md", "results.csv"),
    demo="pathology_brats.demo:demo_section", app="pathology_brats.app:APP",
    commands=("pathology_brats.extract", "pathology_brats.caption", "pathology_brats.train",
              "pathology_brats.evaluate", "pathology_brats.validate", "pathology_brats.ablate",
              "pathology_brats.submit", "pathology_brats.score", "pathology_brats.predict"),
    stages=(("train", "pathology_brats.train"),),
    predicts="pathology_brats.evaluate", scores="pathology_brats.evaluate",
)
"""What the floor knows of this pipeline (``common.pipelines``): ``run_outputs`` are the files and folders its
commands write into a run directory, which ``--overwrite`` removes; ``stages`` its training in order, ``predicts``
and ``scores`` the commands that write a run's predictions and score them."""
