"""MAVL on CheXpert."""

from common.pipelines import Pipeline

PIPELINE = Pipeline(
    name="mavl_chexpert", title="MAVL on CheXpert",
    run_outputs=("split.csv", "data.json", "text.json", "text_embeddings.safetensors", "predictions", "figures",
                 "results.json", "results.md", "results.csv", "oracle"),
    demo="mavl_chexpert.demo:demo_section", app="mavl_chexpert.app:APP",
    commands=("mavl_chexpert.text", "mavl_chexpert.train_image", "mavl_chexpert.train_fusion",
              "mavl_chexpert.evaluate", "mavl_chexpert.ablate", "mavl_chexpert.predict"),
    stages=(("image", "mavl_chexpert.train_image"), ("fusion", "mavl_chexpert.train_fusion")),
    predicts="mavl_chexpert.evaluate", scores="mavl_chexpert.evaluate",
)
"""What the floor knows of this pipeline (``common.pipelines``): ``run_outputs`` are the files and folders its
commands write into a run directory, which ``--overwrite`` removes; ``stages`` its training in order, ``predicts``
and ``scores`` the commands that write a run's predictions and score them."""
