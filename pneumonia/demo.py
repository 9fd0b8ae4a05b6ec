"""Demo section for PneumoniaMNIST: train on the embedded real data, evaluate on test, then reports, retrieval
and Grad-CAM with the trained CNN.

Example:
    python -m common.demo --only pneumonia
"""

from __future__ import annotations

import os
from pathlib import Path

from pneumonia import evaluate, explain, report, retrieval, train

EMBEDDED_DATA = Path(__file__).resolve().parents[1] / "data" / "samples" / "medmnist"
DEMO_EPOCHS = 3


def demo_section(out_dir: Path) -> str:
    """Train a short ResNet-18 run and return the Markdown sections of the pneumonia pipeline."""
    run_dir = Path(out_dir) / "pneumonia" / "run"
    recipe = Path(__file__).resolve().parents[1] / "configs" / "pneumonia" / "train.warmup.yaml"
    code = train.main(["--config", str(recipe),
                       "--data-root", str(EMBEDDED_DATA), "--output-dir", str(run_dir), "--epochs", str(DEMO_EPOCHS),
                       "--no-progress", "--overwrite"])
    if code != 0:
        raise SystemExit(code)
    results = evaluate.evaluate_run(run_dir, "test")
    link = lambda name: os.path.relpath(run_dir / name, out_dir)  # noqa: E731
    table = (run_dir / "results.md").read_text().split("\n", 1)[1]
    classifier = "\n".join([
        "## Pneumonia: ResNet-18 at 28x28", "",
        "`python -m pneumonia.train --config configs/pneumonia/train.warmup.yaml "
        f"--data-root {EMBEDDED_DATA} --epochs {DEMO_EPOCHS}` "
        f"then `python -m pneumonia.evaluate --run-dir RUN`. A {DEMO_EPOCHS}-epoch demo run (the full 10-epoch "
        "numbers are in the README); epoch and threshold chosen on validation, test read once.", "",
        f"Test AUROC {results['auroc']:.3f}, accuracy {results['acc']:.3f}.", "",
        table.replace("figures/", link("figures") + "/"), "",
        f"![loss curves]({link('figures/loss_curves.png')})", ""])
    return "\n".join([classifier, report.run_section(run_dir, out_dir), retrieval.run_section(run_dir, out_dir),
                      explain.run_section(run_dir, out_dir)])
