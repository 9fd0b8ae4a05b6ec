"""Segment what a report names on your own chest X-ray: mask at the input's size, overlay, mass per lung.

Example:
    python -m cxr_localize.predict --run-dir runs/cxr_localize/train --input cxr.png --report "Opacity in the left
        lower lobe." --out preds/
    python -m cxr_localize.predict --run-dir runs/cxr_localize/train --input folder/ --reports reports.csv --out preds/

The image goes through the run's recorded preprocessing (``preprocessing.image_size``): grey, padded to a centred
square on black and resized bilinearly, as in ``cxr_localize.data``; the report is embedded by the run's text
encoder. The probability map is mapped back (resized to the padded square, the padding cut off) so the mask PNG
has the input's size. Writes ``OUT/predictions.csv`` + ``.json`` (``file, report, named_side, mask_pixels,
mass_right_lung, mass_left_lung, threshold``) and per file ``OUT/figures/<name>/mask.png`` and ``overlay.png``.
Lungs are the image halves (the patient's right on the image's left, a frontal view as stored).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common import plots
from common.cli import parse_args
from common.device import pick_device
from common.errors import DataError, cli_entry
from common.images import imagenet_normalize, square_resize
from common.predict import predict_parser, reports_for, run_predictions
from common.reader import PICTURE, read_picture
from common.run_guard import guard_command
from common.rundir import atomic_write_bytes
from common.runs import load_run
from cxr_localize.data import named_side
from cxr_localize.model import build_from_record, load_text_encoder


def get_args_parser():
    return predict_parser(__doc__, text=True)


def unpad(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (S, S) map of the padded square back to the (height, width) of the image that was padded."""
    side = max(height, width)
    full = np.asarray(Image.fromarray(prob.astype(np.float32)).resize((side, side), Image.Resampling.BILINEAR))
    top, left = (side - height) // 2, (side - width) // 2
    return full[top : top + height, left : left + width]


def png_bytes(mask: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


class LocalizePredictor:
    kind = PICTURE

    def __init__(self, run_dir: Path, device: str = "auto", cache_dir: Path | None = None):
        self.device = pick_device(device)
        loaded = load_run(Path(run_dir), "cxr_localize", build_from_record, stage="train", device=self.device)
        self.model, self.meta = loaded.model, loaded.meta
        self.encoder = load_text_encoder(self.meta["text_encoder"], cache_dir=cache_dir, device=self.device)
        self.size = int(self.meta["preprocessing"]["image_size"])
        self.threshold = float(self.meta["thresholds"]["mask"])

    @torch.no_grad()
    def __call__(self, path: Path, figures: Path, text: str | None = None) -> dict[str, Any]:
        if text is None or not text.strip():
            raise DataError(path, "the report text is empty; this model segments what a report names")
        grey = read_picture(path, "grey")
        if grey.min() == grey.max():
            raise DataError(path, f"image is blank (every pixel is {grey.min()})")
        small = np.array(square_resize(Image.fromarray(grey), self.size, Image.Resampling.BILINEAR))
        x = imagenet_normalize(small[None]).to(self.device)
        prob = torch.sigmoid(self.model(x, self.encoder.encode([text]).to(self.device)).float())[0, 0].cpu().numpy()
        full = unpad(prob, *grey.shape)
        mask = full >= self.threshold
        atomic_write_bytes(figures / "mask.png", png_bytes(mask))
        shown = grey / 255.0
        plots.overlay_panels([[shown, plots.mask_overlay(shown, mask, color=(1, 0.2, 0.2))]],
                             [[path.name, "predicted mask"]], figures / "overlay.png")
        half = grey.shape[1] // 2
        right, left = float(mask[:, :half].sum()), float(mask[:, half:].sum())
        total = right + left
        return {"report": text, "named_side": named_side(text) or "", "mask_pixels": int(mask.sum()),
                "mass_right_lung": right / total if total else float("nan"),
                "mass_left_lung": left / total if total else float("nan"), "threshold": self.threshold,
                "mask": str(figures / "mask.png"), "overlay": str(figures / "overlay.png")}


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("out",), reads=("input", "cache_dir", "reports"), runs=("run_dir",), lock="out",
                  create=True)
    text_for = reports_for(args)
    return run_predictions(args.run_dir, args.input, args.out, PICTURE,
                           lambda: LocalizePredictor(args.run_dir, args.device, args.cache_dir),
                           options={"report": args.report, "reports": str(args.reports)}, text_for=text_for)


if __name__ == "__main__":
    raise SystemExit(main())
