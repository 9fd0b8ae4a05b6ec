"""Phase 2's guards: a phase-1 encoder that saw this run's test patients is refused; --text-aware-flip flips the
image, the mask and the report's sides together."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

from common.cli import config_text, parse_args
from common.errors import DataError
from common.images import imagenet_normalize
from cxr_localize import pretrain, train
from cxr_localize.data import load_iu, named_side, swap_left_right
from cxr_localize.evaluate import lung_mass
from cxr_localize.model import load_text_encoder
from cxr_localize.shared import split_table


def _phase1_files(directory, data_root, *flags):
    """The two files a phase-1 run leaves that the check reads, written by the real pretrain parser and split code
    (no training: the check runs before any weights are read)."""
    args = parse_args(pretrain.get_args_parser(), ["--data-root", str(data_root), "--output-dir", str(directory),
                                                   "--encoder-weights", "none", *flags])
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(config_text(args))
    (directory / "split.csv").write_text(split_table(args, with_masks=False)[1])
    return directory


def _phase2_split(data_root, *flags):
    args = parse_args(train.get_args_parser(), ["--data-root", str(data_root), "--output-dir", "unused", *flags])
    return split_table(args, with_masks=True)[0]


def _test_uids(split):
    return set(split.loc[split["split"] == "test", "group"])


def test_a_phase1_run_on_the_same_split_is_accepted(small_iu, tmp_path):
    for level in ("patient", "image"):
        phase1 = _phase1_files(tmp_path / level, small_iu, "--split-level", level)
        split = _phase2_split(small_iu, "--split-level", level)
        assert train.check_pretrain_leakage(phase1, small_iu, split) is None


@pytest.mark.parametrize("level", ["patient", "image"])
def test_a_phase1_run_that_trained_on_test_patients_is_refused(level, small_iu, tmp_path):
    phase1 = _phase1_files(tmp_path / "p1", small_iu, "--split-level", level, "--split-seed", "5")
    split = _phase2_split(small_iu)
    phase1_split = pd.read_csv(phase1 / "split.csv", dtype=str)
    seen = set(phase1_split.loc[phase1_split["split"] != "test", "id"].str.split("_").str[0])
    leaked = sorted(seen & _test_uids(split))
    assert leaked  # a different seed puts some of this run's test patients in phase 1's train or val split
    with pytest.raises(DataError) as caught:
        train.check_pretrain_leakage(phase1, small_iu, split)
    assert str(caught.value.source) == str(phase1 / "split.csv")
    assert f"{len(leaked)} test patient(s)" in caught.value.message and "--split-seed" in caught.value.message


def test_a_leaking_phase1_run_stops_training_with_one_line(small_iu, tmp_path, capsys):
    phase1 = _phase1_files(tmp_path / "p1", small_iu, "--split-seed", "5")
    out = tmp_path / "run"
    code = train.main(["--data-root", str(small_iu), "--output-dir", str(out), "--encoder-init", str(phase1),
                       "--text-encoder", "tiny-clip", "--image-size", "32", "--encoder", "resnet18"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {phase1 / 'split.csv'}: ") and "used in pre-training" in err
    assert not out.exists()


def test_a_phase1_run_on_other_data_is_not_compared(small_iu, iu_copy, tmp_path):
    phase1 = _phase1_files(tmp_path / "p1", iu_copy, "--split-seed", "5")
    assert train.check_pretrain_leakage(phase1, small_iu, _phase2_split(small_iu)) is None


@pytest.fixture(scope="module")
def flip_setup(small_iu):
    samples = load_iu(small_iu, image_size=64, splits=("train", "val"))
    encoder = load_text_encoder("tiny-clip")
    args = argparse.Namespace(data_root=small_iu, text_aware_flip=True, augment=False)
    train_set, _, _ = train.build_datasets(args, samples, encoder)
    return samples.subset("train"), encoder, train_set


def _draw(train_set, i, monkeypatch, coin):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(coin))
    return train_set[i]


def test_text_aware_flip_flips_image_mask_and_sides_together(flip_setup, monkeypatch):
    train_part, encoder, train_set = flip_setup
    sided = [i for i, t in enumerate(train_part.texts) if named_side(t)]
    assert len(sided) >= 5 and train_part.lungs is not None
    for i in sided:
        kept, flipped = _draw(train_set, i, monkeypatch, 0.9), _draw(train_set, i, monkeypatch, 0.1)
        image, mask = imagenet_normalize(train_part.images[i]), torch.as_tensor(train_part.masks[i]).float()
        assert torch.equal(kept["image"], image) and torch.equal(kept["mask"][0], mask)
        assert torch.equal(flipped["image"], image.flip(-1)) and torch.equal(flipped["mask"][0], mask.flip(-1))
        swapped = swap_left_right(train_part.texts[i])
        assert named_side(swapped) != named_side(train_part.texts[i])
        assert torch.equal(kept["text"], encoder.encode([train_part.texts[i]])[0])
        assert torch.equal(flipped["text"], encoder.encode([swapped])[0])
        # Read as a radiograph (the patient's right on the image's left), the flipped picture's lungs are the
        # mirrored lung map with its labels exchanged; the flipped lesion lies in the lung the swapped report names.
        mirrored = train_part.lungs[i][:, ::-1]
        reading = np.where(mirrored > 0, 3 - mirrored, 0)
        flipped_mask = flipped["mask"][0].numpy()[None] > 0.5
        named, other = lung_mass(flipped_mask, reading[None], [named_side(swapped)])
        assert named[0] > 0 and named[0] >= 0.9 * (named[0] + other[0])
        named, other = lung_mass(flipped_mask, reading[None], [named_side(train_part.texts[i])])
        assert named[0] <= 0.1 * (named[0] + other[0])


def test_without_the_flag_nothing_is_flipped(flip_setup, monkeypatch, small_iu):
    train_part, encoder, _ = flip_setup
    samples = load_iu(small_iu, image_size=64, splits=("train", "val"))
    args = argparse.Namespace(data_root=small_iu, text_aware_flip=False, augment=False)
    plain, _, _ = train.build_datasets(args, samples, encoder)
    item = _draw(plain, 0, monkeypatch, 0.0)
    assert torch.equal(item["image"], imagenet_normalize(train_part.images[0]))
    assert torch.equal(item["text"], encoder.encode([train_part.texts[0]])[0])
