"""Local weights for both backbones: the smp encoder and the CLIP text model from a folder or from --cache-dir,
with tiny checkpoints written in each library's own layout; a folder in another layout is one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file, save_file
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from transformers import CLIPConfig, CLIPModel

from common.errors import DataError
from common.tiny import save_tiny_bert, save_tiny_clip_text, tiny_clip_text
from cxr_localize import pretrain, train
from cxr_localize.model import build_unet, load_text_encoder

DECODER = (16, 16, 8, 8, 8)
SMALL = ["--decoder-channels", *map(str, DECODER), "--image-size", "32", "--epochs", "1", "--batch-size", "4",
         "--no-progress", "--device", "cpu", "--precision", "fp32"]
CLIP_REVISION = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["Rounded density in the left lung base.", "No findings."]


def _hub_snapshot(cache, repo_id, revision):
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return folder / "snapshots" / revision


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A Hugging Face cache holding what the defaults download: smp's ResNet34 ImageNet file at the revision smp
    pins (random weights here), and openai/clip-vit-base-patch32 as a tiny CLIPModel with the tiny CLIP tokenizer."""
    root = tmp_path_factory.mktemp("hf_cache")
    settings = smp_encoders["resnet34"]["pretrained_settings"]["imagenet"]
    snapshot = _hub_snapshot(root, settings["repo_id"], settings["revision"])
    snapshot.mkdir(parents=True)
    torch.manual_seed(1)
    encoder = smp.Unet("resnet34", encoder_weights=None, decoder_channels=DECODER).encoder
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"name": "resnet34", "weights": "imagenet"}))
    text, tokenizer = tiny_clip_text(0)
    config = CLIPConfig(text_config=text.config.to_dict(), projection_dim=64,
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16})
    torch.manual_seed(2)
    clip = CLIPModel(config).eval()
    clip_snapshot = _hub_snapshot(root, "openai/clip-vit-base-patch32", CLIP_REVISION)
    clip.save_pretrained(clip_snapshot)
    tokenizer.save_pretrained(clip_snapshot)
    return root, snapshot, clip, tokenizer


def _same_weights(module, state):
    own = module.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


def _pooled(text_model, tokenizer):
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output


def test_imagenet_encoder_from_cache_dir_or_its_folder(cache):
    root, snapshot, _, _ = cache
    saved = load_file(snapshot / "model.safetensors")
    from_cache = build_unet("resnet34", "imagenet", 1, DECODER, cache_dir=root)
    from_folder = build_unet("resnet34", str(snapshot), 1, DECODER)
    assert _same_weights(from_cache.encoder, saved) and _same_weights(from_folder.encoder, saved)


def test_encoder_from_an_smp_save_pretrained_folder(tmp_path):
    torch.manual_seed(3)
    model = smp.Unet("resnet18", encoder_weights=None, decoder_channels=DECODER)
    model.save_pretrained(tmp_path / "unet")
    loaded = build_unet("resnet18", tmp_path / "unet", 1, DECODER)
    assert _same_weights(loaded.encoder, model.encoder.state_dict())
    with pytest.raises(DataError, match="holds a resnet18 encoder, not resnet34") as caught:
        build_unet("resnet34", tmp_path / "unet", 1, DECODER)
    assert str(caught.value.source).endswith("config.json")


def test_clip_text_model_from_a_folder_and_from_cache_dir(cache, tmp_path):
    root, _, clip, tokenizer = cache
    from_cache = load_text_encoder("clip-vit-b32", cache_dir=root)
    torch.testing.assert_close(from_cache.encode(TEXTS), _pooled(clip.text_model, tokenizer), rtol=0, atol=0)
    save_tiny_clip_text(tmp_path / "clip", seed=4)
    model, tokenizer = tiny_clip_text(4)
    from_folder = load_text_encoder(str(tmp_path / "clip"))
    assert from_folder.pooling == "pooler"
    torch.testing.assert_close(from_folder.encode(TEXTS), _pooled(model, tokenizer), rtol=0, atol=0)


def test_training_with_the_defaults_reads_both_from_cache_dir(cache, small_iu, tmp_path):
    root, snapshot, _, _ = cache
    run = tmp_path / "run"
    assert train.main(["--data-root", str(small_iu), "--output-dir", str(run), "--cache-dir", str(root), *SMALL]) == 0
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["preset"] == "resnet34" and meta["text_encoder"] == "clip-vit-b32" and meta["kwargs"]["text_dim"] == 64
    trained = load_file(run / "best" / "model.safetensors")
    encoder = {k.removeprefix("unet.encoder."): v for k, v in trained.items() if k.startswith("unet.encoder.")}
    saved = load_file(snapshot / "model.safetensors")
    assert encoder.keys() == saved.keys() and all(torch.equal(encoder[k], saved[k]) for k in saved)  # frozen


def test_phase1_starts_from_the_cached_imagenet_file(cache, small_iu, tmp_path, monkeypatch):
    root, snapshot, _, _ = cache
    started = {}

    def first_step_only(model, *args, **kwargs):  # the weights phase 1 would start training from
        started.update(model.encoder.state_dict())
        return SimpleNamespace(completed=False, global_step=0)

    monkeypatch.setattr(pretrain, "fit", first_step_only)
    assert pretrain.main(["--data-root", str(small_iu), "--output-dir", str(tmp_path / "p1"), "--cache-dir", str(root),
                          *SMALL]) == 0
    saved = load_file(snapshot / "model.safetensors")
    assert started.keys() == saved.keys() and all(torch.equal(started[k], saved[k]) for k in saved)


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _pickles_only(tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    return tmp_path / "pickled"


def _clip_folder(tmp_path):
    return save_tiny_clip_text(tmp_path / "clip")


def _smp_folder(tmp_path):
    smp.Unet("resnet18", encoder_weights=None, decoder_channels=DECODER).save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


def _clip_config_bert_weights(tmp_path):
    folder = save_tiny_clip_text(tmp_path / "clip")
    save_tiny_bert(tmp_path / "bert")
    (tmp_path / "bert" / "model.safetensors").replace(folder / "model.safetensors")
    return folder


WRONG_LAYOUTS = {
    "encoder: empty folder": ("--encoder-weights", _empty, "", "no model.safetensors"),
    "encoder: pickles only": ("--encoder-weights", _pickles_only, "pytorch_model.bin", "pickle-format weights"),
    "encoder: a CLIP folder": ("--encoder-weights", _clip_folder, "model.safetensors",
                               "weights do not fit a resnet18 encoder"),
    "encoder: missing folder": ("--encoder-weights", lambda tmp: tmp / "nowhere", "", "does not exist"),
    "text: an smp folder": ("--text-encoder", _smp_folder, "", "cannot load a text encoder from here"),
    "text: empty folder": ("--text-encoder", _empty, "", ""),
    "text: CLIP config, BERT weights": ("--text-encoder", _clip_config_bert_weights, "",
                                        "weight(s) of CLIPTextModel are not in this checkpoint"),
}


@pytest.mark.parametrize("case", sorted(WRONG_LAYOUTS))
def test_a_folder_in_another_layout_is_one_line(case, small_iu, tmp_path, capsys):
    flag, make, file_name, message = WRONG_LAYOUTS[case]
    folder = make(tmp_path)
    args = {"--encoder-weights": "none", "--text-encoder": "tiny-clip", flag: str(folder)}
    out = tmp_path / "run"
    capsys.readouterr()
    code = train.main(["--data-root", str(small_iu), "--output-dir", str(out), "--encoder", "resnet18",
                       *[x for pair in args.items() for x in pair], *SMALL])
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert code == 2 and len(lines) == 1, lines  # transformers' own progress bar may come before the error
    source = folder / file_name if file_name else folder
    assert lines[0].startswith(f"error: {source}: ") and message in lines[0], lines
    assert not out.exists()


def test_missing_weights_are_refused_unless_the_caller_never_uses_them(tmp_path):
    from transformers import AutoModel

    from common.hf import load_pretrained

    folder = save_tiny_bert(tmp_path / "bert")
    state = load_file(folder / "model.safetensors")
    assert any(k.startswith("pooler.") for k in state)
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, folder / "model.safetensors")
    with pytest.raises(DataError, match=r"2 weight\(s\) of AutoModel are not in this checkpoint \(first: pooler"):
        load_pretrained(AutoModel, folder, refuse_missing_weights=True)
    model = load_pretrained(AutoModel, folder, refuse_missing_weights=True, optional_weights=("pooler.",))
    assert torch.equal(model.embeddings.word_embeddings.weight, state["embeddings.word_embeddings.weight"])
