"""Descriptions: every observation described by aspect; embeddings cached by encoder and text hash."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import DataError
from mavl_chexpert import text
from mavl_chexpert.data import OBSERVATIONS
from mavl_chexpert.shared import masked_bce


def test_every_observation_has_a_definition_and_eight_aspects():
    data = json.loads(text.DEFAULT_DESCRIPTIONS.read_text())
    assert set(data) == set(OBSERVATIONS)
    aspects = {"opacity", "shape", "location", "border", "texture", "fluid", "patterns", "other"}
    for name, entry in data.items():
        assert entry["definition"] and set(entry["aspects"]) == aspects, name
    sentences = [s for e in data.values() for s in (e["definition"], *e["aspects"].values())]
    assert len(set(sentences)) == len(sentences) == 14 * 9  # no sentence reused across diseases


def test_cache_is_reused_only_for_the_same_encoder_and_text(tmp_path, monkeypatch):
    calls = []
    real = text.load_text_encoder

    def counting(name, **kwargs):
        calls.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(text, "load_text_encoder", counting)
    sentences = text.load_descriptions(text.DEFAULT_DESCRIPTIONS, ("Edema", "Atelectasis"))
    first, mask, reused = text.embed_descriptions(sentences, "tiny-bert", tmp_path)
    assert not reused and first.shape[:2] == (2, 9) and mask.all()
    again, _, reused = text.embed_descriptions(sentences, "tiny-bert", tmp_path)
    assert reused and torch.equal(again, first) and calls == ["tiny-bert"]
    changed = {**sentences, "Edema": [*sentences["Edema"][:-1], "A different last sentence."]}
    other, _, reused = text.embed_descriptions(changed, "tiny-bert", tmp_path)
    assert not reused and torch.equal(other[1], first[1]) and not torch.equal(other[0, -1], first[0, -1])
    _, _, reused = text.embed_descriptions(changed, "tiny-clip", tmp_path)
    assert not reused and calls == ["tiny-bert", "tiny-bert", "tiny-clip"]


def test_each_sentence_is_embedded_on_its_own():
    sentences = text.load_descriptions(text.DEFAULT_DESCRIPTIONS, ("Edema",))
    table, _, _ = text.embed_descriptions(sentences, "tiny-bert")
    encoder = text.load_text_encoder("tiny-bert")
    assert torch.allclose(table[0, 3], encoder.encode([sentences["Edema"][3]])[0], atol=1e-5)


def test_malformed_descriptions_are_one_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"Edema": {"definition": "x", "aspects": {"shape": ""}}}))
    with pytest.raises(DataError, match="'Edema': expected"):
        text.load_descriptions(path, ("Edema",))
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        text.load_descriptions(path, ("Edema",))


def test_masked_cells_and_untrained_classes_leave_the_loss_unchanged():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.2, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    loss = masked_bce(logits, targets, mask)
    flipped = targets.clone()
    flipped[0, 1] = 1.0  # the masked cell
    assert masked_bce(logits, flipped, mask) == loss
    by_hand = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], targets[mask])
    assert loss.item() == pytest.approx(by_hand.item())
    trained = torch.tensor([True, False, True])
    only = masked_bce(logits, targets, mask, trained)
    assert only.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, [0, 2]], targets[:, [0, 2]]).item())
