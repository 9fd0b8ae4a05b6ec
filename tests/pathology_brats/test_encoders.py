"""Tile-encoder presets: each one's preprocessing from its own config, Virchow2's tokens, local checkpoint folders,
and seeded (reproducible) random weights with their fingerprint in the feature cache."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from common.errors import ConfigError, DataError
from common.presets import get_preset
from pathology_brats import encoder as enc
from pathology_brats.encoder import (
    PROV_GIGAPATH_PREPROCESSING,
    TilePreprocessing,
    cache_for,
    encoder_preprocessing,
    load_tile_encoder,
    normalize_pixels,
    preprocess,
    run_preprocessing,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# The numbers of each model's own config (timm pretrained_cfg of its hub config.json; Phikon-v2: its image
# processor), written out here independently of common.presets: (resize, crop, mean, std, interpolation).
EXPECTED = {
    "prov-gigapath": (256, 224, *IMAGENET, "bicubic"),  # model card: Resize(256), CenterCrop(224)
    "uni": (224, 224, *IMAGENET, "bicubic"),
    "virchow2": (224, 224, *IMAGENET, "bicubic"),
    "h-optimus-0": (224, 224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "bicubic"),
    "phikon-v2": (224, 224, *IMAGENET, "bicubic"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_and_its_tiny_twin_preprocess_as_its_config_says(name):
    expected = TilePreprocessing(*EXPECTED[name])
    assert encoder_preprocessing(name) == expected
    twin = get_preset(name).tiny
    assert encoder_preprocessing(twin) == expected
    assert load_tile_encoder(twin, image_tokens=1).preprocessing == expected  # what the loaded encoder carries


def test_timm_and_image_processor_configs_convert_as_their_libraries_do():
    # timm's eval transform: resize floor(224 / 0.9) = 248, crop 224.
    cfg = {"input_size": [3, 224, 224], "crop_pct": 0.9, "mean": [0.5] * 3, "std": [0.5] * 3,
           "interpolation": "bilinear"}
    assert TilePreprocessing.from_timm(cfg) == TilePreprocessing(248, 224, (0.5,) * 3, (0.5,) * 3, "bilinear")
    processor = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "resample": 2,
                 "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    assert TilePreprocessing.from_image_processor(processor) == TilePreprocessing(
        256, 224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear")
    # A raw timm name takes timm's own pretrained_cfg (vit_small_patch16_224: crop_pct 0.9, mean/std 0.5).
    assert encoder_preprocessing("vit_small_patch16_224") == TilePreprocessing(248, 224, (0.5,) * 3, (0.5,) * 3,
                                                                                 "bicubic")


def test_a_non_imagenet_mean_and_std_give_the_hand_computed_pixel():
    hoptimus = encoder_preprocessing("h-optimus-0")
    image = Image.new("RGB", (300, 300), (200, 100, 50))
    x = preprocess(image, "config", hoptimus)
    assert x.shape == (3, 224, 224)
    hand = [(200 / 255 - 0.707223) / 0.211883, (100 / 255 - 0.578729) / 0.230117, (50 / 255 - 0.703617) / 0.177517]
    assert torch.allclose(x[:, 111, 111], torch.tensor(hand), atol=1e-5)
    imagenet = preprocess(image, "imagenet", hoptimus)  # ImageNet's numbers whatever the encoder
    assert torch.allclose(imagenet[:, 0, 0], torch.tensor([(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224,
                                                          (50 / 255 - 0.406) / 0.225]), atol=1e-5)
    assert torch.allclose(preprocess(image, "seed", hoptimus)[:, 5, 5], torch.tensor([200, 100, 50]) / 255.0)
    with pytest.raises(ConfigError, match="--normalize"):
        normalize_pixels(torch.zeros(3, 2, 2, dtype=torch.uint8), "zscore")


def test_the_crop_follows_the_preprocessing():
    image = Image.new("RGB", (400, 300), (10, 20, 30))
    assert enc.crop_pixels(image, TilePreprocessing(resize=160, crop=112)).shape == (3, 112, 112)
    assert enc.crop_pixels(image).shape == (3, 224, 224)


def test_runs_record_their_preprocessing_and_old_runs_fall_back_to_gigapath():
    hoptimus = encoder_preprocessing("h-optimus-0")
    record = {**hoptimus.to_json(), "normalize": "config", "image_tokens": 5}
    assert run_preprocessing(record) == hoptimus
    assert run_preprocessing(json.loads(json.dumps(record))) == hoptimus  # survives model.json
    assert run_preprocessing({"resize": 256, "crop": 224, "normalize": "imagenet", "image_tokens": 5}) == (
        PROV_GIGAPATH_PREPROCESSING)
    assert run_preprocessing(None) == PROV_GIGAPATH_PREPROCESSING


def test_virchow2_tokens_are_class_token_with_mean_patch_token_and_skip_the_registers():
    encoder = load_tile_encoder("virchow2-tiny", image_tokens=5)
    assert encoder.backbone.num_prefix_tokens == 5 and encoder.dim == 2 * encoder.width == 128
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = encoder(x)
        full = encoder.backbone.forward_features(x)
    patches = full[:, 5:]  # class token, 4 registers, then 16 x 16 patches
    assert patches.shape[1] == 256 and tokens.shape == (2, 5, 128)
    assert torch.allclose(tokens[:, 0, :64], full[:, 0]) and torch.allclose(tokens[:, 0, 64:], patches.mean(1),
                                                                            atol=1e-5)
    grid = patches.transpose(1, 2).reshape(2, 64, 16, 16)
    assert torch.allclose(tokens[:, 1, 64:], grid[:, :, :8, :8].mean((2, 3)), atol=1e-5)  # top-left quarter
    assert torch.allclose(tokens[:, 1:, :64], full[:, :1].expand(-1, 4, -1))
    one = load_tile_encoder("virchow2-tiny", image_tokens=1)
    with torch.no_grad():
        assert one(x).shape == (2, 1, 128)  # exactly the published embedding recipe


def test_registers_stay_out_of_the_h_optimus_grid():
    encoder = load_tile_encoder("h-optimus-tiny", image_tokens=2)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens, full = encoder(x), encoder.backbone.forward_features(x)
    assert torch.allclose(tokens[:, 1], full[:, 5:].mean(1), atol=1e-5)


def test_phikon_tiny_is_a_transformers_dinov2_with_lora_on_its_attention():
    from transformers import Dinov2Model

    encoder = load_tile_encoder("phikon-tiny", image_tokens=5)
    assert isinstance(encoder.backbone.model, Dinov2Model)
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 5, 64)
    enc.add_lora(encoder, rank=2, alpha=4)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert len(adapted) == 2 * 4  # 2 layers x (query, key, value, output) projections
    assert all(".attention." in n and ".mlp." not in n for n in adapted)


# --- reproducible random weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gigapath-tiny", "virchow2-tiny", "phikon-tiny"])
def test_tiny_encoders_are_the_same_whatever_the_global_rng_did_before(name):
    torch.manual_seed(123)
    first = load_tile_encoder(name, image_tokens=5)
    torch.randn(1000)  # other code used the global generator in between (the bug: train vs submit)
    torch.manual_seed(999)
    state = torch.random.get_rng_state()
    second = load_tile_encoder(name, image_tokens=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # and the global generator is left alone
    assert first.seed == second.seed == 0 and first.fingerprint == second.fingerprint
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    other = load_tile_encoder(name, image_tokens=5, seed=1)
    assert other.fingerprint != first.fingerprint


def test_caches_of_other_weights_do_not_share_entries(tmp_path):
    a = load_tile_encoder("gigapath-tiny", image_tokens=2)
    b = load_tile_encoder("gigapath-tiny", image_tokens=2, seed=1)
    cache_a, cache_b = cache_for(a, tmp_path, "config"), cache_for(b, tmp_path, "config")
    assert cache_a.directory != cache_b.directory
    cache_a.add({"tile": torch.ones(2, 64)})
    assert cache_b.missing(["tile"]) == ["tile"] and cache_for(a, tmp_path, "config").missing(["tile"]) == []
    assert cache_a.meta["weights"] == a.fingerprint
    # A shard of other weights put under this name is refused, not mixed in.
    from common.feature_cache import FeatureCache

    with pytest.raises(DataError, match="weights"):
        FeatureCache(tmp_path, cache_a.directory.name, {**cache_a.meta, "weights": b.fingerprint})


# --- local checkpoint folders ------------------------------------------------------------------------------------

def _save_timm_folder(folder, encoder, options, weights="model.safetensors"):
    from safetensors.torch import save_file

    folder.mkdir()
    config = {"architecture": options["architecture"], "num_classes": 0,
              "model_args": {**options["model_args"], **options.get("layers", {})},
              "pretrained_cfg": {**options["pretrained_cfg"], "num_classes": 0}}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}
    if weights == "model.safetensors":
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_local_folder_gives_the_features_of_the_model_that_was_saved(tmp_path, weights):
    saved = load_tile_encoder("h-optimus-tiny", image_tokens=5, seed=7)
    folder = _save_timm_folder(tmp_path / "hopt", saved, dict(get_preset("h-optimus-tiny").options), weights)
    loaded = load_tile_encoder(str(folder), image_tokens=5)
    assert loaded.pretrained and loaded.fingerprint == saved.fingerprint
    assert loaded.preprocessing == saved.preprocessing == encoder_preprocessing(str(folder))
    assert loaded.preprocessing.mean == (0.707223, 0.578729, 0.703617)
    x = preprocess(Image.new("RGB", (256, 256), (180, 90, 160)), "config", loaded.preprocessing)[None]
    with torch.no_grad():
        assert torch.allclose(loaded(x), saved(x), atol=1e-6)


def test_a_local_virchow2_copy_keeps_its_layers_and_token_recipe(tmp_path):
    saved = load_tile_encoder("virchow2-tiny", image_tokens=2)
    options = dict(get_preset("virchow2-tiny").options)
    folder = _save_timm_folder(tmp_path / "v2", saved, {**options, "layers": {}})  # as the hub writes it
    loaded = load_tile_encoder(str(folder), image_tokens=2)
    assert loaded.tokens == "cls+mean" and loaded.dim == 128
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded(x), saved(x), atol=1e-6)


def test_a_local_phikon_folder_loads_through_transformers(tmp_path):
    saved = load_tile_encoder("phikon-tiny", image_tokens=2)
    saved.backbone.model.save_pretrained(tmp_path / "phikon")
    (tmp_path / "phikon" / "preprocessor_config.json").write_text(json.dumps(
        dict(get_preset("phikon-v2").options)["image_processor"]))
    loaded = load_tile_encoder(str(tmp_path / "phikon"), image_tokens=2)
    assert loaded.preprocessing == encoder_preprocessing("phikon-v2")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded(x), saved(x), atol=1e-6)


def test_bad_local_folders_are_one_data_error_naming_them(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no config.json") as info:
        load_tile_encoder(str(empty))
    assert info.value.source == str(empty)
    with pytest.raises(DataError, match="does not exist"):
        load_tile_encoder(str(tmp_path / "missing"))
    # Weights of another architecture (a UNI-tiny state dict under H-optimus-tiny's config).
    other = load_tile_encoder("uni-tiny", image_tokens=1)
    folder = _save_timm_folder(tmp_path / "wrong", other, dict(get_preset("h-optimus-tiny").options))
    with pytest.raises(DataError, match="do not match the architecture") as info:
        load_tile_encoder(str(folder))
    assert info.value.source == str(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    with pytest.raises(DataError, match="no model.safetensors or pytorch_model.bin"):
        load_tile_encoder(str(folder))


def test_the_cli_reports_a_bad_encoder_folder_in_one_line(histology_phantom, tmp_path, capsys):
    from pathology_brats import train

    root = histology_phantom
    (tmp_path / "enc").mkdir()
    code = train.main(["--data-root", str(root), "--output-dir", str(tmp_path / "run"), "--encoder",
                       str(tmp_path / "enc"), "--modality", "image", "--device", "cpu", "--no-progress",
                       "--feature-cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no config.json" in err[0] and str(tmp_path / "enc") in err[0]
