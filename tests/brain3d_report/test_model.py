"""brain3d_report.model: inflation, positions, compressors, projector, caption loss, stages, config, real sizes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from brain3d_report.model import (
    IGNORE_INDEX,
    InflatedSiglip3D,
    PerceiverResampler,
    PoolCompressor,
    Projector,
    build_model,
    inflate_patch_weight,
    interpolate_position_grid,
    load_vision_tower,
    model_from_config,
    seed_position_embedding,
    trainable_parameters,
)
from common.errors import ConfigError
from common.presets import count_parameters, get_preset

VOLUME = (4, 64, 64)  # siglip-tiny: patch 16 at 64 px, so (2, 4, 4) tubelets = 32 tokens, the native 4 x 4 grid


def tiny_tower(seed: int = 0):
    torch.manual_seed(seed)
    return load_vision_tower("siglip-tiny")


@pytest.fixture(scope="module")
def model():
    return build_model("siglip-tiny", "tiny-gemma3", seed=0)


def volumes(n: int = 2, size=VOLUME, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, *size, generator=torch.Generator().manual_seed(seed))


# --- inflation -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth_patch", [2, 3])
@pytest.mark.parametrize("inflation", ["centre", "mean"])
def test_constant_depth_volume_gives_the_2d_model_on_its_slice_as_the_2d_processor_prepares_it(inflation, depth_patch):
    import numpy as np
    from transformers import SiglipImageProcessor

    from brain3d_report.model import vision_pixel_norm

    tower = tiny_tower()
    encoder = InflatedSiglip3D(tower, depth_patch=depth_patch, inflation=inflation,
                               **dict(zip(("pixel_mean", "pixel_std"), vision_pixel_norm("siglip-tiny"))))
    grey = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))  # the pipeline's [0, 1] slices
    volume = grey.unsqueeze(2).repeat(1, 1, 2 * depth_patch, 1, 1)  # two tubelets deep, constant along depth
    # The slice as the 2D model's own processor prepares a grey image: three equal channels, SigLIP's mean and std
    # (already at the model's size and in [0, 1], so no resize and no 1/255 rescale).
    processor = SiglipImageProcessor(do_resize=False, do_rescale=False)
    images = [np.repeat(g[0].numpy()[..., None], 3, axis=-1) for g in grey]
    rgb = processor(images=images, return_tensors="pt")["pixel_values"]
    assert rgb.min() < -0.9 and rgb.max() > 0.9  # [-1, 1], not the [0, 1] the volumes arrive in
    with torch.no_grad():
        embedded = encoder.embed(volume).reshape(2, 2, 16, -1)
        reference = tower.embeddings(rgb)  # 2D patches + the pretrained positions at their native grid
    for d in range(2):
        # The depth embedding starts at zero, so each depth sees exactly the 2D model's input tokens.
        torch.testing.assert_close(embedded[:, d], reference, rtol=1e-5, atol=1e-5)


def test_the_input_range_comes_from_the_processor_and_the_seeds_unit_range_is_a_flag(tmp_path):
    from brain3d_report.model import vision_pixel_norm

    assert vision_pixel_norm("siglip-tiny") == (0.5, 0.5)  # SigLIP's processor, MedSigLIP's published config
    assert vision_pixel_norm("medsiglip-448") == (0.5, 0.5)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.2] * 3}))
    assert vision_pixel_norm(str(tmp_path)) == (0.4, 0.2)  # a local tower's own processor config
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6]}))
    with pytest.raises(ConfigError, match="--vision"):
        vision_pixel_norm(str(tmp_path))
    volume = volumes(1)
    unit = build_model("siglip-tiny", "tiny-gemma3", seed=0, input_range="unit")
    processor = build_model("siglip-tiny", "tiny-gemma3", seed=0, input_range="processor")
    with torch.no_grad():
        torch.testing.assert_close(processor.vision.embed(volume), unit.vision.embed(2 * volume - 1))
    assert processor.model_config["input_range"] == "processor"
    # A run whose model.json predates the setting was trained on [0, 1] and rebuilds so.
    old = {k: v for k, v in processor.model_config.items() if k != "input_range"}
    assert model_from_config(old).vision.pixel_std == 1.0
    with pytest.raises(ConfigError, match="--input-range"):
        build_model("siglip-tiny", "tiny-gemma3", input_range="minus-one")


def test_centre_and_mean_inflation_differ_on_a_volume_that_varies_along_depth():
    tower = tiny_tower()
    volume = volumes(1, (2, 64, 64))
    with torch.no_grad():
        centre = InflatedSiglip3D(tower, inflation="centre").patch_embed(volume)
        mean = InflatedSiglip3D(tower, inflation="mean").patch_embed(volume)
        # centre reads only slice 1 (floor(2 / 2)) of the tubelet
        only_second = tower.embeddings.patch_embedding(volume[:, :, 1].expand(-1, 3, -1, -1))
    assert (centre - mean).abs().max() > 1e-3
    torch.testing.assert_close(centre[:, :, 0], only_second, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth_patch,centre", [(1, 0), (2, 1), (3, 1), (4, 2)])
def test_centre_inflation_puts_the_summed_kernel_on_slice_floor_half(depth_patch, centre):
    weight = torch.randn(8, 3, 4, 4)
    inflated = inflate_patch_weight(weight, depth_patch, "centre")
    assert inflated.shape == (8, 1, depth_patch, 4, 4)
    torch.testing.assert_close(inflated[:, :, centre], weight.sum(1, keepdim=True))
    others = [d for d in range(depth_patch) if d != centre]
    assert all(inflated[:, :, d].abs().max() == 0 for d in others)
    mean = inflate_patch_weight(weight, depth_patch, "mean")
    torch.testing.assert_close(mean.sum(2), weight.sum(1, keepdim=True))
    torch.testing.assert_close(mean[:, :, 0], weight.sum(1, keepdim=True) / depth_patch)


# --- position embeddings -------------------------------------------------------------------------------------------

def test_pretrained_grid_interpolation_is_the_identity_at_the_native_grid_and_matches_siglip_elsewhere():
    tower = tiny_tower()
    table = tower.embeddings.position_embedding.weight.detach()  # 4 x 4 grid of width 64
    torch.testing.assert_close(interpolate_position_grid(table, (4, 4)), table, rtol=1e-6, atol=1e-6)
    for grid in [(8, 8), (4, 6), (3, 5)]:
        tokens = torch.zeros(1, grid[0] * grid[1], table.shape[1])
        expected = tower.embeddings.interpolate_pos_encoding(tokens, grid[0] * 16, grid[1] * 16)[0]
        torch.testing.assert_close(interpolate_position_grid(table, grid), expected.detach())


def test_seed_position_embedding_is_the_seeds_linspace():
    pos = seed_position_embedding(2, 2, 3, 4).reshape(2, 2, 3, 4)
    # every channel: depth in linspace(-1, 1, 2); channel 0 adds row in linspace(-1, 1, 2); channel 1 adds column in
    # linspace(-1, 1, 3)
    assert pos[1, 0, 2].tolist() == [0.0, 2.0, 1.0, 1.0]
    assert pos[0, 1, 1].tolist() == [0.0, -1.0, -1.0, -1.0]
    assert pos[0, 0, 0].tolist() == [-2.0, -2.0, -1.0, -1.0]
    assert seed_position_embedding(1, 1, 1, 1).tolist() == [[-2.0]]


def test_pos_emb_seed_and_pretrained_depth_differ_and_only_one_learns_positions():
    tower = tiny_tower()
    pretrained = InflatedSiglip3D(tower, pos_emb="pretrained+depth")
    seed = InflatedSiglip3D(tower, pos_emb="seed")
    volume = volumes(1)
    with torch.no_grad():
        assert (pretrained(volume) - seed(volume)).abs().max() > 1e-2
    assert {"position_embedding.weight", "depth_embedding"} <= {n for n, _ in pretrained.named_parameters()}
    assert not any("position" in n or "depth" in n for n, _ in seed.named_parameters())
    with torch.no_grad():
        pretrained.depth_embedding[1] += 1.0  # a learned depth offset reaches the tokens of depth 1 only
        moved = pretrained.embed(volume).reshape(1, 2, 16, -1) - seed.embed(volume).reshape(1, 2, 16, -1)
    seed_delta = seed_position_embedding(2, 4, 4, 64).reshape(2, 16, 64)
    spatial = interpolate_position_grid(tower.embeddings.position_embedding.weight.detach(), (4, 4))
    torch.testing.assert_close(moved[0, 0], spatial - seed_delta[0])
    torch.testing.assert_close(moved[0, 1], spatial + 1.0 - seed_delta[1])


# --- volume size ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,hint", [((63, 64, 64), "62 64 64 or 64 64 64"), ((64, 120, 128), "64 112 128"),
                                       ((64, 128, 100), "64 128 96 or 64 128 112"), ((1, 64, 64), "2 64 64")])
def test_volume_size_not_divisible_by_the_tubelet_is_one_config_error(size, hint):
    encoder = InflatedSiglip3D(tiny_tower(), depth_patch=2)
    with pytest.raises(ConfigError) as info:
        encoder.token_grid(size)
    assert info.value.source == "--volume-size" and "\n" not in str(info.value)
    assert " ".join(map(str, size)) in info.value.message and "(2, 16, 16)" in info.value.message
    assert hint in info.value.message
    with pytest.raises(ConfigError, match="--volume-size"):
        encoder(torch.zeros(1, 1, *size))


def test_volume_deeper_than_the_depth_embedding_is_a_config_error():
    encoder = InflatedSiglip3D(tiny_tower(), depth_patch=2, max_depth_patches=4)
    assert encoder.token_grid((8, 64, 64)) == (4, 4, 4)
    with pytest.raises(ConfigError, match="10 gives 5 depth patches") as info:
        encoder.token_grid((10, 64, 64))
    assert info.value.source == "--volume-size"


def test_default_volume_tokens_for_the_tiny_and_real_towers():
    tiny = InflatedSiglip3D(tiny_tower())
    assert tiny.token_grid((64, 128, 128)) == (32, 8, 8)
    with torch.device("meta"):
        real = InflatedSiglip3D(load_vision_tower("medsiglip-448", pretrained=False, device="meta"))
    assert real.token_grid((64, 126, 126)) == (32, 9, 9)
    with pytest.raises(ConfigError, match="64 126 126 or 64 140 140"):
        real.token_grid((64, 128, 128))  # patch 14 does not divide 128


# --- compressors and projector --------------------------------------------------------------------------------------

def test_perceiver_latents_depend_on_the_input_not_on_token_order_or_the_batch():
    torch.manual_seed(0)
    perceiver = PerceiverResampler(64, latents=32, layers=2, heads=2).eval()
    tokens = torch.randn(3, 50, 64)
    with torch.no_grad():
        out = perceiver(tokens)
        assert out.shape == (3, 32, 64)
        assert (out[0] - out[1]).abs().mean() > 0.1  # different inputs, different latents
        single = perceiver(tokens[1:2])
        shuffled = perceiver(tokens[:, torch.randperm(50)])
        shorter = perceiver(tokens[:, :25])
    torch.testing.assert_close(single[0], out[1], rtol=1e-4, atol=1e-5)  # no mixing across the batch
    torch.testing.assert_close(shuffled, out, rtol=1e-4, atol=1e-5)  # attention pools a set (positions are in tokens)
    assert (shorter - out).abs().mean() > 1e-2
    assert (out[0, 0] - out[0, 1]).abs().mean() > 0.1  # latents are not copies of one another


def test_pool_compressor_is_adaptive_average_pooling_over_the_token_sequence():
    tokens = torch.randn(2, 2048, 64)
    expected = F.adaptive_avg_pool1d(tokens.transpose(1, 2), 32).transpose(1, 2)
    torch.testing.assert_close(PoolCompressor(32)(tokens), expected)
    torch.testing.assert_close(PoolCompressor(32)(tokens)[:, 0], tokens[:, :64].mean(1))  # 2048 / 32 = 64 per latent
    uneven = torch.randn(1, 50, 8)
    torch.testing.assert_close(PoolCompressor(32)(uneven),
                               F.adaptive_avg_pool1d(uneven.transpose(1, 2), 32).transpose(1, 2))


def test_projector_scales_by_vis_scale_from_one():
    torch.manual_seed(0)
    projector = Projector(64, 96)
    x = torch.randn(2, 32, 64)
    assert projector.vis_scale.item() == 1.0 and projector(x).shape == (2, 32, 96)
    with torch.no_grad():
        base = projector(x)
        projector.vis_scale.fill_(2.5)
        torch.testing.assert_close(projector(x), 2.5 * base)
        torch.testing.assert_close(base, projector.net(x))
    assert all(layer.bias.abs().max() == 0 for layer in (projector.net[0], projector.net[2]))


# --- the whole model ------------------------------------------------------------------------------------------------

def prompt_and_report(model):
    tokenizer = model.tokenizer
    prompt = tokenizer(["Generate a radiology report for this brain MRI FLAIR scan. \n"] * 2,
                       return_tensors="pt").input_ids
    reports = ["The lesion is in the left frontal lobe with edema.", "No lesion."]
    tokenizer.padding_side = "right"
    encoded = tokenizer([r + tokenizer.eos_token for r in reports], add_special_tokens=False, padding=True,
                        return_tensors="pt")
    return prompt, encoded.input_ids, encoded.attention_mask


def test_encode_pooled_and_inputs_embeds_shapes(model):
    volume = volumes()
    prompt, _, _ = prompt_and_report(model)
    with torch.no_grad():
        latents = model.encode(volume)
        embeds, mask = model.inputs_embeds(volume, prompt)
        text = model.text_embedding(prompt)
    assert latents.shape == (2, 32, 64)
    torch.testing.assert_close(model.pooled(volume).detach(), latents.mean(1))
    assert embeds.shape == (2, 32 + prompt.shape[1], 64) and mask.shape == embeds.shape[:2] and bool(mask.all())
    with torch.no_grad():
        torch.testing.assert_close(embeds[:, 32:], model.lm.get_input_embeddings()(prompt))
        torch.testing.assert_close(embeds[:, :32], model.projector(latents))
    assert (latents[0] - latents[1]).abs().mean() > 1e-2  # the two volumes are told apart
    assert text.shape == (2, 64)


def test_caption_labels_ignore_visual_prompt_and_padding_positions(model):
    prompt, report, report_mask = prompt_and_report(model)
    labels = model.caption_labels(prompt, report, report_mask)
    start = 32 + prompt.shape[1]
    assert labels.shape == (2, start + report.shape[1])
    assert bool((labels[:, :start] == IGNORE_INDEX).all())
    assert labels[0, start:].tolist() == report[0].tolist()  # the longer report has no padding
    real = int(report_mask[1].sum())
    assert labels[1, start:start + real].tolist() == report[1, :real].tolist()
    assert bool((labels[1, start + real:] == IGNORE_INDEX).all()) and real < report.shape[1]


def test_caption_loss_is_cross_entropy_on_the_report_tokens_only(model):
    volume = volumes()
    prompt, report, report_mask = prompt_and_report(model)
    with torch.no_grad():
        loss = model.caption_loss(volume, prompt, report, target_mask=report_mask)
        embeds, mask = model.inputs_embeds(volume, prompt)
        full = torch.cat([embeds, model.lm.get_input_embeddings()(report)], 1)
        full_mask = torch.cat([mask, report_mask], 1)
        logits = model.lm(inputs_embeds=full, attention_mask=full_mask).logits
        start = 32 + prompt.shape[1]
        manual = torch.cat([F.cross_entropy(logits[b, start - 1:start - 1 + int(report_mask[b].sum())],
                                            report[b, :int(report_mask[b].sum())], reduction="none")
                            for b in range(2)]).mean()
        torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-5)
        # The LM's own shifted loss with these labels agrees: visual and prompt positions are not scored.
        labels = model.caption_labels(prompt, report, report_mask)
        hf_loss = model.lm(inputs_embeds=full, attention_mask=full_mask, labels=labels).loss
        torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)
        # Scoring the prompt too (labels on its positions) would give another value.
        scored = labels.clone()
        scored[:, 32:start] = prompt
        assert abs(model.lm(inputs_embeds=full, attention_mask=full_mask, labels=scored).loss - loss) > 1e-3
        # Report padding is neither scored nor attended: other pad ids, same loss.
        other = report.clone()
        other[report_mask == 0] = 5
        torch.testing.assert_close(model.caption_loss(volume, prompt, other, target_mask=report_mask), loss)
        with pytest.raises(ValueError, match="padding must be on the right"):
            model.caption_loss(volume, prompt, report, target_mask=report_mask.flip(1))


def test_caption_loss_of_a_padded_batch_is_the_token_weighted_mean_of_each_sample(model):
    volume = volumes()
    prompt, report, report_mask = prompt_and_report(model)
    with torch.no_grad():
        batch = model.caption_loss(volume, prompt, report, target_mask=report_mask)
        lengths = report_mask.sum(1)
        each = [model.caption_loss(volume[b:b + 1], prompt[b:b + 1], report[b:b + 1, :int(lengths[b])])
                for b in range(2)]
    torch.testing.assert_close(batch, (each[0] * lengths[0] + each[1] * lengths[1]) / lengths.sum(), rtol=1e-4,
                               atol=1e-5)


def test_gradient_reaches_the_projector_not_the_frozen_lm():
    model = build_model("siglip-tiny", "tiny-gemma3", seed=0)
    trained = trainable_parameters(model, "warmup")
    model.train()
    assert not model.lm.training  # frozen and not checkpointing: eval mode
    prompt, report, report_mask = prompt_and_report(model)
    model.caption_loss(volumes(), prompt, report, target_mask=report_mask).backward()
    assert set(trained) == {n for n, _ in model.named_parameters() if n.startswith("projector.")}
    assert all(p.grad is None for p in model.compressor.parameters())  # frozen: the token whitening stays valid
    for name, param in model.projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.projector.vis_scale.grad.abs() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.lm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())


def test_stages_train_their_own_parameters():
    from peft import LoraConfig, get_peft_model

    model = build_model("siglip-tiny", "tiny-gemma3", seed=0)
    contrastive = trainable_parameters(model, "contrastive")
    assert {n.split(".")[0] for n in contrastive} == {"vision", "compressor", "text_head", "logit_scale"}
    assert len([n for n in contrastive if n.startswith("vision.")]) == len(list(model.vision.parameters()))
    embeddings = trainable_parameters(model, "contrastive", vision="embeddings")
    assert {n for n in embeddings if n.startswith("vision.")} == {
        "vision.patch_embed.weight", "vision.patch_embed.bias", "vision.position_embedding.weight",
        "vision.depth_embedding"}
    with pytest.raises(ValueError, match="no LoRA adapters"):
        trainable_parameters(model, "lora")
    with pytest.raises(ConfigError, match="--stage"):
        trainable_parameters(model, "finetune")

    model.lm = get_peft_model(model.lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                         "o_proj"]))
    lora = trainable_parameters(model, "lora")
    assert {n.split(".")[0] for n in lora} == {"lm", "projector"}
    assert all("lora_" in n for n in lora if n.startswith("lm."))
    assert len([n for n in lora if n.startswith("lm.")]) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    base = {n: p.detach().clone() for n, p in model.lm.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.SGD(list(lora.values()), lr=0.1)
    prompt, report, report_mask = prompt_and_report(model)
    model.train()
    model.caption_loss(volumes(), prompt, report, target_mask=report_mask).backward()
    optimizer.step()
    assert all(torch.equal(p, base[n]) for n, p in model.lm.named_parameters() if "lora_" not in n)
    lora_b = [p for n, p in model.lm.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # B starts at zero; it moved, so gradients reached the adapters


def test_bf16_lm_with_gradient_checkpointing_trains_the_fp32_projector():
    model = build_model("siglip-tiny", "tiny-gemma3", precision="bf16", seed=0)
    assert model.lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.projector.vis_scale.dtype == torch.float32
    trainable_parameters(model, "warmup")
    model.gradient_checkpointing_enable()
    model.train()
    assert model.lm.training and model.vision.gradient_checkpointing  # HF layers recompute only in train mode
    prompt, report, report_mask = prompt_and_report(model)
    loss = model.caption_loss(volumes(), prompt, report, target_mask=report_mask)
    loss.backward()
    assert torch.isfinite(loss) and model.projector.net[0].weight.grad.dtype == torch.float32
    assert model.projector.net[0].weight.grad.abs().sum() > 0


@pytest.mark.bitsandbytes
def test_4bit_lm_keeps_its_quantized_layers_and_passes_gradients_to_the_projector():
    import bitsandbytes as bnb

    model = build_model("siglip-tiny", "tiny-gemma3", quantization="4bit", seed=0)
    assert isinstance(model.lm.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    trainable_parameters(model, "warmup")
    prompt, report, report_mask = prompt_and_report(model)
    model.caption_loss(volumes(), prompt, report, target_mask=report_mask).backward()
    assert model.projector.net[2].weight.grad.abs().sum() > 0
    generated = model.lm.generate(inputs_embeds=model.inputs_embeds(volumes(1), prompt[:1])[0].detach(),
                                  max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 4)


def test_model_config_round_trip_rebuilds_an_equal_model():
    options = dict(depth_patch=2, inflation="mean", pos_emb="seed", compressor="perceiver", perceiver_layers=1,
                   latents=8, seed=3)
    model = build_model("siglip-tiny", "tiny-gemma3", **options)
    config = json.loads(json.dumps(model.model_config))
    assert config["inflation"] == "mean" and config["latents"] == 8 and config["seed"] == 3
    rebuilt = model_from_config(config)
    state, again = model.state_dict(), rebuilt.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    other = build_model("siglip-tiny", "tiny-gemma3", **{**options, "seed": 4}).state_dict()
    assert not torch.equal(other["projector.net.0.weight"], state["projector.net.0.weight"])
    with torch.no_grad():  # trained weights come back through the state dict
        model.projector.vis_scale.fill_(3.0)
        model.compressor.latents.add_(1.0)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode(volumes()), model.encode(volumes()))
    with pytest.raises(ConfigError, match="unknown model settings colour") as info:
        model_from_config({**config, "colour": "red"}, source="run/best/model.json")
    assert info.value.source == "run/best/model.json"


def test_pool_compressor_model_and_bad_options():
    model = build_model("siglip-tiny", "tiny-gemma3", compressor="pool", seed=0)
    with torch.no_grad():
        tokens = model.vision(volumes())
        torch.testing.assert_close(model.encode(volumes()), F.adaptive_avg_pool1d(tokens.transpose(1, 2), 32)
                                   .transpose(1, 2))
    for kwargs, flag in [({"compressor": "mlp"}, "--compressor"), ({"inflation": "edge"}, "--inflation"),
                         ({"pos_emb": "sinusoid"}, "--pos-emb"), ({"perceiver_layers": 0}, "--perceiver-layers")]:
        with pytest.raises(ConfigError) as info:
            build_model("siglip-tiny", "tiny-gemma3", **kwargs)
        assert info.value.source == flag
    with pytest.raises(ConfigError, match="unknown vision tower") as info:
        build_model("siglip-small", "tiny-gemma3")
    assert info.value.source == "--vision"


def test_a_saved_siglip_checkpoint_loads_its_vision_tower_through_common_hf(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    # google/medsiglip-448 is a two-tower SiglipModel checkpoint; the vision tower is read out of it.
    vision = dict(get_preset("siglip-tiny").options)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100}
    torch.manual_seed(5)
    saved = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    saved.save_pretrained(tmp_path / "siglip")
    tower = saved.vision_model
    model = build_model(str(tmp_path / "siglip"), "tiny-gemma3")
    torch.testing.assert_close(model.vision.position_embedding.weight, tower.embeddings.position_embedding.weight)
    torch.testing.assert_close(model.vision.encoder.layers[1].mlp.fc2.weight, tower.encoder.layers[1].mlp.fc2.weight)
    torch.testing.assert_close(model.vision.patch_embed.weight[:, :, 1],
                               tower.embeddings.patch_embedding.weight.sum(1, keepdim=True))
    assert model.model_config["vision"] == str(tmp_path / "siglip")


def test_uncached_medsiglip_is_one_config_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_model("medsiglip-448", "tiny-gemma3", cache_dir=tmp_path)
    assert info.value.source == "google/medsiglip-448" and "\n" not in str(info.value)


# --- real sizes on the meta device ----------------------------------------------------------------------------------

GEMMA3_4B_EMBEDDING = 675_000_000
GEMMA3_4B_NON_EMBEDDING = 3_209_000_000
GEMMA3_VISION_ENCODER = 417_000_000
"""Gemma 3 Technical Report (arXiv 2503.19786), Table 1, 4B: embedding 675M, non-embedding 3,209M parameters; the
vision encoder (SigLIP so400m/14 at 896 px, MedGemma's, of which MedSigLIP-448 is the 448 px version) 417M."""


def test_real_architectures_match_their_published_sizes():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from common.presets import MEDSIGLIP_448_CONFIG

    model = build_model("medsiglip-448", "medgemma-4b", pretrained=False, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    lm = count_parameters(model.lm)
    embedding = model.lm.get_input_embeddings().weight.numel()
    assert abs(lm - (GEMMA3_4B_EMBEDDING + GEMMA3_4B_NON_EMBEDDING)) <= 0.01 * 3_884_000_000, lm
    assert abs(lm - embedding - GEMMA3_4B_NON_EMBEDDING) <= 0.001 * GEMMA3_4B_NON_EMBEDDING, lm - embedding

    medsiglip = get_preset("medsiglip-448")
    with torch.device("meta"):
        tower = medsiglip.skeleton()
        at_896 = SiglipVisionModel(SiglipVisionConfig(**{**MEDSIGLIP_448_CONFIG, "image_size": 896,
                                                         "vision_use_head": False}))
    tower_count = count_parameters(tower)
    assert abs(tower_count - medsiglip.published_params) <= medsiglip.params_tolerance * medsiglip.published_params
    assert abs(count_parameters(at_896) - GEMMA3_VISION_ENCODER) <= 0.005 * GEMMA3_VISION_ENCODER
    # The 3D encoder is the tower without its pooling head, with a (2, 14, 14) one-channel tubelet instead of the RGB
    # patch and a 64-row depth embedding.
    width, patch = 1152, 14
    expected = tower_count - count_parameters(tower.head) - 3 * patch * patch * width + 2 * patch * patch * width \
        + 64 * width
    assert count_parameters(model.vision) == expected
    assert count_parameters(model.projector) == 1152 * 2560 + 2560 + 2560 * 2560 + 2560 + 1
    with torch.no_grad():
        latents = model.encode(torch.zeros(1, 1, 64, 126, 126, device="meta"))
    assert latents.shape == (1, 32, 1152) and model.projector(latents).shape == (1, 32, 2560)


def test_tiny_twins_are_small():
    model = build_model("siglip-tiny", "tiny-gemma3")
    assert count_parameters(model) < 500_000
    assert model.vision.hidden_size == 64 and model.vision.patch_size == 16


def test_token_whitening_gives_every_direction_unit_variance_over_the_training_volumes():
    model = build_model("siglip-tiny", "tiny-gemma3", seed=0, precision="fp32")
    generator = torch.Generator().manual_seed(0)
    volumes = torch.rand(6, 1, 16, 64, 64, generator=generator)
    before = model.visual_tokens(volumes[:2])
    assert torch.allclose(before, model.projector(model.encode(volumes[:2])))  # identity until fitted
    model.fit_token_whitening(volumes, batch_size=4)
    tokens = model.encode(volumes).double()
    white = (tokens - model.token_mean.double()) @ model.token_whitening.double()
    assert torch.allclose(white.mean(0), torch.zeros_like(white[0]), atol=1e-3)  # float32 tokens, amplified
    covariance = white.flatten(0, 1).T @ white.flatten(0, 1) / (white.shape[0] * white.shape[1] - 1)
    values = torch.linalg.eigvalsh(covariance)
    # 6 volumes x 32 latents = 192 tokens; the compressor's final LayerNorm leaves one direction without variance
    # (it stays at zero under the floor), every other one is whitened to unit variance.
    assert values[0] < 1e-3
    assert torch.allclose(values[1:], torch.ones_like(values[1:]), atol=1e-2)
    assert torch.allclose(model.visual_tokens(volumes[:2]), model.projector(white[:2].float()), atol=1e-3)
    # Raw tokens of different volumes are nearly equal; whitened, they are not.
    raw_cos = F.cosine_similarity(tokens[0].flatten(), tokens[1].flatten(), dim=0)
    white_cos = F.cosine_similarity(white[0].flatten(), white[1].flatten(), dim=0)
    assert white_cos < raw_cos - 0.2


def test_token_whitening_floors_directions_without_variance():
    model = build_model("siglip-tiny", "tiny-gemma3", seed=0, precision="fp32")
    constant = torch.cat([torch.ones(32), torch.zeros(32)])  # the last 32 features never vary
    model.encode = lambda v: v.flatten(1)[:, : 32 * 64].reshape(len(v), 32, 64) * constant
    volumes = torch.rand(4, 1, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    model.fit_token_whitening(volumes, floor=1e-6)
    assert torch.isfinite(model.token_whitening).all()
    white = (model.encode(volumes) - model.token_mean) @ model.token_whitening
    variances = torch.linalg.eigvalsh(white.flatten(0, 1).T @ white.flatten(0, 1) / (4 * 32 - 1))
    assert torch.allclose(variances[-32:], torch.ones(32), atol=1e-3)  # the varying half: unit variance
    assert variances[:32].abs().max() < 1e-6  # the constant half stays at zero
    # The clamp is the largest whitened magnitude of the training volumes; a volume unlike them (here one that
    # varies in the constant features, amplified ~3,500 times) reaches the projector inside it.
    torch.testing.assert_close(model.token_bound, white.abs().max(), rtol=1e-4, atol=1e-4)
    odd = torch.rand(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    model.encode = lambda v: v.flatten(1)[:, : 32 * 64].reshape(len(v), 32, 64)
    raw = (model.encode(odd) - model.token_mean) @ model.token_whitening
    assert raw.abs().max() > 100 * model.token_bound
    with torch.no_grad():
        expected = model.projector(raw.clamp(-model.token_bound, model.token_bound))
        torch.testing.assert_close(model.visual_tokens(odd), expected)


def test_keyword_weights_scale_the_loss_of_the_chosen_tokens():
    model = build_model("siglip-tiny", "tiny-gemma3", seed=0, precision="fp32")
    volume = volumes()
    prompt, report, report_mask = prompt_and_report(model)
    with torch.no_grad():
        losses = model.caption_token_losses(volume, prompt, report, report_mask)
        assert torch.all(losses[report_mask == 0] == 0)
        plain = model.caption_loss(volume, prompt, report, target_mask=report_mask)
        torch.testing.assert_close(plain, losses.sum() / report_mask.sum())
        weight = torch.ones_like(losses)
        weight[:, 1] = 5.0
        weighted = model.caption_loss(volume, prompt, report, target_mask=report_mask, target_weight=weight)
        real = report_mask.float()
        expected = (losses * weight * real).sum() / (weight * real).sum()
        torch.testing.assert_close(weighted, expected)
        assert not torch.isclose(weighted, plain)
        ones = model.caption_loss(volume, prompt, report, target_mask=report_mask,
                                  target_weight=torch.ones_like(weight))
        torch.testing.assert_close(ones, plain)
