"""3D brain MRI report generation: inflated MedSigLIP, a Perceiver resampler and MedGemma, on BraTS FLAIR volumes."""

from common.pipelines import Pipeline

PIPELINE = Pipeline(
    name="brain3d_report", title="3D brain MRI reports",
    run_outputs=("split.csv", "data.json", "predictions", "figures", "results*.md", "results*.json", "results*.csv",
                 "metrics_full*.json", "baselines.*", "probe.json", "explain"),
    demo="brain3d_report.demo:demo_section", app="brain3d_report.app:APP",
    commands=("brain3d_report.data", "brain3d_report.train", "brain3d_report.generate",
              "brain3d_report.evaluate", "brain3d_report.baselines", "brain3d_report.probe", "brain3d_report.explain",
              "brain3d_report.predict"),
    stages=(("contrastive", "brain3d_report.train"), ("warmup", "brain3d_report.train"),
            ("lora", "brain3d_report.train")),
    predicts="brain3d_report.generate", scores="brain3d_report.evaluate",
    tokenizer_corpora={"brain": "brain3d_report.lm_twin:tokenizer_corpus"},
)
"""What the floor knows of this pipeline (``common.pipelines``): ``run_outputs`` are the files and folders its
commands write into a run directory, which ``--overwrite`` removes; ``stages`` its training in order, ``predicts``
and ``scores`` the commands that write a run's predictions and score them."""
