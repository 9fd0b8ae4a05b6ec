"""PneumoniaMNIST: ResNet-18 at 28x28, MedGemma reports, FAISS case retrieval and Grad-CAM."""

from common.pipelines import Pipeline

PIPELINE = Pipeline(
    name="pneumonia", title="Pneumonia",
    run_outputs=("split.csv", "data.json", "predictions", "figures", "results.json", "results.md", "results.csv",
                 "reports", "retrieval", "ensemble.json"),
    demo="pneumonia.demo:demo_section", app="pneumonia.app:APP",
    commands=("pneumonia.train", "pneumonia.evaluate", "pneumonia.explain", "pneumonia.report", "pneumonia.retrieval",
              "pneumonia.predict", "pneumonia.ensemble"),
    stages=(("train", "pneumonia.train"),),
    predicts="pneumonia.evaluate", scores="pneumonia.evaluate",
)
"""What the floor knows of this pipeline (``common.pipelines``): ``run_outputs`` are the files and folders its
commands write into a run directory, which ``--overwrite`` removes; ``stages`` its training in order, ``predicts``
and ``scores`` the commands that write a run's predictions and score them."""
