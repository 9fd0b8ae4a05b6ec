"""Per-finding probabilities for your own chest X-rays, with the description sentence each finding matched best.

Example:
    python -m mavl_chexpert.predict --run-dir runs/mavl/fusion --input cxr.jpg --out preds/
    python -m mavl_chexpert.predict --run-dir runs/mavl/fusion --input folder/ --out preds/

The image goes through the run's recorded preprocessing (grey, padded to a centred square, resized to
``preprocessing.image_size`` with its interpolation, its mean/std; ``mavl_chexpert.data``), and the probabilities
are the ones ``evaluate`` computes (``evaluate.predict_proba``, with its temperature for contrastive runs). Labels
use the per-finding thresholds chosen on validation. For a fusion run, ``aspect_<finding>`` is the sentence of the
packaged descriptions (definition or aspect) whose projected text embedding is closest to the image's; it is left empty
when the run was trained on other descriptions than the packaged ones (their SHA-256 differs). Writes
``OUT/predictions.csv`` + ``.json`` (``file, prob_<finding>, label_<finding>[, aspect_<finding>]``) and per file
``OUT/figures/<name>/findings.png`` (probability bars with the thresholds).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from common.cli import parse_args
from common.device import pick_device
from common.errors import DataError, cli_entry
from common.images import square_resize
from common.predict import predict_parser, run_predictions
from common.reader import PICTURE, read_picture
from common.run_guard import guard_command
from common.rundir import atomic_save_figure
from common.runs import load_run
from mavl_chexpert.data import Preprocessing, label_key, resampling
from mavl_chexpert.evaluate import _build, predict_proba
from mavl_chexpert.model import AspectAttentionFusion
from mavl_chexpert.text import DEFAULT_DESCRIPTIONS, descriptions_hash, load_descriptions


def get_args_parser():
    return predict_parser(__doc__)


def findings_figure(labels: Sequence[str], probs: np.ndarray, thresholds: Sequence[float], path: Path) -> Path:
    fig = Figure(figsize=(6, 0.35 * len(labels) + 0.8))
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    ax.barh(y, probs, color=["tab:red" if p >= t else "tab:blue" for p, t in zip(probs, thresholds)])
    ax.scatter(thresholds, y, marker="|", s=200, color="black", label="threshold")
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return atomic_save_figure(fig, path)


class ChexpertPredictor:
    kind = PICTURE

    def __init__(self, run_dir: Path, device: str = "auto"):
        self.device = pick_device(device)
        run = load_run(Path(run_dir), "mavl_chexpert", _build, device=self.device)
        self.model, self.meta = run.model, run.meta
        self.labels = list(self.meta["labels"])
        self.keys = [label_key(n) for n in self.labels]
        self.preprocessing = Preprocessing.from_record(self.meta["preprocessing"])
        self.size = self.preprocessing.image_size
        self.thresholds = [float(self.meta["thresholds"].get(k, 0.5)) for k in self.keys]
        self.temperature = 0.2 if self.meta.get("loss") == "contrastive" else 1.0
        self.sentences = None
        if self.meta["stage"] == "fusion":
            sentences = load_descriptions(DEFAULT_DESCRIPTIONS, self.labels)
            if descriptions_hash(sentences) == self.meta.get("text", {}).get("descriptions_sha256"):
                self.sentences = [sentences[n] for n in self.labels]

    @torch.no_grad()
    def best_aspects(self, image: np.ndarray) -> list[str]:
        """Per finding, the description sentence whose projected embedding is closest to the image's (``mavl``
        fusion: closest to what that sentence's query attended to in the image)."""
        model = self.model
        batch = self.preprocessing.dataset(image[None])[0]["image"][None]
        if isinstance(model, AspectAttentionFusion):
            outputs, _, queries = model.attend(model.image_model.patch_tokens(batch.to(self.device)))
            cosine = F.cosine_similarity(outputs[0], queries, dim=-1)
        else:
            embedding = model.image_model.embed(batch.to(self.device))
            image_vec = F.normalize(model.image_projector(embedding), dim=-1)[0]
            text = F.normalize(model.text_projector(model.aspects), dim=-1)
            cosine = torch.einsum("d,cad->ca", image_vec, text)
        cosine = cosine.masked_fill(~model.aspect_mask, float("-inf"))
        best = cosine.argmax(-1).cpu().tolist()
        return [self.sentences[c][a] if a < len(self.sentences[c]) else "" for c, a in enumerate(best)]

    def __call__(self, path: Path, figures: Path, text: str | None = None) -> dict[str, Any]:
        grey = read_picture(path, "grey")
        if grey.min() == grey.max():
            raise DataError(path, f"image is blank (every pixel is {grey.min()})")
        image = np.array(square_resize(Image.fromarray(grey), self.size, resampling(self.preprocessing.interpolation)))
        probs = predict_proba(self.model, image[None], self.device, 1, self.temperature, self.preprocessing)[0]
        row: dict[str, Any] = {}
        for key, prob, threshold in zip(self.keys, probs, self.thresholds):
            row[f"prob_{key}"] = float(prob)
            row[f"label_{key}"] = int(prob >= threshold)
        if self.sentences is not None:
            for key, sentence in zip(self.keys, self.best_aspects(image)):
                row[f"aspect_{key}"] = sentence
        row["findings"] = str(findings_figure(self.labels, probs, self.thresholds, figures / "findings.png"))
        return row


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("out",), reads=("input", "cache_dir"), runs=("run_dir",), lock="out", create=True)
    return run_predictions(args.run_dir, args.input, args.out, PICTURE,
                           lambda: ChexpertPredictor(args.run_dir, args.device))


if __name__ == "__main__":
    raise SystemExit(main())
