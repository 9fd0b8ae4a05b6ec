"""Demo section for MAVL on CheXpert: phantom -> the ablation (three phase-1 runs, fusion over the tail run), on CPU.

Example:
    python -m common.demo --only mavl_chexpert

A shortened run (300 training patients, 15 phase-1 epochs) so that three ViT trainings fit a few minutes on two
CPU cores; the full default run (500 patients, 30 epochs) is reported in the README.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.phantoms.chexpert import write_chexpert
from mavl_chexpert import ablate

DEMO_PATIENTS = 300
DEMO_EPOCHS = 15
DEMO_TEXT_ENCODER = "minilm"


def demo_section(out_dir: Path) -> str:
    """Run the ablation under ``out_dir/mavl_chexpert`` and return its Markdown section (links relative to out_dir)."""
    out_dir = Path(out_dir)
    root = out_dir / "mavl_chexpert"
    data, runs = root / "CheXpert-v1.0-small", root / "ablation"
    if not (data / "train.csv").is_file():
        write_chexpert(data, n=DEMO_PATIENTS, seed=0)
    code = ablate.main(["--data-root", str(data), "--output-dir", str(runs), "--backbone", "vit-tiny",
                        "--text-encoder", DEMO_TEXT_ENCODER, "--", "--epochs", str(DEMO_EPOCHS)])
    if code != 0:
        raise SystemExit(code)
    fusion = runs / "fusion_tail"
    link = lambda path: os.path.relpath(path, out_dir)  # noqa: E731
    table = (runs / "ablation.md").read_text().split("\n", 1)[1]
    per_disease = (fusion / "results.md").read_text().split("## Per disease", 1)[1].split("\n", 1)[1]
    per_disease = per_disease.split("\n## ", 1)[0]  # the reference table of published numbers stays in the run
    per_disease = per_disease.replace("](figures/", f"]({link(fusion / 'figures')}/")
    return "\n".join([
        "## MAVL on CheXpert: ViT + LRF, aspect descriptions, similarity fusion", "",
        f"CheXpert-v1.0-small-format phantom ({DEMO_PATIENTS} training patients; nine findings drawn from shared "
        "aspect values (location, opacity, pattern, border, fluid), the five competition ones labelled; studies of "
        "one to three views), "
        f"`python -m mavl_chexpert.ablate --backbone vit-tiny --text-encoder {DEMO_TEXT_ENCODER} "
        f"-- --epochs {DEMO_EPOCHS}`: "
        "phase 1 with BCE only, with LRFL's tail term, with the seed's top-r term, and phase 3 fusion over the tail "
        "run; test set = valid.csv scored by study (the most suspicious view), thresholds chosen on the validation "
        "patients. A shortened run; the full default "
        "run is in the README.", "",
        table, "",
        "Fusion model, per disease (95% bootstrap CI):", "",
        per_disease.strip(), "",
    ])
