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
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from brain3d_report.data import load_volume, report_side
from brain3d_report.generate import (
    MAX_NEW_TOKENS,
    decoding_kwargs,
    generate_reports,
    load_report_run,
    resolve_ngram_ban,
)
from common.checkpoint import atomic_save_figure
from common.cli import parse_args, positive_int
from common.device import pick_device
from common.errors import cli_entry
from common.predict import predict_parser, run_predictions
from common.reader import VOLUME, volume_as_nifti
from common.run_guard import guard_command


def get_args_parser():
    parser = predict_parser(__doc__)
    parser.add_argument("--sample", action="store_true", help="the seed's sampling instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS)
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
                 sample: bool = False, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS):
        self.run = load_report_run(Path(run_dir), pick_device(device), cache_dir)
        self.volume_size = tuple(self.run.meta["preprocessing"]["volume_size"])
        self.decoding = decoding_kwargs(not sample, max_new_tokens,
                                        no_repeat_ngram_size=resolve_ngram_ban("auto", self.run.meta))
        self.seed, self.scratch = seed, Path(out) / "volumes"

    def __call__(self, path: Path, figures: Path, text: str | None = None) -> dict[str, Any]:
        nifti = volume_as_nifti(path, self.scratch)
        volume = load_volume(nifti, self.volume_size)
        report = generate_reports(self.run.model, volume[None], self.decoding, self.seed)[0]
        slices = orthogonal_slices(volume[0].numpy(), figures / "slices.png", path.name)
        return {"report": report, "side": report_side(report) or "", "volume": str(nifti), "slices": str(slices)}


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("out",), reads=("input", "cache_dir"), runs=("run_dir",), lock="out", create=True)
    options = {"sample": args.sample, "seed": args.seed, "max_new_tokens": args.max_new_tokens}
    return run_predictions(args.run_dir, args.input, args.out, VOLUME,
                           lambda: ReportPredictor(args.run_dir, args.out, args.device, args.cache_dir, **options),
                           options=options)


if __name__ == "__main__":
    raise SystemExit(main())
