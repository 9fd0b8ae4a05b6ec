"""Demo section for the 3D brain report pipeline: phantom -> three short stages -> probe, generation, metrics,
baselines and one 3D LIME map, on CPU with the tiny twins.

Example:
    python -m common.demo --only brain3d_report

A shortened run of the twins' config files (a 40-case phantom, volumes of 32 x 64 x 64, a few epochs per stage) so
that it fits a few minutes on two CPU cores (plus about two minutes the first time the language-pre-trained LM twin
is built and cached); its reports are not meant to read well: the section shows that every step runs and what each
table holds. The default-size run is reported in the README.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from brain3d_report import baselines, evaluate, explain, generate, probe, train
from brain3d_report.lm_twin import TWIN
from common.phantoms.brain import write_brain

DEMO_CASES = 40
DEMO_SIZE = ("32", "64", "64")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "brain3d_report"


def _run(module, argv: list[str]) -> None:
    code = module.main(argv)
    if code != 0:
        raise SystemExit(code)


def demo_section(out_dir: Path) -> str:
    """Run the pipeline under ``out_dir/brain3d_report`` and return its Markdown section."""
    out_dir = Path(out_dir)
    root = out_dir / "brain3d_report"
    data, runs, cache = root / "brain_phantom", root / "runs", root / "volumes"
    if not (data / "truth.json").is_file():
        write_brain(data, n=DEMO_CASES, seed=0)
    shared = ["--data-root", str(data), "--volume-size", *DEMO_SIZE, "--volume-cache", str(cache), "--no-progress",
              "--device", "cpu"]
    stages = [("contrastive", ["--epochs", "3"]),  # batches of cases and their mirror images: 6 epochs of compute
              ("warmup", ["--epochs", "3", "--grad-accum", "4", "--max-text-len", "96"]),
              ("lora", ["--epochs", "2", "--grad-accum", "4", "--max-text-len", "96"])]
    previous = None
    for stage, extra in stages:
        run = runs / stage
        if not (run / "best" / "model.json").is_file():
            init = ["--init", str(previous)] if previous else []
            _run(train, ["--config", str(CONFIGS / f"twin.{stage}.yaml"), *shared, "--output-dir", str(run),
                         "--overwrite", *init, *extra])
        previous = run
    r1, r3 = runs / "contrastive", runs / "lora"
    _run(probe, ["--run-dir", str(r1), "--volume-cache", str(cache), "--device", "cpu"])
    local = ["--volume-cache", str(cache), "--device", "cpu"]
    _run(generate, ["--run-dir", str(r3), "--split", "test", "--greedy", "--max-new-tokens", "64", *local])
    _run(generate, ["--run-dir", str(r3), "--split", "test", "--greedy", "--max-new-tokens", "64",
                    "--shuffle-volumes", *local])
    _run(evaluate, ["--run-dir", str(r3), "--n-boot", "200", "--n-boot-corpus", "20", "--bertscore", "minilm"])
    _run(baselines, ["--run-dir", str(r3), "--n-boot", "100", "--n-boot-corpus", "10", "--bertscore", "minilm",
                     *local])
    truth = json.loads((data / "truth.json").read_text())["cases"]
    split = pd.read_csv(r3 / "split.csv")
    test_ids = sorted(split.loc[split["split"] == "test", "id"])
    left = [i for i in test_ids if truth.get(i, {}).get("side") == "left"]
    lime = ""
    if left:
        case, lobe = left[0], truth[left[0]]["lobes"][0]
        phrase = f"left {lobe}"
        _run(explain, ["--run-dir", str(r3), "--case", case, "--phrase", phrase, "--samples", "64",
                       "--supervoxels", "32", *local])
        pngs = sorted((r3 / "explain").glob(f"{case}_*.png"))
        if pngs:
            lime = (f"3D LIME of the phrase \"{phrase}\" for test case {case} (its tumour: {phrase}):\n\n"
                    f"![3D LIME]({os.path.relpath(pngs[0], out_dir)})")
    probe_result = json.loads((r1 / "probe.json").read_text())
    results = (r3 / "results.md").read_text().split("\n", 1)[1] if (r3 / "results.md").is_file() else ""
    table = (r3 / "baselines.md").read_text().split("\n", 1)[1] if (r3 / "baselines.md").is_file() else ""
    return "\n".join([
        "## 3D brain MRI reports: inflated SigLIP, Perceiver, Gemma 3 (tiny twins)", "",
        f"Brain phantom ({DEMO_CASES} tumour cases + controls, volumes {'x'.join(DEMO_SIZE)}), the twins' config "
        "files (`configs/brain3d_report/twin.<stage>.yaml`) cut to contrastive (3 epochs of cases and their mirror "
        "images) -> warm-up (3) -> LoRA (2), "
        f"with `siglip-tiny` and `{TWIN}` (language-pre-trained when the preset is built), stages 2 and 3 on each "
        "training case as written and mirrored left-right; greedy reports of the test cases. A shortened run; "
        "the default-size run is in the README.", "",
        f"Side probe on the stage-1 pooled tokens (test cases): accuracy {probe_result['side_acc']:.3f}, with "
        f"shuffled sides {probe_result['side_acc_shuffled']:.3f} (n = {probe_result['n_eval']}).", "",
        results.strip(), "",
        "Baselines (same test cases):", "",
        table.strip(), "",
        lime, "",
    ])
