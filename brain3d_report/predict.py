"""A report for your own brain MRI: a FLAIR NIfTI, or a folder of DICOM slices read as one volume.

Example:
    python -m brain3d_report.predict --run-dir runs/brain/lora --input flair.nii.gz --out preds/
    python -m brain3d_report.predict --run-dir runs/brain/lora --input dicom_series_folder/ --out preds/
    python -m brain3d_report.predict --run-dir runs/brain/lora --input folder_of_volumes/ --out preds/

A DICOM series (slices sorted by position, affine from the headers: ``common.reader``) is written as a NIfTI under
``OUT/volumes/`` first, so both forms take exactly the run's preprocessing (``brain3d_report.data.load_volume``:
RAS orientation, brain percentile scaling, resize to ``preprocessing.volume_size``) and the same decoding as
``generate`` (greedy with the seed's penalties, or ``--sample`` for the seed's sampling under ``--seed``). Writes
``OUT/predictions.csv`` + ``.json`` (``file, report, side``) and per volume ``OUT/figures/<name>/slices.png``: the
three orthogonal mid-slices of the preprocessed volume the model saw.

``--explain PHRASE`` adds the seed's explanation of a phrase for that volume: ``brain3d_report.explain``'s 3D LIME
(SLIC supervoxels, ``--explain-samples`` on/off masks, the phrase's log-likelihood after [visual tokens; prompt],
a kernel-weighted ridge fit), the same code as ``python -m brain3d_report.explain`` for a case of the run's data.
Per volume it writes ``OUT/figures/<name>/lime.png`` (the heat map over axial, coronal and sagittal slices through
its maximum) and ``lime.nii.gz`` (the heat map on the preprocessed grid, its affine mapping each voxel to the world
coordinates of the input, so it overlays on the input in any viewer), and the columns ``explain_phrase,
explain_log_likelihood, explain_r2, explain_left_fraction`` (share of the positive weight in the patient's left
hemisphere). Each sample is one LM forward: ``--explain-samples 200`` costs about 200 report-length forwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from brain3d_report import explain as lime
from brain3d_report.data import load_volume, report_side
from brain3d_report.generate import (
    CAPTION_STAGES,
    MAX_NEW_TOKENS,
    NO_REPEAT_NGRAM_SIZE,
    decoding_kwargs,
    generate_reports,
)
from brain3d_report.shared import add_max_new_tokens_arg, add_supervoxels_arg
from brain3d_report.train import PIPELINE, model_builder
from common.cli import parse_args, positive_int
from common.device import pick_device
from common.errors import ConfigError, cli_entry
from common.predict import predict_parser, run_predictions
from common.reader import VOLUME, volume_as_nifti
from common.run_guard import guard_command
from common.rundir import atomic_save_figure, atomic_write_bytes
from common.runs import load_run

EXPLAIN_SAMPLES = 200


def get_args_parser():
    parser = predict_parser(__doc__)
    parser.add_argument("--sample", action="store_true", help="the seed's sampling instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    add_max_new_tokens_arg(parser, default=MAX_NEW_TOKENS)
    group = parser.add_argument_group("explanation (brain3d_report.explain's LIME)")
    group.add_argument("--explain", default=None, metavar="PHRASE",
                       help='LIME map of this phrase\'s log-likelihood, e.g. "left frontal"')
    group.add_argument("--explain-samples", type=positive_int, default=EXPLAIN_SAMPLES, help="perturbed volumes")
    add_supervoxels_arg(group)
    return parser


def orthogonal_slices(volume: np.ndarray, path: Path, title: str, index: Sequence[int] | None = None) -> Path:
    """Axial, coronal and sagittal slices of a (D, H, W) volume (mid-slices unless ``index`` is given)."""
    depth, height, width = volume.shape
    d, h, w = index if index is not None else (depth // 2, height // 2, width // 2)
    fig = Figure(figsize=(9, 3.3))
    for i, (plane, name) in enumerate(((volume[d], "axial"), (volume[:, h], "coronal"), (volume[:, :, w], "sagittal"))):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(plane, cmap="gray", origin="lower")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


class ReportPredictor:
    kind = VOLUME

    def __init__(self, run_dir: Path, out: Path, device: str = "auto", cache_dir: Path | None = None,
                 sample: bool = False, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS,
                 explain: str | None = None, explain_samples: int = EXPLAIN_SAMPLES, supervoxels: int = 64):
        if explain is not None and not explain.strip():
            raise ConfigError("--explain", "the phrase is empty")
        torch_device = pick_device(device)
        self.run = load_run(Path(run_dir), PIPELINE, model_builder(torch_device, cache_dir), CAPTION_STAGES,
                            torch_device)
        self.volume_size = tuple(self.run.meta["preprocessing"]["volume_size"])
        self.decoding = decoding_kwargs(not sample, max_new_tokens,
                                        no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE)
        self.seed, self.scratch = seed, Path(out) / "volumes"
        self.explain, self.explain_samples, self.supervoxels = explain, explain_samples, supervoxels
        if explain is not None:
            self._phrase_ids(explain, "--explain")  # a phrase that tokenizes to nothing fails before any work

    def _phrase_ids(self, phrase: str, flag: str):
        try:
            return lime.phrase_ids(self.run.model.tokenizer, phrase)
        except ConfigError as err:
            raise ConfigError(flag, err.message) from err

    def __call__(self, path: Path, figures: Path, text: str | None = None) -> dict[str, Any]:
        """``text`` (the app's phrase box), when given, is the phrase to explain instead of ``--explain``."""
        nifti = volume_as_nifti(path, self.scratch)
        volume = load_volume(nifti, self.volume_size)
        report = generate_reports(self.run.model, volume[None], self.decoding, self.seed)[0]
        slices = orthogonal_slices(volume[0].numpy(), figures / "slices.png", path.name)
        row = {"report": report, "side": report_side(report) or "", "volume": str(nifti), "slices": str(slices)}
        phrase = text if text is not None and text.strip() else self.explain
        if phrase is not None:
            row.update(self.explain_phrase(volume, nifti, phrase.strip(), figures, path.name))
        return row

    def explain_phrase(self, volume, nifti: Path, phrase: str, figures: Path, name: str) -> dict[str, Any]:
        """``brain3d_report.explain``'s LIME of ``phrase`` for one preprocessed (1, D, H, W) volume."""
        ids = self._phrase_ids(phrase, "phrase")
        model = self.run.model
        found = lime.explain_volume(volume, lambda batch: lime.phrase_log_likelihood(model, batch, ids),
                                    n_samples=self.explain_samples, n_segments=self.supervoxels, seed=self.seed)
        affine = lime.preprocessed_affine(nifti, self.volume_size)
        left = found.hemisphere_mass()["left_fraction"]
        heat = atomic_write_bytes(figures / "lime.nii.gz", lime.heat_nifti_bytes(found.heat, affine))
        shown = lime.figure(volume[0].numpy(), found.heat,
                            f"{name}: {phrase[:60]!r} ({self.explain_samples} samples, {len(found.weights)} "
                            f"supervoxels)", figures / "lime.png", spacing=np.linalg.norm(affine[:3, :3], axis=0))
        return {"explain_phrase": phrase, "explain_log_likelihood": round(float(found.targets[0]), 6),
                "explain_r2": round(found.score, 6),
                "explain_left_fraction": None if math.isnan(left) else round(left, 6),
                "lime": str(shown), "overlay": str(heat)}


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("out",), reads=("input", "cache_dir"), runs=("run_dir",), lock="out", create=True)
    options = {"sample": args.sample, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
               "explain": args.explain, "explain_samples": args.explain_samples, "supervoxels": args.supervoxels}
    return run_predictions(args.run_dir, args.input, args.out, VOLUME,
                           lambda: ReportPredictor(args.run_dir, args.out, args.device, args.cache_dir, **options),
                           options=options)


if __name__ == "__main__":
    raise SystemExit(main())
