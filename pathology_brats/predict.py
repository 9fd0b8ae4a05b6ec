"""Class and class probabilities for your own histology tiles (PNG/JPEG/TIFF/BMP or RGB DICOM), as evaluate gives.

Example:
    python -m pathology_brats.predict --run-dir runs/brats_path/fused --input tile.jpg --out preds/
    python -m pathology_brats.predict --run-dir runs/brats_path/fused --input tiles/ --out preds/ --tta 8 \\
        --captions captions.jsonl

Every tile goes through ``pathology_brats.inference.tile_probabilities``, the one prediction path ``evaluate`` and
``submit`` use: the run's tile encoder and preprocessing (features cached by file content), its caption encoder and
its classifier; ``--tta 8`` averages the 8 dihedral views. A DICOM tile is read by ``common.reader`` (RGB) and
written as ``OUT/figures/<name>/tile.png`` first, so it takes exactly the path an image file takes. A run that reads
captions (``text`` or ``fused``) takes them from ``--captions`` (JSONL ``image,caption``, matched by the longest
shared path tail, the file name at least); a tile without one gets an empty caption, and its row says so in
``note``. Writes ``OUT/predictions.csv`` + ``.json`` (``file, class, prob_<class>`` for every class of the run's
schema, ``caption`` when captions are read) and per file ``OUT/figures/<name>/classes.png`` (the tile beside its
probability bars).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from common.cli import parse_args
from common.device import pick_device
from common.errors import cli_entry
from common.feature_cache import file_digest
from common.predict import predict_parser, run_predictions
from common.reader import PICTURE, file_kind, read_picture
from common.rundir import atomic_save_figure
from common.runs import load_run
from pathology_brats.caption_files import match_captions, read_captions
from pathology_brats.encoder import read_rgb
from pathology_brats.inference import tile_probabilities
from pathology_brats.model import build_run_model
from pathology_brats.shared import add_captions_arg, add_feature_cache_arg, add_tta_arg, default_feature_cache

NO_CAPTION = "no caption for this file: an empty caption was used"


def get_args_parser():
    parser = predict_parser(__doc__)
    add_tta_arg(parser)
    add_captions_arg(parser, help="captions JSONL (image, caption) for runs that read captions; matched by path tail")
    add_feature_cache_arg(parser)
    return parser


def classes_figure(tile: Image.Image, labels: Sequence[str], probs: np.ndarray, title: str, path: Path) -> Path:
    """The tile beside a bar per class (the predicted class in red)."""
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(np.asarray(tile))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(1, 2, 2)
    y = np.arange(len(labels))
    best = int(np.argmax(probs))
    ax.barh(y, probs, color=["tab:red" if i == best else "tab:blue" for i in range(len(labels))])
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    fig.tight_layout()
    return atomic_save_figure(fig, path)


class TilePredictor:
    """The run (classifier, encoder settings, captions) loaded once; called per tile."""

    kind = PICTURE

    def __init__(self, run_dir: Path, device: str = "auto", cache_dir: Path | None = None,
                 feature_cache: Path | None = None, captions: Path | None = None, tta: int = 1):
        self.device = pick_device(device)
        self.run = load_run(Path(run_dir), "pathology_brats", build_run_model, device=self.device)
        self.labels = list(self.run.meta["labels"])
        self.reads_text = self.run.meta["data"]["modality"] != "image"
        self.cache_dir, self.tta = cache_dir, tta
        self.feature_cache = feature_cache or default_feature_cache(cache_dir)
        self.captions_path = Path(captions) if captions is not None else None
        self.captions = read_captions(self.captions_path) if self.captions_path is not None else None

    def caption_for(self, path: Path) -> str | None:
        """The caption ``--captions`` gives this tile (by the longest shared path tail), or None."""
        if self.captions is None:
            return None
        tile = f"{path.parent.name}/{path.name}"
        return match_captions(self.captions, [tile], self.captions_path).get(tile)

    def __call__(self, path: Path, figures: Path, text: str | None = None) -> dict[str, Any]:
        pixels = read_picture(path, "rgb")  # one line naming the file when it does not decode
        tile = path
        if file_kind(path) != "image":  # DICOM: the tile as read, so it takes an image file's path
            tile = figures / "tile.png"
            tile.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tile)
        caption = text if text is not None else self.caption_for(path)
        row: dict[str, Any] = {}
        if self.reads_text and caption is None:
            caption, row["note"] = "", NO_CAPTION
            print(f"{path}: {NO_CAPTION}", file=sys.stderr)
        texts = [caption] if self.reads_text else None
        probs, _ = tile_probabilities(self.run, [tile], texts, self.device, self.feature_cache, self.cache_dir,
                                      skip_bad=False, tta=self.tta)
        probs = probs[0]
        best = int(np.argmax(probs))
        row = {"class": self.labels[best], **{f"prob_{name}": float(p) for name, p in zip(self.labels, probs)},
               **({"caption": caption} if caption is not None else {}), **row, "tta": self.tta}
        title = f"{path.name}: {self.labels[best]} ({probs[best]:.2f})"
        row["classes"] = str(classes_figure(read_rgb(tile), self.labels, probs, title, figures / "classes.png"))
        return row


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    options = {"tta": args.tta, "captions": file_digest(args.captions) if args.captions is not None and
               args.captions.is_file() else None}
    return run_predictions(args.run_dir, args.input, args.out, PICTURE,
                           lambda: TilePredictor(args.run_dir, args.device, args.cache_dir, args.feature_cache,
                                                 args.captions, args.tta), options=options)


if __name__ == "__main__":
    raise SystemExit(main())
