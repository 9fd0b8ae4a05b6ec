"""Weights from local folders in each library's own layout, and the preprocessing and pooling they carry.

timm: ``save_for_hf`` (config.json with ``pretrained_cfg`` + model.safetensors), the layout of a timm hub repo.
BERT: ``save_pretrained`` + a ``vocab.txt`` and no tokenizer config, the layout of emilyalsentzer/Bio_ClinicalBERT.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mavl_chexpert import evaluate, text, train_image
from mavl_chexpert.data import ChexpertDataset, Preprocessing
from mavl_chexpert.model import ImageModel, build_backbone, preprocessing_from_backbone, timm_architecture

TIMM_ARGS = {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
FOLDER_CFG = {"mean": (0.3, 0.3, 0.3), "std": (0.2, 0.2, 0.2), "interpolation": "bicubic"}
RUN_ARGS = ("--epochs", "1", "--batch-size", "16", "--no-progress", "--seed", "0", "--device", "cpu",
            "--precision", "fp32")


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny ViT saved by timm in its hub layout, with its own mean/std/interpolation; and its weights."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(5)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **TIMM_ARGS)
    model.pretrained_cfg = {**model.pretrained_cfg, **FOLDER_CFG, "input_size": (3, 64, 64)}
    folder = tmp_path_factory.mktemp("timm") / "tiny-vit"
    save_for_hf(model, folder, model_args=TIMM_ARGS, safe_serialization=True)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def test_a_timm_folder_loads_its_weights_and_its_preprocessing(timm_folder):
    folder, weights = timm_folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    backbone = build_backbone(folder, pretrained=True)
    assert all(torch.equal(weights[k], v) for k, v in backbone.state_dict().items())
    prep = preprocessing_from_backbone(backbone)
    assert (prep["image_size"], prep["mean"], prep["std"], prep["interpolation"]) == (64, [0.3] * 3, [0.2] * 3,
                                                                                      "bicubic")
    # Rebuilt from the recorded architecture (what evaluation does), the folder is not needed.
    moved = folder.parent / "moved"
    shutil.copytree(folder, moved)
    architecture = timm_architecture(moved)
    shutil.rmtree(moved)
    rebuilt = ImageModel(str(moved), 5, architecture=architecture)
    assert rebuilt.backbone.state_dict().keys() == backbone.state_dict().keys()
    # The real preset's statistics are its weights' (timm's vit_base_patch16_224: 0.5, bicubic), not ImageNet's.
    preset = preprocessing_from_backbone(build_backbone("vit-b16", pretrained=False))
    assert (preset["mean"], preset["std"], preset["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bicubic")
    scratch = preprocessing_from_backbone(build_backbone("vit-tiny"), pretrained=False)  # no weights to follow
    assert (scratch["mean"], scratch["interpolation"]) == ([0.485, 0.456, 0.406], "bilinear")


def test_the_recorded_statistics_normalise_the_images():
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8).numpy()
    item = ChexpertDataset(images, images[:, 0, :1].astype("float32"), images[:, 0, :1] > 0, mean=[0.5] * 3,
                           std=[0.25] * 3)[0]["image"]
    assert torch.allclose(item[:, 0, 0], torch.full((3,), -2.0)) and torch.allclose(item[:, 0, 1],
                                                                                     torch.full((3,), 2.0))
    old = Preprocessing.from_record({"image_size": 64})  # a run recorded before mean/std/interpolation
    assert (old.interpolation, old.mean) == ("bilinear", (0.485, 0.456, 0.406))


def test_train_and_evaluate_take_preprocessing_from_the_folder(timm_folder, chexpert_phantom, image_run, tmp_path):
    folder, weights = timm_folder
    run = tmp_path / "run"
    assert train_image.main(["--data-root", str(chexpert_phantom), "--output-dir", str(run), "--backbone",
                             str(folder), "--lr", "1e-12", *RUN_ARGS]) == 0
    meta = json.loads((run / "best" / "model.json").read_text())
    prep = meta["preprocessing"]
    assert (prep["mean"], prep["std"], prep["interpolation"], prep["image_size"]) == ([0.3] * 3, [0.2] * 3,
                                                                                      "bicubic", 64)
    trained = load_file(str(run / "best" / "model.safetensors"))
    assert torch.allclose(trained["backbone.pos_embed"], weights["pos_embed"], atol=1e-6)  # started from the folder
    assert evaluate.main(["--run-dir", str(run), "--n-boot", "5"]) == 0
    first = pd.read_csv(run / "predictions" / "test.csv")
    # Other recorded statistics give other probabilities: evaluation reads them from model.json.
    other = Path(shutil.copytree(run, tmp_path / "other"))
    meta["preprocessing"].update(mean=[0.6] * 3, std=[0.1] * 3)
    (other / "best" / "model.json").write_text(json.dumps(meta))
    assert evaluate.main(["--run-dir", str(other), "--n-boot", "5"]) == 0
    second = pd.read_csv(other / "predictions" / "test.csv")
    probs = [c for c in first.columns if c.startswith("prob_")]
    assert len(first) == len(second) and (first[probs] - second[probs]).abs().to_numpy().max() > 1e-3
    # A run recorded before interpolation/mean/std were recorded still evaluates (bilinear, ImageNet).
    old = Path(shutil.copytree(image_run, tmp_path / "old"))
    old_meta = json.loads((old / "best" / "model.json").read_text())
    old_meta["preprocessing"] = {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                 "channels": "grey x3", "resize": "pad to square, bilinear"}
    old_meta["kwargs"].pop("architecture")
    (old / "best" / "model.json").write_text(json.dumps(old_meta))
    assert evaluate.main(["--run-dir", str(old), "--n-boot", "5"]) == 0


def test_a_second_stage_starts_from_the_first_and_runs_lrfl(chexpert_phantom, image_run, tmp_path):
    run = tmp_path / "stage2"
    assert train_image.main(["--data-root", str(chexpert_phantom), "--output-dir", str(run), "--backbone",
                             "vit-tiny", "--init-from", str(image_run), "--lrf-variant", "lrfl",
                             "--lr", "1e-12", *RUN_ARGS]) == 0
    first = load_file(str(image_run / "best" / "model.safetensors"))
    second = load_file(str(run / "best" / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["lrf"] == {"variant": "lrfl", "rank": 38, "weight": 0.005}
    basis = load_file(str(run / "checkpoints" / "last" / "task.safetensors"))
    assert basis["v_tail"].shape == (96, 96 - 38)  # LRFL's square Vh, its columns beyond the rank


# --- text ---------------------------------------------------------------------------------------------------------

CASED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "The", "edema", "Edema", "fluid", "Fluid",
               "in", "lungs", "Lungs", ".", ",", "##s"]


def _save_cased_bert(folder: Path) -> Path:
    """A tiny cased BERT in Bio_ClinicalBERT's hub layout: config, safetensors weights, vocab.txt, no tokenizer
    config (so ``AutoTokenizer`` falls back to BERT's default ``do_lower_case=True``)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(CASED_VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    (folder / "vocab.txt").write_text("\n".join(CASED_VOCAB) + "\n")
    return folder


@pytest.fixture(scope="module")
def cased_bert(tmp_path_factory) -> Path:
    return _save_cased_bert(tmp_path_factory.mktemp("bert") / "cased")


def test_a_cased_tokenizer_keeps_case(cased_bert):
    from transformers import AutoTokenizer

    from common.text_encoders import load_text_encoder

    assert AutoTokenizer.from_pretrained(str(cased_bert)).tokenize("Edema") == ["edema"]  # what it did before
    encoder = load_text_encoder(str(cased_bert))
    assert encoder.tokenizer.tokenize("The Edema") == ["The", "Edema"]
    vectors = encoder.encode(["Edema", "edema"])
    assert not torch.allclose(vectors[0], vectors[1])


def test_pooling_is_the_weights_and_can_be_chosen(cased_bert, tmp_path):
    from common.text_encoders import load_text_encoder, weights_pooling

    hub_copy = tmp_path / "models--emilyalsentzer--Bio_ClinicalBERT" / "snapshots" / "0123abc"
    shutil.copytree(cased_bert, hub_copy)
    assert weights_pooling(str(cased_bert)) == "mean"  # a folder that states nothing keeps the mean
    assert weights_pooling(str(hub_copy)) == "cls"  # the hub cache of the bio-clinicalbert preset: its [CLS]
    assert weights_pooling("bio-clinicalbert") == "cls" and weights_pooling("minilm") == "mean"
    assert weights_pooling(str(cased_bert), "cls") == "cls"
    cls_encoder = load_text_encoder(str(hub_copy))
    tokens = cls_encoder.tokenizer(["Fluid in the lungs ."], return_tensors="pt")
    with torch.no_grad():
        states = cls_encoder.model(**tokens).last_hidden_state[0]
    assert torch.allclose(cls_encoder.encode(["Fluid in the lungs ."])[0], states[0], atol=1e-5)
    mean_encoder = load_text_encoder(str(hub_copy), pooling="mean")
    assert torch.allclose(mean_encoder.encode(["Fluid in the lungs ."])[0], states.mean(0), atol=1e-5)


def test_text_cli_records_and_keys_its_cache_on_the_pooling(cased_bert, tmp_path):
    out = tmp_path / "text"
    argv = ["--text-encoder", str(cased_bert), "--labels", "Edema", "--output-dir", str(out)]
    descriptions = tmp_path / "d.json"
    descriptions.write_text(json.dumps({"Edema": {"definition": "Fluid in the lungs .",
                                                  "aspects": {"fluid": "The Fluid ."}}}))
    argv += ["--descriptions", str(descriptions)]
    assert text.main([*argv, "--text-pooling", "cls"]) == 0
    cache = out / text.CACHE_FILE
    with safe_open(str(cache), "pt") as handle:
        assert handle.metadata()["pooling"] == "cls"
    cls_vectors = load_file(str(cache))["aspects"]
    assert text.main(argv) == 0  # the folder's own pooling (mean): embedded again, not reused
    with safe_open(str(cache), "pt") as handle:
        assert handle.metadata()["pooling"] == "mean"
    assert not torch.allclose(load_file(str(cache))["aspects"], cls_vectors)


def test_a_fusion_run_records_its_text_pooling(fusion_run):
    meta = json.loads((fusion_run / "best" / "model.json").read_text())
    assert meta["text"]["pooling"] == "mean"  # minilm: a sentence-transformers model, mean pooling
