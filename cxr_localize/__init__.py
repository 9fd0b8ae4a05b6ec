"""Report-conditioned U-Net that outlines the chest X-ray region a radiology report describes."""

from common.pipelines import Pipeline

PIPELINE = Pipeline(
    name="cxr_localize", title="Report-conditioned localisation",
    run_outputs=("split.csv", "data.json", "predictions", "figures", "results.json", "results.md", "results.csv"),
    demo="cxr_localize.demo:demo_section", app="cxr_localize.app:APP",
    commands=("cxr_localize.pretrain", "cxr_localize.train", "cxr_localize.evaluate", "cxr_localize.predict"),
    stages=(("pretrain", "cxr_localize.pretrain"), ("train", "cxr_localize.train")),
    predicts="cxr_localize.evaluate", scores="cxr_localize.evaluate",
)
"""What the floor knows of this pipeline (``common.pipelines``): ``run_outputs`` are the files and folders its
commands write into a run directory, which ``--overwrite`` removes; ``stages`` its training in order, ``predicts``
and ``scores`` the commands that write a run's predictions and score them."""
