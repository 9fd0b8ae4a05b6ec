"""The one prediction path of a BraTS-Path run: ``evaluate`` and ``submit`` both call ``tile_probabilities``.

    python -c "from pathology_brats.inference import tile_probabilities; help(tile_probabilities)"

A tile gets the same probabilities whichever command asks, because both rebuild the run's inputs the same way: the
tile encoder from the run's recorded settings (a random offline twin is seeded, so its weights are the run's), its
cached features keyed by file content and by the encoder's weights, the caption token states of the run's text
encoder, and the run's classifier in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pathology_brats.inputs import TileDataset, forward, image_inputs, text_inputs


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
               hub_cache: Path | None, skip_bad: bool = False) -> tuple[dict, np.ndarray]:
    """The run's input streams for ``paths`` (features from the cache) and the indices of ``paths`` kept (a tile
    that does not decode is left out with ``skip_bad``, else an error). ``texts`` holds one caption per path."""
    settings = meta["data"]
    kept = np.arange(len(paths))
    streams: dict = {}
    if settings["modality"] != "text":
        streams["image"], kept = image_inputs(paths, settings, device, cache_root, skip_bad)
    if settings["modality"] != "image" and len(kept):
        streams["text"], streams["text_mask"] = text_inputs([texts[i] for i in kept], settings, cache_root,
                                                            hub_cache)
    return streams, kept


def tile_probabilities(run, paths: list[Path], texts: list[str] | None, device, cache_root: Path,
                       hub_cache: Path | None, skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """((K, C) class probabilities, indices of the K kept ``paths``) from a loaded run (``common.runs.load_run``)."""
    streams, kept = run_inputs(run.meta, paths, texts, device, cache_root, hub_cache, skip_bad)
    if len(kept) == 0:
        return np.zeros((0, len(run.meta["labels"])), dtype=np.float32), kept
    dataset = TileDataset(np.zeros(len(kept)), streams.get("image"), streams.get("text"), streams.get("text_mask"))
    return predict(run.model, dataset), kept


__all__ = ["predict", "run_inputs", "tile_probabilities"]
