"""Model pieces with values: the text changes the mask, whitening, the text cache, offline errors."""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from cxr_localize.model import ReportUNet, build_unet, load_text_encoder


@pytest.fixture(scope="module")
def tiny_clip():
    return load_text_encoder("tiny-clip")


def _model(fusion: str, text_dim: int) -> ReportUNet:
    torch.manual_seed(0)
    return ReportUNet(text_dim, encoder="resnet18", fusion=fusion, decoder_channels=(16, 16, 8, 8, 8)).eval()


@pytest.mark.parametrize("fusion", ["film", "concat", "concat-seed"])
def test_fusion_makes_the_mask_depend_on_the_text(fusion, tiny_clip):
    model = _model(fusion, tiny_clip.dim)
    texts = ["Nodule in the left upper lobe.", "Nodule in the right lower lobe."]
    model.set_text_statistics(tiny_clip.encode(texts))
    if fusion == "film":
        torch.nn.init.normal_(model.fusion.proj[-1].weight, std=0.5)
    image = torch.randn(1, 3, 64, 64).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(image, tiny_clip.encode(texts))
        same = model(image, tiny_clip.encode(texts[:1] * 2))
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert torch.allclose(same[0], same[1])


def test_film_starts_as_identity_of_the_image_path(tiny_clip):
    model = _model("film", tiny_clip.dim)
    texts = ["Left apical opacity.", "Right basal opacity."]
    model.set_text_statistics(tiny_clip.encode(texts))
    image = torch.randn(2, 3, 64, 64)
    features = model.unet.encoder(image)
    with torch.no_grad():
        fused = model.fusion(features[-1], torch.randn(2, tiny_clip.dim))
    assert torch.allclose(fused, features[-1], atol=1e-6)


def _notebook_forward(image, text_features, encoder, decoder, segmentation_head, fusion_conv):
    """The original notebook's ``XrayMaskGenerator.forward`` written out literally (text already embedded)."""
    enc_features = encoder(image)
    bottleneck = enc_features[-1]
    text_emb = text_features.unsqueeze(-1).unsqueeze(-1)
    text_emb = text_emb.expand(-1, -1, bottleneck.size(2), bottleneck.size(3))
    fused_features = torch.cat([bottleneck, text_emb], dim=1)
    fused_features = fusion_conv(fused_features)
    enc_features[-1] = fused_features
    decoder_output = decoder(enc_features)
    return segmentation_head(decoder_output)


def test_concat_seed_is_the_notebook_fusion_exactly():
    torch.manual_seed(0)
    text_dim = 512  # CLIP ViT-B/32's pooled width, as in the notebook; ResNet18/34 bottlenecks are 512 wide too
    model = ReportUNet(text_dim, encoder="resnet18", fusion="concat-seed", decoder_channels=(16, 16, 8, 8, 8)).eval()
    texts = torch.randn(6, text_dim) * 3 + 1
    model.set_text_statistics(texts, "none")
    fusion_conv = torch.nn.Conv2d(512 + 512, 512, kernel_size=1)
    assert {k: v.shape for k, v in fusion_conv.state_dict().items()} == \
        {k: v.shape for k, v in model.fusion.mix.state_dict().items()}
    fusion_conv.load_state_dict(model.fusion.mix.state_dict())
    image = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = model(image, texts[:3])
        notebook = _notebook_forward(image, texts[:3], model.unet.encoder, model.unet.decoder,
                                     model.unet.segmentation_head, fusion_conv)
        other_text = model(image, texts[3:])
    torch.testing.assert_close(ours, notebook, rtol=0, atol=0)
    assert not torch.allclose(ours, other_text)


def test_zca_whitening_lifts_a_weak_contrast():
    torch.manual_seed(0)
    n, dim = 40, 16
    strong = torch.randn(n, 1) * 5.0
    weak = torch.randint(0, 2, (n, 1)).float() * 0.5
    embeddings = torch.cat([strong, weak, torch.randn(n, dim - 2) * 0.01], dim=1) + 3.0
    model = ReportUNet(dim, encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8))
    model.set_text_statistics(embeddings, "none")
    assert torch.equal((embeddings - model.text_mean) @ model.text_transform, embeddings)
    for whitening, lifted in (("scale", False), ("zca", True)):
        model.set_text_statistics(embeddings, whitening)
        z = (embeddings - model.text_mean) @ model.text_transform
        assert z.mean(0).abs().max() < 1e-4
        assert z.pow(2).sum(1).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
        ratio = (z @ torch.eye(dim)[1]).std() / (z @ torch.eye(dim)[0]).std()
        assert (ratio > 0.3) == lifted


def test_each_distinct_text_is_encoded_once(tiny_clip, monkeypatch):
    calls = []
    forward = tiny_clip.model.forward
    counting = lambda **kw: calls.append(kw["input_ids"].shape[0]) or forward(**kw)  # noqa: E731
    monkeypatch.setattr(tiny_clip.model, "forward", counting)
    texts = ["Left base opacity.", "Right apex nodule.", "Left base opacity."] * 3
    table, index = tiny_clip.table(texts)
    again = tiny_clip.encode(texts)
    assert table.shape == (2, tiny_clip.dim) and index.tolist() == [0, 1, 0] * 3
    assert sum(calls) <= 2
    assert torch.equal(again[0], again[2])


def test_minilm_preset_is_offline_and_mean_pooled():
    encoder = load_text_encoder("minilm")
    vectors = encoder.encode(["Left base opacity.", "Right base opacity."])
    assert encoder.pooling == "mean" and vectors.shape == (2, 384)
    assert 0.9 < torch.nn.functional.cosine_similarity(vectors[:1], vectors[1:]).item() < 1.0


def test_offline_defaults_fail_with_one_line():
    with pytest.raises(ConfigError, match="unknown text encoder"):
        load_text_encoder("no-such-encoder")
    try:
        build_unet("resnet34", "imagenet", classes=1, decoder_channels=(16, 16, 8, 8, 8))
    except ConfigError as err:
        assert err.source == "--encoder-weights" and "--encoder-weights none" in err.message
        assert "--encoder-init" in err.message
    else:
        pytest.skip("ImageNet weights are in the local cache here")
    try:
        load_text_encoder("clip-vit-b32")
    except ConfigError as err:
        assert err.source == "--text-encoder" and "offline choices: minilm, tiny-bert, tiny-clip" in err.message
    else:
        pytest.skip("CLIP ViT-B/32 is in the local cache here")


def test_text_tests_helpers():
    import numpy as np

    from cxr_localize.evaluate import derangement, lung_halves, lung_mass

    order = derangement(7, seed=3)
    assert sorted(order.tolist()) == list(range(7)) and not (order == np.arange(7)).any()
    pred = np.zeros((2, 8, 8), bool)
    pred[:, 2:4, 5:7] = True  # the image's right half: the patient's left lung
    named, other = lung_mass(pred, lung_halves(2, 8), ["left", "right"])
    assert named.tolist() == [4, 0] and other.tolist() == [0, 4]
