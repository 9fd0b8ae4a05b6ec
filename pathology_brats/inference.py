"""The one prediction path of a BraTS-Path run: ``evaluate`` and ``submit`` both call ``tile_probabilities``.

    python -c "from pathology_brats.inference import tile_probabilities; help(tile_probabilities)"

A tile gets the same probabilities whichever command asks, because both rebuild the run's inputs the same way: the
tile encoder from the run's recorded settings (a random offline twin is seeded, so its weights are the run's), its
cached features keyed by file content and by the encoder's weights, the caption token states of the run's text
encoder, and the run's classifier in eval mode.

Test-time augmentation (``tta=8``) averages the class probabilities over the 8 dihedral views of each tile (4
rotations, each with and without a flip): H&E patches have no orientation, so every view is an equally valid
picture of the tissue. Frozen features of each view are cached on their own; a trained encoder sees the rotated
crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.errors import ConfigError
from pathology_brats.extract import dihedral
from pathology_brats.shared import TTA_CHOICES, TileDataset, forward, image_inputs, text_inputs


@torch.no_grad()
def predict(model, dataset: TileDataset, batch_size: int = 128) -> np.ndarray:
    """(N, C) class probabilities."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        rows.append(torch.softmax(forward(model, batch).float(), -1).cpu())
    return torch.cat(rows).numpy()




def run_inputs(meta: dict, paths: list[Path], texts: list[str] | None, device, cache_root: Path,
               hub_cache: Path | None, skip_bad: bool = False, view: int = 0) -> tuple[dict, np.ndarray]:
    """The run's input streams for ``paths`` (features from the cache; dihedral view ``view`` of each tile) and the
    indices of ``paths`` kept (a tile that does not decode is left out with ``skip_bad``, else an error). ``texts``
    holds one caption per path."""
    settings = meta["data"]
    kept = np.arange(len(paths))
    streams: dict = {}
    if settings["modality"] != "text":
        streams["image"], kept = image_inputs(paths, settings, device, cache_root, skip_bad, dihedral=view)
        if streams["image"].dtype == torch.uint8 and view:  # crops for a trained encoder: rotate them here
            streams["image"] = dihedral(streams["image"], view)
    if settings["modality"] != "image" and len(kept):
        streams["text"], streams["text_mask"] = text_inputs([texts[i] for i in kept], settings, cache_root,
                                                            hub_cache, device)
    return streams, kept


def tile_probabilities(run, paths: list[Path], texts: list[str] | None, device, cache_root: Path,
                       hub_cache: Path | None, skip_bad: bool = False, tta: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """((K, C) class probabilities, indices of the K kept ``paths``) from a loaded run (``common.runs.load_run``),
    averaged over ``tta`` dihedral views (1: the tile as it is; 8: the whole group)."""
    if tta not in TTA_CHOICES:
        raise ConfigError("--tta", f"choose {' or '.join(map(str, TTA_CHOICES))}, not {tta}")
    views = range(tta) if run.meta["data"]["modality"] != "text" else range(1)  # captions do not rotate
    total, kept = None, None
    for view in views:
        streams, kept = run_inputs(run.meta, paths, texts, device, cache_root, hub_cache, skip_bad, view)
        if len(kept) == 0:
            return np.zeros((0, len(run.meta["labels"])), dtype=np.float32), kept
        dataset = TileDataset(np.zeros(len(kept)), streams.get("image"), streams.get("text"),
                              streams.get("text_mask"))
        probs = predict(run.model, dataset)
        total = probs if total is None else total + probs
    return total / len(views), kept


__all__ = ["TTA_CHOICES", "predict", "run_inputs", "tile_probabilities"]
