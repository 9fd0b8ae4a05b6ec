"""Demo section for report-conditioned localisation: phantom -> phase 1 -> phase 2 -> evaluation, offline on CPU.

Example:
    python -m common.demo --only cxr_localize

A shorter run than the full one in cxr_localize/README.md (96 px instead of 128, one pre-training epoch instead of
three, 25 epochs instead of 30) so that it fits a few minutes on two CPU cores; the text tests are the same.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.phantoms.iu import DEFAULT_N, write_iu
from cxr_localize import evaluate, pretrain, train

DEMO_PATIENTS = DEFAULT_N
DEMO_IMAGE_SIZE = 96
DEMO_EPOCHS = 25
DEMO_TEXT_ENCODER = "minilm"


def _run(main, argv: list[str]) -> None:
    code = main(argv)
    if code != 0:
        raise SystemExit(code)


def demo_section(out_dir: Path) -> str:
    """Run the pipeline under ``out_dir/cxr_localize`` and return its Markdown section (links relative to out_dir)."""
    out_dir = Path(out_dir)
    root = out_dir / "cxr_localize"
    data, phase1, run_dir = root / "phantom", root / "pretrain", root / "train"
    write_iu(data, n=DEMO_PATIENTS, seed=0)
    size = ["--image-size", str(DEMO_IMAGE_SIZE)]
    _run(pretrain.main, ["--data-root", str(data), "--output-dir", str(phase1), "--encoder-weights", "none",
                         "--epochs", "1", "--no-progress", "--overwrite", *size])
    _run(train.main, ["--data-root", str(data), "--encoder-init", str(phase1), "--text-encoder", DEMO_TEXT_ENCODER,
                      "--output-dir", str(run_dir), "--epochs", str(DEMO_EPOCHS), "--no-progress", "--overwrite",
                      *size])
    results = evaluate.evaluate_run(run_dir)
    link = lambda path: os.path.relpath(path, out_dir)  # noqa: E731
    table = (run_dir / "results.md").read_text().split("\n", 1)[1]
    table = table.replace("](figures/", f"]({link(run_dir / 'figures')}/")
    return "\n".join([
        "## Chest X-ray localisation: report-conditioned U-Net", "",
        f"IU X-ray-format phantom ({DEMO_PATIENTS} patients; each image holds two opacities, the report names one), "
        f"`python -m cxr_localize.pretrain` (1 masked-reconstruction epoch), `python -m cxr_localize.train "
        f"--text-encoder {DEMO_TEXT_ENCODER}` ({DEMO_EPOCHS} epochs, {DEMO_IMAGE_SIZE} px, frozen ResNet34 encoder, "
        "FiLM fusion) and "
        "`python -m cxr_localize.evaluate`. A shortened run; the full default run is reported in "
        "cxr_localize/README.md.", "",
        f"Dice {results['dice']:.3f} with the reports, {results['dice_shuffled']:.3f} with reports shuffled across "
        f"images; swapping left and right in the reports moves the share of predicted mass in the named lung from "
        f"{results['mass_named_side']:.2f} to {results['mass_named_side_lr_swapped']:.2f}.", "",
        table, "",
        f"![test panels]({link(run_dir / 'figures' / 'test_panels.png')}) "
        f"![text tests]({link(run_dir / 'figures' / 'text_tests.png')})", "",
    ])
