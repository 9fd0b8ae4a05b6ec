"""3D LIME for the report model: which parts of a volume make a phrase likely.

Example:
    python -m brain3d_report.explain --run-dir runs/brain/r3 --case BraTS20_Training_003 --phrase "left frontal"
    python -m brain3d_report.explain --run-dir runs/brain/r3 --case BraTS20_Training_003 --report
    python -m brain3d_report.explain --run-dir runs/brain/r3 --input FLAIR.nii.gz --phrase "left frontal"

The volume is a case of the run's data (``--case``) or any FLAIR NIfTI (``--input``, preprocessed as the run's
training volumes: checked, reoriented to RAS, scaled, resized to its volume size), as the seed's script takes one.

LIME (Ribeiro et al. 2016) with supervoxels in place of superpixels:
1. the preprocessed volume (the model's input grid) is cut into about ``--supervoxels`` SLIC supervoxels
   (scikit-image ``slic`` on the grey volume, ``channel_axis=None``, within the brain: voxels above the volume's
   minimum, which is the background of skull-stripped scans);
2. ``--samples`` random on/off masks over the supervoxels (each on with probability 1/2; the first sample keeps all
   of them, as ``lime_image`` does); an "off" supervoxel is filled with the mean intensity of the brain, so it
   loses its contrast without becoming a hole darker than anything the model has seen;
3. the target of each perturbed volume is the log-likelihood of the phrase's tokens right after [visual tokens;
   prompt], by teacher forcing through the LM (one forward per volume, ``--batch-size`` at a time); ``--report``
   explains the model's own greedy report of the unperturbed volume instead of a phrase;
4. a ridge regression (scikit-learn ``Ridge``) of the targets on the masks, each sample weighted by LIME's kernel
   ``sqrt(exp(-d^2 / w^2))`` of its cosine distance ``d`` to the all-on mask (``--kernel-width`` w, 0.25 as
   ``lime_image``); its coefficients are the supervoxels' weights, painted into a heat map.

Outputs in ``RUN/explain/``: ``<ID>_<phrase>.nii.gz``, the heat map in the preprocessed grid, whose affine maps
each voxel to the scanner (world) coordinates of the same point of the case's original FLAIR (so it overlays on
that file in any viewer); ``<ID>_<phrase>.png``, three orthogonal slices through the heat map's maximum over the
volume; ``<ID>_<phrase>.json``, the supervoxel weights, the fit, and the positive mass in each hemisphere.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from brain3d_report.data import Case, check_nifti, load_volume, make_dataset
from brain3d_report.generate import (
    CAPTION_STAGES,
    NO_REPEAT_NGRAM_SIZE,
    decoding_kwargs,
    generate_reports,
    nifti_id,
    run_cases,
)
from brain3d_report.shared import add_run_data_args, add_supervoxels_arg, volume_cache_root
from brain3d_report.train import PIPELINE, model_builder, prompt_tokens
from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_float, positive_int, require
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.run_guard import guard_command
from common.rundir import atomic_save_figure, atomic_write_bytes, atomic_write_json, result_set
from common.runs import load_run
from common.tables import json_safe

log = logging.getLogger("medvl.brain3d_report")

EXPLAIN_DIR = "explain"
KERNEL_WIDTH = 0.25
"""``lime_image``'s default kernel width for binary supervoxel masks."""
REPORT_TOKENS = 64


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True, cache_dir=True)
    parser = MedvlArgumentParser(prog="python -m brain3d_report.explain", description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="a warmup or lora run (RUN/best/model.json)")
    volume = parser.add_argument_group("volume (one of)")
    volume.add_argument("--case", default=None, help="id of a case of the run's data")
    volume.add_argument("--input", type=Path, default=None,
                        help="a FLAIR NIfTI file (any scan; outputs named after the file)")
    target = parser.add_argument_group("target (one of)")
    target.add_argument("--phrase", default=None, help='text whose log-likelihood is explained, e.g. "left frontal"')
    target.add_argument("--report", action="store_true", help="explain the model's own greedy report of the case")
    lime = parser.add_argument_group("LIME")
    lime.add_argument("--samples", type=positive_int, default=200, help="perturbed volumes")
    add_supervoxels_arg(lime)
    lime.add_argument("--compactness", type=positive_float, default=0.1,
                      help="SLIC compactness (intensities are in [0, 1]; larger: more cube-like supervoxels)")
    lime.add_argument("--kernel-width", type=positive_float, default=KERNEL_WIDTH,
                      help="width of LIME's exponential kernel over the distance between a perturbation's "
                           "supervoxel mask and the whole volume's")
    lime.add_argument("--ridge-alpha", type=positive_float, default=1.0,
                      help="L2 weight of the ridge regression that fits the supervoxels' effects")
    lime.add_argument("--batch-size", type=positive_int, default=8, help="perturbed volumes per LM forward")
    add_run_data_args(parser)
    return parser


# --- LIME --------------------------------------------------------------------------------------------------------

@dataclass
class Explanation:
    """A LIME fit over supervoxels.

    Attributes:
        heat: (D, H, W) float32, each voxel its supervoxel's weight (0 outside the brain).
        labels: (D, H, W) int, the supervoxel of each voxel (-1 outside the brain).
        weights: (S,) ridge coefficients per supervoxel: the change of the target when it is on rather than off.
        intercept: the ridge intercept.
        score: R^2 of the weighted fit on the samples.
        masks: (N, S) the on/off masks (row 0 all on).
        targets: (N,) the target of each perturbed volume (targets[0]: the unperturbed volume).
    """

    heat: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    intercept: float
    score: float
    masks: np.ndarray
    targets: np.ndarray

    def hemisphere_mass(self) -> dict[str, float]:
        """Positive heat summed over each half of the H axis (the patient's left is H < H/2 in the RAS grid)."""
        positive = np.clip(self.heat, 0, None)
        half = self.heat.shape[1] // 2
        left, right = float(positive[:, :half].sum()), float(positive[:, half:].sum())
        total = left + right
        return {"left": left, "right": right, "left_fraction": left / total if total > 0 else math.nan}


def supervoxels(volume: np.ndarray, n_segments: int = 64, compactness: float = 0.1) -> np.ndarray:
    """SLIC supervoxels of a (D, H, W) volume inside the brain: labels 0..S-1, -1 for the background.

    Raises:
        ValueError: a volume without contrast (nothing above its minimum).
    """
    from skimage.segmentation import slic

    volume = np.asarray(volume, dtype=np.float64)
    brain = volume > volume.min()
    if not brain.any():
        raise ValueError("the volume is constant: no brain voxels to cut into supervoxels")
    labels = slic(volume, n_segments=n_segments, compactness=compactness, channel_axis=None, mask=brain,
                  start_label=1)
    _, dense = np.unique(labels, return_inverse=True)  # label 0 (outside the mask) sorts first
    dense = dense.reshape(labels.shape) - (1 if (labels == 0).any() else 0)
    return dense.astype(np.int64)


def sample_masks(n_samples: int, n_features: int, rng: np.random.Generator) -> np.ndarray:
    """(N, S) uniform on/off masks with the first row all on, as ``lime_image`` draws them."""
    masks = rng.integers(0, 2, size=(n_samples, n_features)).astype(np.float64)
    masks[0] = 1.0
    return masks


def perturb(volume: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, fill: float) -> torch.Tensor:
    """(B, 1, D, H, W) copies of a (1, D, H, W) volume with the supervoxels that ``masks`` (B, S) turns off filled."""
    on = masks.bool()[:, labels.clamp_min(0)] | (labels < 0)  # the background is never perturbed
    return torch.where(on[:, None], volume[None], torch.as_tensor(fill, dtype=volume.dtype))


def lime_fit(masks: np.ndarray, targets: np.ndarray, kernel_width: float = KERNEL_WIDTH,
             alpha: float = 1.0) -> tuple[np.ndarray, float, float]:
    """(weights, intercept, weighted R^2) of a ridge fit of ``targets`` on ``masks``, weighted by LIME's kernel."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import pairwise_distances

    distances = pairwise_distances(masks, masks[:1], metric="cosine").ravel()
    kernel = np.sqrt(np.exp(-(distances ** 2) / kernel_width ** 2))
    ridge = Ridge(alpha=alpha, fit_intercept=True).fit(masks, targets, sample_weight=kernel)
    return ridge.coef_.astype(np.float64), float(ridge.intercept_), float(ridge.score(masks, targets, kernel))


def explain_volume(volume: torch.Tensor, target: Callable[[torch.Tensor], torch.Tensor], *, n_samples: int = 200,
                   n_segments: int = 64, compactness: float = 0.1, batch_size: int = 8, seed: int = 0,
                   kernel_width: float = KERNEL_WIDTH, alpha: float = 1.0) -> Explanation:
    """LIME over SLIC supervoxels of a (1, D, H, W) volume for any ``target``: (B, 1, D, H, W) -> (B,) scores.

    ``target`` is a parameter so that the same code explains the report model (``phrase_log_likelihood``) and,
    in tests, a scorer whose answer is known.
    """
    array = volume[0].float().cpu().numpy()
    labels = supervoxels(array, n_segments, compactness)
    n_features = int(labels.max()) + 1
    masks = sample_masks(n_samples, n_features, np.random.default_rng(seed))
    fill = float(array[labels >= 0].mean())
    labels_t = torch.from_numpy(labels)
    targets = []
    for start in range(0, n_samples, batch_size):
        chunk = torch.from_numpy(masks[start : start + batch_size])
        targets.append(target(perturb(volume.float().cpu(), labels_t, chunk, fill)).detach().float().cpu())
    scores = torch.cat(targets).numpy().astype(np.float64)
    weights, intercept, fit = lime_fit(masks, scores, kernel_width, alpha)
    heat = np.where(labels >= 0, weights[labels.clip(0)], 0.0).astype(np.float32)
    return Explanation(heat, labels, weights, intercept, fit, masks, scores)


# --- the model's target ------------------------------------------------------------------------------------------

def phrase_ids(tokenizer, phrase: str) -> torch.Tensor:
    """(1, T) token ids of a phrase (no special tokens); a phrase that tokenizes to nothing is a ConfigError."""
    ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("--phrase", f"{phrase!r} tokenizes to no tokens")
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def phrase_log_likelihood(model, volumes: torch.Tensor, phrase: torch.Tensor) -> torch.Tensor:
    """(B,) log p(phrase | [visual tokens; prompt]) of (B, 1, D, H, W) volumes: the sum over the phrase's tokens.

    Teacher forcing: one forward of [visual; prompt; phrase] per volume; logits are kept for the phrase positions
    only (a real LM's vocabulary is 262k).
    """
    device = model.lm.get_input_embeddings().weight.device
    batch = len(volumes)
    prompt = prompt_tokens(model.tokenizer).to(device).expand(batch, -1)
    target = phrase.to(device).expand(batch, -1)
    embeds, mask = model.inputs_embeds(volumes.to(device), prompt)
    embeds = torch.cat([embeds, model.lm.get_input_embeddings()(target).to(embeds.dtype)], dim=1)
    mask = torch.cat([mask, torch.ones_like(target, dtype=mask.dtype)], dim=1)
    steps = target.shape[1]
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=steps + 1).logits[:, :-1]
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, target[..., None]).squeeze(-1).sum(dim=1).cpu()


# --- outputs -----------------------------------------------------------------------------------------------------

def preprocessed_affine(flair: Path, volume_size: Sequence[int]) -> np.ndarray:
    """The affine of the preprocessed (D, H, W) grid: voxel (d, h, w) -> world millimetres of the original scan.

    Preprocessing (``brain3d_report.data``) reorients to RAS (the closest canonical axes of the header's affine),
    transposes (x, y, z) to (z, x, y) and resizes with ``align_corners=False``, under which new index ``i`` sits at
    old index ``(i + 0.5) * old / new - 0.5``. Composing those maps with the RAS affine gives this one.
    """
    image = nib.load(str(flair))
    canonical = nib.as_closest_canonical(image)
    shape_xyz = np.asarray(canonical.shape[:3], dtype=float)
    depth, height, width = (int(s) for s in volume_size)
    scale = shape_xyz / np.array([height, width, depth], dtype=float)  # per RAS axis x, y, z
    grid = np.zeros((4, 4))
    # Columns: which preprocessed axis (d, h, w) moves along which RAS voxel axis (x <- h, y <- w, z <- d).
    grid[0, 1], grid[1, 2], grid[2, 0] = scale[0], scale[1], scale[2]
    grid[:3, 3] = 0.5 * scale - 0.5
    grid[3, 3] = 1.0
    return canonical.affine @ grid


def heat_nifti_bytes(heat: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped float32 NIfTI of the heat map with its affine as both qform and sform (scanner coordinates)."""
    image = nib.Nifti1Image(np.ascontiguousarray(heat, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def slug(text: str, limit: int = 60) -> str:
    """A file-name part from a phrase: lowercase words joined by hyphens."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words)[:limit].strip("-") or "phrase"


def figure(volume: np.ndarray, heat: np.ndarray, title: str, path: Path,
           spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    """Axial, coronal and sagittal slices through the heat map's maximum, the heat over the volume in grey.

    Orientation as radiology viewers show it: anterior or superior up, the patient's right on the image's left;
    ``spacing`` (mm per voxel along D, H, W) keeps the proportions. Positive weights (the phrase grows likelier
    with the region) are red, negative ones blue.
    """
    from matplotlib.figure import Figure

    d, h, w = np.unravel_index(int(np.argmax(heat)), heat.shape)
    bound = float(np.abs(heat).max()) or 1.0
    sd, sh, sw = (float(s) for s in spacing)
    views = [(f"axial d={d}", volume[d].T[::-1, ::-1], heat[d].T[::-1, ::-1], sw / sh),
             (f"coronal w={w}", volume[:, :, w][::-1, ::-1], heat[:, :, w][::-1, ::-1], sd / sh),
             (f"sagittal h={h}", volume[:, h, :][::-1], heat[:, h, :][::-1], sd / sw)]
    fig = Figure(figsize=(11, 4))
    for k, (name, image, overlay, aspect) in enumerate(views):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
        shown = ax.imshow(np.ma.masked_where(overlay == 0, overlay), cmap="bwr", vmin=-bound, vmax=bound,
                          alpha=0.55, interpolation="nearest", aspect=aspect)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.colorbar(shown, ax=fig.axes, shrink=0.8, label="LIME weight (log-likelihood)")
    fig.suptitle(title, fontsize=10)
    atomic_save_figure(fig, path)
    return path


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("data_root", "healthy_root", "volume_cache", "cache_dir",
                                                    "input"), lock="run_dir")
    require(args, run_dir="the trained run to explain")
    if (args.case is None) == (args.input is None):
        raise ConfigError("--case", "give either --case ID (a case of the run's data) or --input FILE (a NIfTI)")
    if (args.phrase is None) == (not args.report):
        raise ConfigError("--phrase", "give either --phrase TEXT or --report")
    if args.phrase is not None and not args.phrase.strip():
        raise ConfigError("--phrase", "is empty")
    if args.input is not None:
        check_nifti(args.input, voxels=True)  # a bad file is refused before the model loads
    device = pick_device(args.device)
    loaded = load_run(args.run_dir, PIPELINE, model_builder(device, args.cache_dir), CAPTION_STAGES, device)
    model, meta = loaded.model, loaded.meta
    phrase = args.phrase
    volume_size = meta["preprocessing"]["volume_size"]
    if args.input is not None:
        case = Case(nifti_id(args.input), Path(args.input), "", "unknown", False)
        volume = load_volume(args.input, volume_size)
    else:
        cases = run_cases(meta, args.run_dir, args.data_root, args.healthy_root)
        found = [c for c in cases if c.id == args.case]
        if not found:
            raise ConfigError("--case", f"{args.case!r} is not a case of the run's data ({cases.source}, "
                                        f"{len(cases)} cases, e.g. {', '.join(cases.ids[:3])})")
        case = found[0]
        volume = make_dataset([case], volume_size, volume_cache_root(args))[0]["image"]
    if args.report:
        decoding = decoding_kwargs(True, REPORT_TOKENS, no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE)
        phrase = generate_reports(model, volume[None], decoding)[0]
        if not phrase:
            raise DataError(loaded.directory, f"the model's report of {case.id} is empty; nothing to explain")
    ids = phrase_ids(model.tokenizer, phrase)
    affine = preprocessed_affine(case.flair, volume_size)

    explanation = explain_volume(volume, lambda batch: phrase_log_likelihood(model, batch, ids),
                                 n_samples=args.samples, n_segments=args.supervoxels, compactness=args.compactness,
                                 batch_size=args.batch_size, seed=args.seed, kernel_width=args.kernel_width,
                                 alpha=args.ridge_alpha)
    stem = f"{case.id}_{'report' if args.report else slug(phrase)}"
    mass = explanation.hemisphere_mass()
    from_run = args.input is None
    record = {"case": case.id, "side": case.side if from_run else None, "healthy": case.healthy if from_run else None,
              "phrase": phrase,
              "target": "log-likelihood of the phrase after [visual tokens; prompt]",
              "base_log_likelihood": float(explanation.targets[0]), "n_tokens": int(ids.shape[1]),
              "samples": args.samples, "supervoxels": int(len(explanation.weights)),
              "weights": explanation.weights.tolist(), "intercept": explanation.intercept,
              "r2_weighted": explanation.score, "hemisphere_mass": mass, "seed": args.seed,
              "volume_size": list(volume_size), "affine": affine.tolist(), "source": str(case.flair)}
    run_dir = Path(args.run_dir)
    with result_set(run_dir) as staging:
        atomic_write_bytes(staging / EXPLAIN_DIR / f"{stem}.nii.gz", heat_nifti_bytes(explanation.heat, affine))
        figure(volume[0].numpy(), explanation.heat, f"{case.id}: {phrase[:60]!r} ({args.samples} samples, "
                                                    f"{len(explanation.weights)} supervoxels)",
               staging / EXPLAIN_DIR / f"{stem}.png", spacing=np.linalg.norm(affine[:3, :3], axis=0))
        atomic_write_json(staging / EXPLAIN_DIR / f"{stem}.json", json_safe(record))
    print(f"{run_dir / EXPLAIN_DIR / stem}.{{nii.gz,png,json}}: base log-likelihood "
          f"{record['base_log_likelihood']:.3f} over {record['n_tokens']} tokens, weighted R^2 "
          f"{explanation.score:.3f}, positive mass left {mass['left']:.3f} / right {mass['right']:.3f}")
    return 0


__all__ = ["Explanation", "supervoxels", "sample_masks", "perturb", "lime_fit", "explain_volume", "phrase_ids",
           "phrase_log_likelihood", "preprocessed_affine", "heat_nifti_bytes", "slug", "figure", "KERNEL_WIDTH"]


if __name__ == "__main__":
    raise SystemExit(main())
