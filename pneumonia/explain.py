"""Grad-CAM of the trained classifier on its true positives, false positives and false negatives.

Example:
    python -m pneumonia.explain --run-dir runs/pneumonia/r18 --split test --n 8

Cases are split at the decision threshold stored with the model (chosen on validation). Each group shows its
most confident cases: the highest P(pneumonia) among true and false positives, the lowest among false negatives.
Grad-CAM (pytorch-grad-cam) is taken at the last residual stage for the class the model predicted, so a map
shows what drove the decision that was made. Writes RUN/figures/gradcam_{tp,fp,fn}.png (image row over
overlay row) and RUN/figures/gradcam_cases.csv (which ids, their scores and where each map peaks).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

from common import plots
from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.run_guard import guard_command
from common.rundir import atomic_write_text, result_set
from pneumonia.model import load_run_and_data, predict_proba, preprocess
from pneumonia.shared import add_run_args, add_split_arg

GROUPS = {"tp": "true positives", "fp": "false positives", "fn": "false negatives"}
CASES_FILE = "gradcam_cases.csv"


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(device=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    add_split_arg(parser, help="split whose images are explained")
    parser.add_argument("--n", type=positive_int, default=8, help="cases per group")
    return parser


def gradcam_maps(model: torch.nn.Module, inputs: torch.Tensor, target_layer: torch.nn.Module,
                 classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps (N, H, W), each scaled to [0, 1], for a model with one logit per image.

    ``classes[i]`` = 1 explains the logit (evidence for the positive class), 0 its negation.
    """
    targets = [BinaryClassifierOutputTarget(int(c)) for c in classes]
    with GradCAM(model=model, target_layers=[target_layer]) as cam:
        return cam(input_tensor=inputs, targets=targets)


def select_cases(labels: np.ndarray, scores: np.ndarray, threshold: float, n: int) -> dict[str, np.ndarray]:
    """Ids of the ``n`` most confident true positives, false positives and false negatives."""
    predicted = scores >= threshold
    groups = {"tp": (labels == 1) & predicted, "fp": (labels == 0) & predicted, "fn": (labels == 1) & ~predicted}
    out = {}
    for name, mask in groups.items():
        ids = np.flatnonzero(mask)
        order = np.argsort(scores[ids], kind="stable")
        out[name] = ids[order if name == "fn" else order[::-1]][:n]
    return out


def explain_run(run_dir: Path, split: str = "test", n: int = 8, data_root: Path | None = None,
                device: str = "auto") -> pd.DataFrame:
    """Write the Grad-CAM figures and the case list for one split of a trained run; return the case list."""
    run_dir = Path(run_dir)
    torch_device = pick_device(device)
    model, meta, data = load_run_and_data(run_dir, data_root, (split,), torch_device)
    images, labels = data.images[split], data.labels[split]
    if len(labels) == 0:
        raise DataError(data.path, f"the {split} split is empty")
    threshold = float(meta["thresholds"]["decision"])
    scores = predict_proba(model, images, device=torch_device)
    cases = select_cases(labels, scores, threshold, n)
    rows, panels = [], {}
    for group, ids in cases.items():
        if len(ids) == 0:
            print(f"no {GROUPS[group]} on {split} at threshold {threshold:.3f}")
            continue
        classes = (scores[ids] >= threshold).astype(int)
        maps = gradcam_maps(model, preprocess(images[ids]).to(torch_device), model.target_layer, classes)
        originals = [images[i] / 255.0 for i in ids]
        overlays = [plots.heatmap_overlay(image, heat) for image, heat in zip(originals, maps)]
        titles = [f"#{i} {meta['labels'][labels[i]]}\np={scores[i]:.2f}" for i in ids]
        panels[f"gradcam_{group}.png"] = ([originals, overlays], [titles, ["Grad-CAM"] * len(ids)])
        for i, cls, heat in zip(ids, classes, maps):
            peak_row, peak_col = np.unravel_index(int(np.argmax(heat)), heat.shape)
            rows.append({"group": group, "split": split, "id": int(i), "label": meta["labels"][labels[i]],
                         "prob_pneumonia": float(scores[i]), "threshold": threshold,
                         "explained_class": meta["labels"][cls], "cam_peak_row": int(peak_row),
                         "cam_peak_col": int(peak_col)})
    columns = ["group", "split", "id", "label", "prob_pneumonia", "threshold", "explained_class", "cam_peak_row",
               "cam_peak_col"]
    frame = pd.DataFrame(rows, columns=columns)
    with result_set(run_dir) as staging:  # the figures and their case table replace the old ones together
        for name, (images, titles) in panels.items():
            plots.overlay_panels(images, titles, staging / "figures" / name)
        atomic_write_text(staging / "figures" / CASES_FILE, frame.to_csv(index=False))
    return frame


def run_section(run_dir: Path, out_dir: Path) -> str:
    """Grad-CAM on the test split of a trained run, as the Markdown section of the demo report."""
    frame = explain_run(Path(run_dir), "test", n=6)
    lines = ["## Pneumonia: Grad-CAM", "",
             "Last residual stage, class the model predicted, at the validation-chosen threshold; the most "
             "confident cases of each group.", ""]
    for group, title in GROUPS.items():
        count = int((frame["group"] == group).sum())
        if count:
            link = os.path.relpath(Path(run_dir) / "figures" / f"gradcam_{group}.png", out_dir)
            lines += [f"**{title}** ({count})", "", f"![{title}]({link})", ""]
        else:
            lines += [f"**{title}**: none on the test split.", ""]
    return "\n".join(lines)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("data_root",), lock="run_dir")
    if args.n < 1:
        raise ConfigError("--n", "must be at least 1")
    frame = explain_run(args.run_dir, args.split, args.n, args.data_root, args.device)
    print(frame.to_string(index=False))
    print(f"figures in {args.run_dir / 'figures'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
