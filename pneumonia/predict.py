"""P(pneumonia) for your own chest X-rays (PNG/JPEG/TIFF/BMP/DICOM), with Grad-CAM and similar archive cases.

Example:
    python -m pneumonia.predict --run-dir runs/pneumonia/r18 --input my_cxr.dcm --out preds/
    python -m pneumonia.predict --run-dir runs/pneumonia/r18 --input folder_of_cxrs/ --out preds/

A full-size radiograph is reduced the way MedMNIST v2 made PneumoniaMNIST from the Kermany chest X-rays (Yang et
al. 2023, section 3): the grey image is centre-cropped to a square of its short side and resized to the run's
``preprocessing.image_size`` with PIL's bicubic filter; then it is normalised as in training (``pneumonia.data``).
An image already at that size is used as it is.

Writes ``OUT/predictions.csv`` + ``.json`` (``file, prob_pneumonia, label, threshold``, and when the run has a
retrieval index, ``neighbour_ids, neighbour_labels, neighbour_distances``) and per file ``OUT/figures/<name>/``:
``gradcam.png`` (image | overlay) and ``neighbours.png`` (the 5 most similar archive cases). The label uses the
decision threshold chosen on validation (``best/model.json``).

``--vlm PRESET`` (``medgemma-4b``, ``tiny-gemma3``, a ``save_pretrained`` folder or a hub id, as in
``pneumonia.report``) adds a radiology report per file: ``pneumonia.report``'s prompts and verdict parser through
``common.vlm`` (greedy, ``--max-new-tokens``), with columns ``report, parsed_verdict, vlm, prompt``. The VLM reads
your image at full resolution (grey, resized to its processor's input size), not the 28 px thumbnail, so only the
prompts that do not describe a thumbnail are offered: ``--prompt clinical-role`` (default) or ``zero-shot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import plots
from common.cli import parse_args
from common.device import pick_device
from common.errors import cli_entry
from common.predict import predict_parser, run_predictions
from common.reader import PICTURE, read_picture
from common.retrieval import EXACT_INDEXES, available_indexes
from common.run_guard import guard_command
from common.runs import load_run
from pneumonia.explain import gradcam_maps
from pneumonia.model import build_from_record, embed_images, predict_proba, preprocess
from pneumonia.shared import add_max_new_tokens_arg, add_prompt_arg, add_vlm_arg

N_NEIGHBOURS = 5


VLM_PROMPTS = ("clinical-role", "zero-shot")


def get_args_parser():
    parser = predict_parser(__doc__)
    group = parser.add_argument_group("report (pneumonia.report's VLM)")
    add_vlm_arg(group, default=None)
    add_prompt_arg(group, default=VLM_PROMPTS[0], choices=VLM_PROMPTS,
                   help="pneumonia.report's prompt for the VLM report")
    add_max_new_tokens_arg(group)
    group.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"],
                       help="load the VLM in 4-bit NF4 or 8-bit (bitsandbytes)")
    group.add_argument("--seed", type=int, default=0, help="seed of the tiny preset's random weights")
    return parser


def medmnist_reduce(grey: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 -> (size, size) uint8: centre crop to the short side, bicubic resize (MedMNIST v2's recipe)."""
    height, width = grey.shape
    if (height, width) == (size, size):
        return grey
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(grey[top : top + side, left : left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


class PneumoniaPredictor:
    """The run's model (and retrieval index, when built), loaded once; called per file."""

    kind = PICTURE

    def __init__(self, run_dir: Path, device: str = "auto", vlm: str | None = None, prompt: str = VLM_PROMPTS[0],
                 max_new_tokens: int = 200, quantization: str = "none", cache_dir: Path | None = None, seed: int = 0):
        self.run_dir = Path(run_dir)
        self.device = pick_device(device)
        loaded = load_run(self.run_dir, "pneumonia", build_from_record, stage="train", device=self.device)
        self.model, self.meta = loaded.model, loaded.meta
        self.size = int(self.meta["preprocessing"]["image_size"])
        self.threshold = float(self.meta["thresholds"]["decision"])
        self.retrieval = self._retrieval()
        self.vlm = None
        if vlm is not None:
            from common.vlm import load_vlm

            self.vlm = load_vlm(vlm, quantization, self.device, cache_dir=cache_dir, seed=seed)
            self.prompt, self.max_new_tokens, self.seed = prompt, max_new_tokens, seed

    def _retrieval(self):
        directory = self.run_dir / "retrieval"
        names = [n for n in (*EXACT_INDEXES, *available_indexes(directory)) if n in available_indexes(directory)]
        if not names:
            return None
        from pneumonia.retrieval import open_run

        ctx = open_run(self.run_dir, device=str(self.device))
        index, info = ctx.load_index(names[0])
        return ctx, index, info

    def __call__(self, path: Path, figures: Path, text: str | None = None) -> dict[str, Any]:
        full = read_picture(path, "grey")
        image = medmnist_reduce(full, self.size)
        prob = float(predict_proba(self.model, image[None], device=self.device)[0])
        predicted = int(prob >= self.threshold)
        heat = gradcam_maps(self.model, preprocess(image[None]).to(self.device), self.model.target_layer,
                            [predicted])[0]
        shown = image / 255.0
        plots.overlay_panels([[shown, plots.heatmap_overlay(shown, heat)]],
                             [[f"{path.name} ({self.size} px)", f"Grad-CAM p={prob:.2f}"]], figures / "gradcam.png")
        row: dict[str, Any] = {"prob_pneumonia": prob, "label": self.meta["labels"][predicted],
                               "threshold": self.threshold, "gradcam": str(figures / "gradcam.png")}
        if self.retrieval is not None:
            row.update(self._neighbours(image, figures))
        if self.vlm is not None:
            row.update(self._report(full, prob))
        return row

    def _report(self, grey: np.ndarray, prob: float) -> dict[str, Any]:
        from common.vlm import build_messages, generate_reports, processor_image_size
        from pneumonia.report import parse_verdict, prompt_text, to_rgb

        system, user = prompt_text(self.prompt, prob, self.threshold, self.size)
        picture = to_rgb(grey, processor_image_size(self.vlm.processor))
        reply = generate_reports(self.vlm, [build_messages(picture, system, user)], self.max_new_tokens, self.seed)[0]
        return {"report": reply, "parsed_verdict": parse_verdict(reply), "vlm": self.vlm.source, "prompt": self.prompt}

    def _neighbours(self, image: np.ndarray, figures: Path) -> dict[str, Any]:
        from common.retrieval import search

        ctx, index, info = self.retrieval
        distances, positions = search(index, info, embed_images(self.model, image[None], device=self.device),
                                      N_NEIGHBOURS)
        positions = [int(p) for p in positions[0] if p >= 0]
        ids = [int(info["ids"][p]) for p in positions]
        labels = [self.meta["labels"][int(info["labels"][p])] for p in positions]
        archive = ctx.data.images[info["archive_split"]]
        plots.image_gallery([image / 255.0, *[archive[i] / 255.0 for i in ids]],
                            ["query", *[f"#{i} {lab}\nd={d:.3f}" for i, lab, d in zip(ids, labels, distances[0])]],
                            figures / "neighbours.png", ncols=N_NEIGHBOURS + 1)
        return {"neighbour_ids": ids, "neighbour_labels": labels,
                "neighbour_distances": [round(float(d), 6) for d in distances[0][: len(ids)]],
                "neighbour_index": info["index"], "neighbours": str(figures / "neighbours.png")}


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("out",), reads=("input", "cache_dir"), runs=("run_dir",), lock="out", create=True)
    vlm = {"vlm": args.vlm, "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
           "quantization": args.quantization, "seed": args.seed} if args.vlm else {}
    return run_predictions(args.run_dir, args.input, args.out, PICTURE,
                           lambda: PneumoniaPredictor(args.run_dir, args.device, cache_dir=args.cache_dir, **vlm),
                           options=vlm)


if __name__ == "__main__":
    raise SystemExit(main())
