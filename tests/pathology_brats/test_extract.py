"""Streamed extraction: dihedral views, lazy features equal to the old in-memory ones, streaming standardisation,
kill-safety, damaged shards, and a 2-process ``accelerate launch`` extraction equal to one process."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from common.device_data import SeededFetch
from common.errors import DataError
from common.feature_cache import FeatureCache
from pathology_brats import extract
from pathology_brats.caption_files import pad_tokens, text_cache
from pathology_brats.encoder import load_tile_encoder, preprocess, read_rgb
from pathology_brats.extract import DIHEDRAL, dihedral, encode_tiles, view_cache, view_features
from pathology_brats.inference import predict
from pathology_brats.model import TileCaptionClassifier
from pathology_brats.shared import TileDataset

CPU = torch.device("cpu")


def _paths(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*.jpg") if p.parent.name != "val")


@torch.no_grad()
def _in_memory(encoder, paths: list[Path], view: int = 0) -> torch.Tensor:
    """Today's path before this change: decode one by one, stack, encode in batches of 32 (fp32)."""
    images = [preprocess(read_rgb(p)) for p in paths]
    if view:
        images = [dihedral(x, view) for x in images]
    return torch.cat([encoder(torch.stack(images[s : s + 32])).float() for s in range(0, len(images), 32)])


def test_dihedral_views_compose_as_the_group_does():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)  # no symmetry at all
    assert torch.equal(dihedral(x, 0), x)
    assert torch.equal(dihedral(x, 1), torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(dihedral(x, 4), x.flip(-1))
    for k in range(4, 8):  # the reflections are their own inverses
        assert torch.equal(dihedral(dihedral(x, k), k), x)
    assert torch.equal(dihedral(dihedral(x, 1), 3), x) and torch.equal(dihedral(dihedral(x, 2), 2), x)
    views = {dihedral(x, k).numpy().tobytes() for k in range(DIHEDRAL)}
    assert len(views) == DIHEDRAL
    with pytest.raises(Exception, match="--tta"):
        dihedral(x, 8)


def test_lazy_features_equal_the_in_memory_path_and_views_are_cached_apart(histology_phantom, tmp_path):
    encoder = load_tile_encoder("gigapath-tiny", image_tokens=5)
    paths = _paths(histology_phantom)[:5]
    lazy, kept = view_features(encoder, paths, tmp_path, CPU, num_workers=1, batch_size=2)
    assert kept.tolist() == list(range(5)) and lazy.shape == (5, 5, 64)
    eager = _in_memory(encoder, paths)
    assert torch.allclose(lazy.tensor(), eager, atol=1e-5)
    assert torch.equal(lazy[3], lazy.tensor()[3]) and torch.equal(lazy[np.array([4, 1])].tensor(),
                                                                   lazy.tensor()[[4, 1]])
    turned, _ = view_features(encoder, paths, tmp_path, CPU, view=5, num_workers=0)
    assert torch.allclose(turned.tensor(), _in_memory(encoder, paths, 5), atol=1e-5)
    assert not torch.allclose(turned.tensor(), eager, atol=1e-3)
    assert view_cache(encoder, tmp_path, "imagenet", 5).directory.name.endswith("-d5")
    assert len(view_cache(encoder, tmp_path, "imagenet", 0)) == 5  # view 0 is the namespace caches had before


def _random_cache(tmp_path: Path, n: int, ragged: bool):
    torch.manual_seed(0)
    cache = FeatureCache(tmp_path, "ragged" if ragged else "fixed", {"dim": "6"})
    rows = [torch.randn(int(torch.randint(2, 9, ())) if ragged else 3, 6) * 4 + 7 for _ in range(n)]
    keys = [f"k{i}" for i in range(n)]
    for start in range(0, n, 7):  # several shards
        cache.add({k: (r.half() if ragged else r) for k, r in zip(keys[start : start + 7], rows[start : start + 7])})
    return cache.view(keys, ragged=ragged), [r.half().float() if ragged else r for r in rows]


def test_streamed_standardisation_and_predictions_equal_the_in_memory_ones(tmp_path):
    image, image_rows = _random_cache(tmp_path, 23, ragged=False)
    text, text_rows = _random_cache(tmp_path, 23, ragged=True)
    padded, mask = pad_tokens(text_rows)
    torch.manual_seed(1)
    eager = TileCaptionClassifier(6, 6, 4, direction="both", width=16, heads=2).eval()
    lazy = TileCaptionClassifier(6, 6, 4, direction="both", width=16, heads=2).eval()
    lazy.load_state_dict(eager.state_dict())
    index = np.array([0, 3, 4, 8, 9, 15, 16, 22])  # a training split, as train.py slices it
    eager.fit_standardization(torch.stack(image_rows)[index], padded[index], mask[index])
    lazy.fit_standardization(image[index], text[index])
    for name in ("image_mean", "image_std", "text_mean", "text_std"):
        assert torch.allclose(getattr(lazy, name), getattr(eager, name), rtol=1e-5, atol=1e-6), name
    labels = np.zeros(23)
    before = predict(eager, TileDataset(labels, torch.stack(image_rows), padded, mask), batch_size=5)
    after = predict(lazy, TileDataset(labels, image, text), batch_size=5)
    assert np.allclose(before, after, atol=1e-5)
    # A DataLoader worker's batch (common.device_data.SeededFetch) is padded to its own longest caption.
    batch = default_collate(SeededFetch(TileDataset(labels, image, text)).__getitems__([(7, 0), (7, 1), (7, 2)]))
    assert batch["text"].shape[1] == max(len(text_rows[i]) for i in (0, 1, 2))
    assert torch.equal(batch["text_mask"].sum(1), torch.tensor([len(text_rows[i]) for i in (0, 1, 2)]))


def test_a_killed_extraction_leaves_whole_shards_and_a_rerun_fills_the_rest(histology_phantom, tmp_path, monkeypatch):
    encoder = load_tile_encoder("gigapath-tiny", image_tokens=2)
    paths = _paths(histology_phantom)[:7]
    calls: list[int] = []
    original = encoder.forward

    def dies_on_the_third(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a kill looks like from inside
        return original(x)

    monkeypatch.setattr(encoder, "forward", dies_on_the_third)
    cache = view_cache(encoder, tmp_path / "killed", "imagenet")
    with pytest.raises(KeyboardInterrupt):
        encode_tiles(encoder, paths, cache, CPU, batch_size=2, num_workers=0, shard_tiles=2)
    shards = sorted(cache.directory.iterdir())
    assert len(shards) == 2 and all(p.name.startswith("shard-") for p in shards)  # no partial file
    assert len(view_cache(encoder, tmp_path / "killed", "imagenet")) == 4
    calls.clear()
    monkeypatch.setattr(encoder, "forward", lambda x: calls.append(len(x)) or original(x))
    again, _ = encode_tiles(encoder, paths, view_cache(encoder, tmp_path / "killed", "imagenet"), CPU,
                            batch_size=2, num_workers=0, shard_tiles=2)
    assert calls == [2, 1]  # only the 3 missing tiles
    whole, _ = encode_tiles(encoder, paths, view_cache(encoder, tmp_path / "whole", "imagenet"), CPU, num_workers=0)
    assert torch.allclose(again.tensor(), whole.tensor(), atol=1e-5)


def test_a_damaged_shard_is_one_error_naming_it(tmp_path):
    cache = FeatureCache(tmp_path, "enc", {"dim": "4"}, row_shape=(2, 4))
    shard = cache.add({"a": torch.zeros(2, 4)})
    wrong = FeatureCache(tmp_path, "enc", {"dim": "4"}).add({"c": torch.zeros(3, 4)})
    with pytest.raises(DataError, match="row of shape") as err:
        FeatureCache(tmp_path, "enc", {"dim": "4"}, row_shape=(2, 4))
    assert wrong.name in str(err.value)
    wrong.unlink()
    shard.write_bytes(shard.read_bytes()[:40])  # cut short, as a full disk would leave it
    with pytest.raises(DataError, match="unreadable cache shard") as err:
        FeatureCache(tmp_path, "enc", {"dim": "4"}, row_shape=(2, 4))
    assert shard.name in str(err.value)


ACCELERATE = Path(sys.executable).parent / "accelerate"


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
@pytest.mark.skipif(not ACCELERATE.is_file(), reason="no accelerate launcher beside python")
def test_two_process_extraction_equals_one_process(histology_phantom, tmp_path):
    from tests.common.test_ddp import _launch

    args = ["--data-root", str(histology_phantom), "--images", str(histology_phantom / "val"),
            "--encoder", "gigapath-tiny",
            "--text-encoder", "minilm", "--device", "cpu", "--num-workers", "0", "--batch-size", "4",
            "--shard-tiles", "4"]
    _launch(tmp_path, "pathology_brats.extract", [*args, "--feature-cache", str(tmp_path / "two")])
    assert extract.main([*args, "--feature-cache", str(tmp_path / "one")]) == 0

    encoder = load_tile_encoder("gigapath-tiny", image_tokens=5)
    for one, two in ((view_cache(encoder, tmp_path / "one", "config"), view_cache(encoder, tmp_path / "two",
                                                                                   "config")),
                     (text_cache("minilm", tmp_path / "one"), text_cache("minilm", tmp_path / "two"))):
        keys = sorted(one._where)
        assert len(keys) > 10 and sorted(two._where) == keys
        writers = {p.name.split("-")[1] for p in two.directory.glob("shard-*.safetensors")}
        assert writers == {"r0", "r1"}  # each process wrote its own shards
        for a, b in zip(one.get(keys), two.get(keys)):
            # float16 token states: another batch (other padding) may round one ulp (1e-3 relative) apart
            tolerance = {"atol": 1e-5} if a.dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
            assert a.shape == b.shape and torch.allclose(a.float(), b.float(), **tolerance)
