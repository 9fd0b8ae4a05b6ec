"""Evaluate a phase-2 run on its test patients, and test whether the report steers the mask.

Example:
    python -m cxr_localize.evaluate --run-dir runs/cxr_localize/train

Writes into the run directory: ``predictions/<split>.csv`` (one row per image), ``results.json``/``.md``/``.csv``
(Dice, IoU, pixel accuracy with 95% bootstrap intervals) and ``figures/``. Two text tests run on the same images:

* shuffled: each image gets another image's report (a seeded derangement). A model that reads the report
  follows the wrong text and loses Dice; one that ignores it keeps its Dice.
* left/right swapped: every left and right in the report is exchanged. ``mass_named_side`` is the share of the
  predicted lesion pixels (inside the lungs) that fall in the lung the original report names;
  ``mass_named_side_lr_swapped`` is the same share after the swap, so a model that follows the words moves most
  of its mass to the other lung (the share falls below 0.5). Lungs come from ``lungs/`` masks when the data has
  them, else from image halves (the patient's left is the image's right). Images whose report names no single
  side are left out of this test.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.images import imagenet_normalize
from common.metrics.segmentation import per_image_metrics
from common.plots import mask_overlay, overlay_panels
from common.run_guard import guard_command
from common.rundir import atomic_write_text, result_set
from common.runs import load_run
from common.splits import load_split_csv
from common.tables import metrics_with_ci, write_results
from cxr_localize.data import load_iu, named_side, swap_left_right
from cxr_localize.model import build_from_record, load_text_encoder
from cxr_localize.shared import add_data_root_arg, add_n_figures_arg, add_skip_bad_arg

CONDITIONS = ("report", "shuffled", "lr_swapped")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="phase-2 run directory")
    add_data_root_arg(parser, help="default: the run's data root")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="split scored (the test split is read once per finished run)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per inference batch")
    add_n_figures_arg(parser, default=6)
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the 95%% intervals")
    add_skip_bad_arg(parser)
    return parser


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation with no fixed point (Sattolo's algorithm: one cycle through all items)."""
    rng = np.random.default_rng(seed)
    order = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        order[i], order[j] = order[j], order[i]
    return order


def lung_halves(n: int, size: int) -> np.ndarray:
    """Lung labels from image halves: 1 (patient's right) on the image's left, 2 (patient's left) on its right."""
    labels = np.ones((n, size, size), np.uint8)
    labels[..., size // 2 :] = 2
    return labels


@torch.no_grad()
def predict(model, images: np.ndarray, text: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Probabilities (N, H, W) for uint8 images and (N, D) text embeddings."""
    out = []
    for start in range(0, len(images), batch_size):
        x = imagenet_normalize(images[start : start + batch_size]).to(device)
        t = text[start : start + batch_size].to(device)
        out.append(torch.sigmoid(model(x, t).float())[:, 0].cpu().numpy())
    return np.concatenate(out)


def lung_mass(pred: np.ndarray, lungs: np.ndarray, sides: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted lesion pixels in the named lung and in the other lung, per image (0 where no side is named)."""
    named, other = np.zeros(len(pred)), np.zeros(len(pred))
    for i, side in enumerate(sides):
        if side is None:
            continue
        label = 2 if side == "left" else 1
        named[i] = np.logical_and(pred[i], lungs[i] == label).sum()
        other[i] = np.logical_and(pred[i], lungs[i] == 3 - label).sum()
    return named, other


def _share(named: np.ndarray, other: np.ndarray) -> float:
    total = named.sum() + other.sum()
    return float(named.sum() / total) if total > 0 else float("nan")


def text_test_metrics(a: dict[str, np.ndarray]) -> dict[str, float]:
    """The evaluation's bootstrapped numbers from its named per-image arrays (see ``evaluate_run``)."""
    return {"dice": a["dice"].mean(), "iou": a["iou"].mean(), "pixel_acc": a["pixel_acc"].mean(),
            "dice_shuffled": a["dice_shuffled"].mean(), "dice_lr_swapped": a["dice_lr_swapped"].mean(),
            "mass_named_side": _share(a["mass_named"], a["mass_other"]),
            "mass_named_side_lr_swapped": _share(a["mass_named_lr_swapped"], a["mass_other_lr_swapped"])}


def evaluate_run(run_dir: Path, split: str = "test", data_root: Path | None = None, batch_size: int = 32,
                 n_figures: int = 6, n_boot: int = 1000, skip_bad: bool = False, device: str = "auto", seed: int = 0,
                 cache_dir: Path | None = None) -> dict:
    """Predict ``split`` of a phase-2 run with its reports, shuffled and left/right swapped; write one result set.

    Returns:
        The flat results dict also written to ``results.json``.
    """
    run_dir = Path(run_dir)
    torch_device = pick_device(device)
    loaded = load_run(run_dir, "cxr_localize", build_from_record, stage="train", device=torch_device)
    model, meta = loaded.model, loaded.meta
    data = meta["data"]
    root = data_root or data.get("root")
    if not isinstance(root, str | Path):
        raise ConfigError("--data-root", "not given, and the run's model.json names no data root")
    split_table = load_split_csv(run_dir / "split.csv")
    image_size = meta["preprocessing"]["image_size"]
    samples = load_iu(Path(root), image_size=image_size, text_source=meta["text_source"],
                      projection=data["projection"], with_masks=True, splits=(split,),
                      split_level=data["split_level"], seed=data["split_seed"], skip_bad=skip_bad,
                      limit=data.get("limit"), mask_threshold=data.get("mask_threshold"))
    listed = set(split_table.loc[split_table["split"] == split, "id"])
    if not set(samples.filenames) <= listed:
        first = sorted(set(samples.filenames) - listed)[0]
        raise DataError(run_dir / "split.csv", f"image {first} is not in the {split} split of this run; the data "
                                               "changed since training")
    encoder = load_text_encoder(meta["text_encoder"], cache_dir=cache_dir, device=torch_device)
    order = derangement(len(samples), seed) if len(samples) > 1 else np.arange(len(samples))
    texts = {"report": samples.texts, "shuffled": [samples.texts[j] for j in order],
             "lr_swapped": [swap_left_right(t) for t in samples.texts]}
    threshold = float(meta["thresholds"]["mask"])
    probs = {c: predict(model, samples.images, encoder.encode(texts[c]), batch_size, torch_device)
             for c in CONDITIONS}
    per = {c: per_image_metrics(probs[c], samples.masks, threshold) for c in CONDITIONS}
    from_masks = samples.lungs is not None
    lungs = samples.lungs if from_masks else lung_halves(len(samples), image_size)
    sides = [named_side(t) for t in samples.texts]
    named, other = lung_mass(probs["report"] >= threshold, lungs, sides)
    named_sw, other_sw = lung_mass(probs["lr_swapped"] >= threshold, lungs, sides)
    has_side = np.array([s is not None for s in sides])
    moved = has_side & (named + other > 0) & (named_sw + other_sw > 0)
    moved_share = float(np.mean(other_sw[moved] > named_sw[moved])) if moved.any() else float("nan")

    per_image = {"dice": per["report"]["dice"], "iou": per["report"]["iou"], "pixel_acc": per["report"]["pixel_acc"],
                 "dice_shuffled": per["shuffled"]["dice"], "dice_lr_swapped": per["lr_swapped"]["dice"],
                 "mass_named": named, "mass_other": other, "mass_named_lr_swapped": named_sw,
                 "mass_other_lr_swapped": other_sw}
    results = metrics_with_ci(text_test_metrics, per_image, n_boot=n_boot, seed=seed)
    results.update({"images_mass_moved": moved_share, "n_images": len(samples), "n_images_named_side":
                    int(has_side.sum()), "split": split, "text_encoder": meta["text_encoder"],
                    "fusion": meta["kwargs"].get("fusion"), "threshold": threshold,
                    "lung_reference": "lung masks" if from_masks else "image halves",
                    "skipped": int(sum(samples.skipped.values()))})

    frame = pd.DataFrame({"filename": samples.filenames, "uid": samples.uids, "text": samples.texts,
                          "named_side": [s or "" for s in sides], "shuffled_text": texts["shuffled"], **per_image})
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    with result_set(run_dir) as staging:
        atomic_write_text(staging / "predictions" / f"{split}.csv", buffer.getvalue())
        figures = draw_figures(staging, samples, probs, threshold, n_figures)
        write_results(staging, results, f"cxr_localize: report-conditioned localisation ({split} split)",
                      text_test_markdown(results, figures))
    return results


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("data_root", "cache_dir"), lock="run_dir")
    results = evaluate_run(args.run_dir, args.split, args.data_root, args.batch_size, args.n_figures, args.n_boot,
                           args.skip_bad, args.device, args.seed, args.cache_dir)
    print(f"dice {results['dice']:.4f}  shuffled {results['dice_shuffled']:.4f}  lr-swapped "
          f"{results['dice_lr_swapped']:.4f}  mass in named lung {results['mass_named_side']:.3f} -> "
          f"{results['mass_named_side_lr_swapped']:.3f} after swap; {Path(args.run_dir) / 'results.md'}")
    return 0


def draw_figures(run_dir: Path, samples, probs: dict[str, np.ndarray], threshold: float, n: int) -> list[Path]:
    k = min(n, len(samples))
    if k == 0:
        return []
    image = lambda i: samples.images[i] / 255.0  # noqa: E731
    pred = lambda c, i: mask_overlay(image(i), probs[c][i] >= threshold, color=(1, 0.2, 0.2))  # noqa: E731
    rows = [[image(i), mask_overlay(image(i), samples.masks[i], color=(0.2, 1, 0.2)), pred("report", i)]
            for i in range(k)]
    titles = [[samples.filenames[i], "truth", "prediction"] for i in range(k)]
    panels = overlay_panels(rows, titles, run_dir / "figures" / "test_panels.png")
    rows = [[pred("report", i), pred("shuffled", i), pred("lr_swapped", i)] for i in range(k)]
    titles = [[_short(samples.texts[i]), "shuffled report", "left/right swapped"] for i in range(k)]
    tests = overlay_panels(rows, titles, run_dir / "figures" / "text_tests.png")
    return [panels, tests]


def _short(text: str, width: int = 38) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def text_test_markdown(results: dict, figures: list[Path]) -> str:
    links = " ".join(f"[{p.stem}](figures/{p.name})" for p in figures)
    return "\n".join([
        "### Does the report steer the mask?", "",
        "| test | Dice | share of predicted mass in the named lung |", "|---|---|---|",
        f"| reports as written | {results['dice']:.4f} | {results['mass_named_side']:.3f} |",
        f"| reports shuffled across images | {results['dice_shuffled']:.4f} | |",
        f"| left/right swapped in each report | {results['dice_lr_swapped']:.4f} | "
        f"{results['mass_named_side_lr_swapped']:.3f} |", "",
        f"{results['n_images']} images ({results['n_images_named_side']} name one side); text encoder "
        f"`{results['text_encoder']}`, fusion `{results['fusion']}`; lungs from {results['lung_reference']}. "
        f"After the swap the majority of the predicted mass changed lung in {results['images_mass_moved']:.0%} of the "
        "images that had predicted mass in the lungs both times.", "",
        f"Figures: {links} (green: truth, red: prediction).",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
