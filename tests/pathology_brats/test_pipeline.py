"""Tile encoder, feature cache, captions and the classifier, and one small end-to-end run on the phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError, DataError
from common.feature_cache import FeatureCache
from common.phantoms.histology import write_histology
from pathology_brats import evaluate, train
from pathology_brats.captions import read_captions
from pathology_brats.encoder import cache_for, check_image_tokens, load_tile_encoder, preprocess
from pathology_brats.extract import encode_tiles
from pathology_brats.model import TileCaptionClassifier
from pathology_brats.scoring import challenge_scores


@pytest.fixture(scope="module")
def histology(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("histology_small")
    write_histology(root, n=16, seed=1, size=64)
    return root


def test_image_tokens_are_class_token_plus_pooled_grid():
    encoder = load_tile_encoder("gigapath-tiny", image_tokens=5)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = encoder(x)
        full = encoder.backbone.forward_features(x)
    assert tokens.shape == (2, 5, 64)
    assert torch.allclose(tokens[:, 0], full[:, 0])  # the class token itself
    grid = full[:, 1:].transpose(1, 2).reshape(2, 64, 14, 14)
    assert torch.allclose(tokens[:, 1], grid[:, :, :7, :7].mean((2, 3)), atol=1e-5)  # top-left quarter
    for bad in (0, 3, 4):
        with pytest.raises(ConfigError, match="--image-tokens"):
            check_image_tokens(bad)


def test_preprocessing_normalises_as_the_encoder_expects():
    from PIL import Image

    image = Image.new("RGB", (384, 384), (124, 116, 104))  # about the ImageNet mean
    x = preprocess(image)
    assert x.shape == (3, 224, 224) and x.abs().max() < 0.05
    seed = preprocess(image, "seed")
    assert torch.allclose(seed[:, 0, 0], torch.tensor([124, 116, 104]) / 255.0)


def test_features_are_cached_and_a_rerun_encodes_only_what_is_missing(histology, tmp_path, monkeypatch):
    encoder = load_tile_encoder("gigapath-tiny", image_tokens=2)
    paths = sorted((histology / "CT").glob("*.jpg"))[:6]
    cache = cache_for(encoder, tmp_path, "imagenet")
    first, kept = encode_tiles(encoder, paths[:4], cache, torch.device("cpu"))
    assert first.shape == (4, 2, 64) and kept.tolist() == [0, 1, 2, 3]
    calls = []
    original = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda x: calls.append(len(x)) or original(x))
    again, _ = encode_tiles(encoder, paths, cache_for(encoder, tmp_path, "imagenet"), torch.device("cpu"))
    assert calls == [2] and torch.equal(again[:4].tensor(), first.tensor())
    # Another feature size under the same cache folder and name is refused, not mixed in.
    with pytest.raises(DataError, match="does not match this encoder"):
        FeatureCache(tmp_path, cache.directory.name, {**cache.meta, "dim": "1536"})


def test_a_cache_of_another_feature_size_is_one_error(tmp_path):
    FeatureCache(tmp_path, "enc", {"dim": "64"}).add({"k": torch.zeros(2)})
    with pytest.raises(DataError, match="dim '64' here, '1536' wanted"):
        FeatureCache(tmp_path, "enc", {"dim": "1536"})


def test_captions_tolerate_a_cut_last_line_but_not_a_bad_middle_one(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "capt')
    assert read_captions(path) == {"a.jpg": "x"}
    path.write_text('{"image": "a.jpg", "caption": "x"}\nnot json\n{"image": "b.jpg", "caption": "y"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_captions(path)


@pytest.mark.parametrize("modality, direction", [("fused", "text-to-image"), ("fused", "image-to-text"),
                                                 ("fused", "both"), ("image", "text-to-image"),
                                                 ("text", "text-to-image")])
def test_classifier_uses_the_streams_it_claims(modality, direction):
    torch.manual_seed(0)
    model = TileCaptionClassifier(8, 6, 4, modality=modality, direction=direction, width=16, heads=3).eval()
    image, text = torch.randn(3, 5, 8), torch.randn(3, 7, 6)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 5:] = False
    base = model(image=image, text=text, text_mask=mask)
    changed_image = model(image=image + 1, text=text, text_mask=mask)
    changed_text = model(image=image, text=text + 1, text_mask=mask)
    padding_only = model(image=image, text=torch.where(mask[..., None], text, text + 100), text_mask=mask)
    assert torch.allclose(base, padding_only, atol=1e-5)  # padded caption tokens never count
    assert (not torch.allclose(base, changed_image)) == (modality != "text")
    assert (not torch.allclose(base, changed_text)) == (modality != "image")


def test_small_run_trains_and_evaluates_with_the_scorer_keys(histology, tmp_path):
    run = tmp_path / "run"
    argv = ["--data-root", str(histology), "--output-dir", str(run), "--encoder", "gigapath-tiny",
            "--encoder-mode", "frozen", "--text-encoder", "minilm", "--width", "32", "--epochs", "12", "--lr", "3e-3",
            "--feature-cache", str(tmp_path / "cache"), "--no-progress", "--device", "cpu", "--precision", "fp32"]
    assert train.main(argv) == 0
    results = evaluate.evaluate_run(run, n_boot=20, device="cpu", feature_cache=tmp_path / "cache")
    predictions = __import__("pandas").read_csv(run / "predictions" / "test.csv")
    again = challenge_scores(predictions["label"], predictions["prediction"], "2025")
    assert {k: results[k] for k in again} == pytest.approx(again)
    assert results["mcc"] > 0.4  # 9 classes: chance is 0; the captions alone are right 3 times in 4
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["data"]["encoder_mode"] == "frozen" and meta["labels"][0] == "CT"
    # The encoder's own preprocessing (gigapath-tiny: Prov-GigaPath's), the normalize mode and the token count.
    assert meta["preprocessing"] == {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225], "interpolation": "bicubic", "normalize": "config",
                                     "image_tokens": 5}
    assert np.isfinite(results["specificity_global"])


def _small(histology: Path, tmp_path: Path) -> list[str]:
    return ["--data-root", str(histology), "--encoder", "gigapath-tiny", "--encoder-mode", "frozen",
            "--text-encoder", "minilm", "--width", "32", "--epochs", "3", "--lr", "3e-3", "--feature-cache",
            str(tmp_path / "cache"), "--no-progress", "--device", "cpu", "--precision", "fp32"]


def test_submission_leaves_unreadable_images_out_and_passes_the_organisers_rules(histology, tmp_path):
    import shutil

    import pandas as pd

    from pathology_brats import submit, validate

    run = tmp_path / "run"
    assert train.main([*_small(histology, tmp_path), "--output-dir", str(run)]) == 0
    images = Path(shutil.copytree(histology / "val", tmp_path / "val"))
    names = sorted(p.name for p in images.iterdir())
    (images / names[0]).write_bytes(b"\xff\xd8 not a whole jpeg")
    out = tmp_path / "submission.csv"
    assert submit.main(["--run-dir", str(run), "--images", str(images), "--out", str(out), "--feature-cache",
                        str(tmp_path / "cache"), "--device", "cpu"]) == 0
    frame = pd.read_csv(out)
    # The unreadable image gets no row (the scorer fills it with the penalty label), and is listed with its reason.
    assert list(frame.columns) == ["SubjectID", "Prediction"] and frame["SubjectID"].tolist() == names[1:]
    assert frame["Prediction"].between(0, 8).all()
    skipped = pd.read_csv(tmp_path / "submission.csv.skipped.csv")
    assert skipped["file"].tolist() == [names[0]] and "does not decode" in skipped.loc[0, "reason"]
    assert validate.main(["--submission", str(out), "--schema", "2025", "--images", str(images)]) == 0
    (tmp_path / "empty").mkdir()
    assert submit.main(["--run-dir", str(run), "--images", str(tmp_path / "empty"), "--out", str(out)]) == 2
    for name in names[1:]:
        (images / name).write_bytes(b"broken")
    assert submit.main(["--run-dir", str(run), "--images", str(images), "--out", str(out), "--feature-cache",
                        str(tmp_path / "cache"), "--device", "cpu"]) == 2
    assert pd.read_csv(out)["SubjectID"].tolist() == names[1:]  # the earlier file is intact
    assert submit.main(["--run-dir", str(run), "--images", str(images), "--out", str(run / "best" / "model.json"),
                        "--device", "cpu"]) == 2  # never written into the run it reads
    assert json.loads((run / "best" / "model.json").read_text())["pipeline"] == "pathology_brats"


def test_submit_predicts_what_evaluate_predicts_on_the_same_tiles_from_a_cold_cache(histology, tmp_path):
    import shutil

    import pandas as pd

    from pathology_brats import submit

    run = tmp_path / "run"
    assert train.main([*_small(histology, tmp_path), "--output-dir", str(run)]) == 0
    evaluate.evaluate_run(run, n_boot=10, device="cpu", feature_cache=tmp_path / "cache")
    scored = pd.read_csv(run / "predictions" / "test.csv")
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    names = [f"BraTSPath_Val_{i:07d}.jpg" for i in range(len(scored))]  # a name the year's rules accept
    captions = read_captions(histology / "captions.jsonl")
    lines = []
    for tile, name in zip(scored["image"], names):
        shutil.copy(histology / tile, labelled / name)
        lines.append(json.dumps({"image": f"labelled/{name}", "caption": captions[Path(tile).name]}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "submission.csv"
    # Another cache folder: every tile is encoded afresh, by the encoder rebuilt from the run alone.
    assert submit.main(["--run-dir", str(run), "--images", str(labelled), "--out", str(out), "--feature-cache",
                        str(tmp_path / "cold"), "--captions", str(tmp_path / "captions.jsonl"), "--device", "cpu"]) == 0
    submitted = pd.read_csv(out).set_index("SubjectID")["Prediction"]
    assert len(submitted) == len(scored) > 10
    assert [submitted[name] for name in names] == scored["prediction"].tolist()
    # evaluate itself from an empty cache: the same probabilities as from the warm one (up to float rounding of
    # other batch compositions; other encoder weights moved them by 0.1 and more)
    evaluate.evaluate_run(run, n_boot=10, device="cpu", feature_cache=tmp_path / "cold-evaluate")
    again = pd.read_csv(run / "predictions" / "test.csv")
    assert again["prediction"].tolist() == scored["prediction"].tolist()
    np.testing.assert_allclose(again.filter(like="prob_").to_numpy(), scored.filter(like="prob_").to_numpy(),
                               atol=1e-4)


def test_ablation_writes_image_text_and_fused(histology, tmp_path):
    from pathology_brats import ablate

    out = tmp_path / "ablation"
    small = _small(histology, tmp_path)
    argv = ["--data-root", str(histology), "--output-dir", str(out), "--encoder", "gigapath-tiny",
            "--text-encoder", "minilm", "--feature-cache", str(tmp_path / "cache"), "--n-boot", "10",
            "--device", "cpu", "--", *small[small.index("--encoder-mode"):small.index("--feature-cache")]]
    assert ablate.main(argv) == 0
    summary = json.loads((out / "ablation.json").read_text())
    assert set(summary) == {"image", "text", "fused"} and all("mcc" in row for row in summary.values())
    assert (out / "ablation.md").read_text().count("[") >= 15  # 3 rows x 5 scores with intervals
    stamps = {m: (out / m / "best" / "model.safetensors").stat().st_mtime_ns for m in summary}
    assert ablate.main(argv) == 0  # finished runs with the same settings are reused
    assert {m: (out / m / "best" / "model.safetensors").stat().st_mtime_ns for m in summary} == stamps
    assert ablate.main([*argv, "--width", "16"]) == 0  # other settings: the finished runs are trained again
    import yaml

    assert all(yaml.safe_load((out / m / "config.yaml").read_text())["width"] == 16 for m in summary)


def test_captions_resume_after_a_kill_without_redoing_finished_images(histology, tmp_path, monkeypatch):
    from pathology_brats import caption

    paths = sorted((histology / "PN").glob("*.jpg"))[:5]
    out = tmp_path / "captions.jsonl"
    assert caption.caption_images(paths[:3], out, "tiny-gemma3", device="cpu", batch_size=2, max_new_tokens=4) == 3
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # a kill in the middle of the third line
    asked = []
    original = caption.generate_reports
    monkeypatch.setattr(caption, "generate_reports", lambda vlm, chats, n: asked.append(len(chats)) or
                        original(vlm, chats, n))
    assert caption.caption_images(paths, out, "tiny-gemma3", device="cpu", batch_size=2, max_new_tokens=4) == 3
    assert asked == [2, 1]  # the cut third image and the two new ones; the first two are not redone
    captions = read_captions(out)
    assert sorted(captions) == sorted(p.name for p in paths)
    assert out.read_text().endswith("\n") and len(out.read_text().splitlines()) == 5


def test_standardisation_uses_training_statistics_and_ignores_text_padding():
    torch.manual_seed(0)
    model = TileCaptionClassifier(8, 4, 9, modality="fused")
    image = torch.randn(6, 5, 8) * 3 + 7
    text = torch.randn(6, 3, 4) + 2
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[:, 2] = False
    text[:, 2] = 1000.0  # padding positions must not move the statistics
    model.fit_standardization(image, text, mask)
    flat = ((image - model.image_mean) / model.image_std).reshape(-1, 8)
    assert flat.mean(0).abs().max() < 1e-5 and (flat.std(0) - 1).abs().max() < 1e-5
    assert model.text_mean.max() < 10
    restored = TileCaptionClassifier(8, 4, 9, modality="fused")
    restored.load_state_dict(model.state_dict())  # the statistics travel with the weights
    assert torch.equal(restored.image_std, model.image_std)


def test_lora_trains_only_adapters_and_a_run_saves_only_what_trained():
    from common.rundir import load_model_state, model_state
    from pathology_brats.encoder import add_lora
    from pathology_brats.model import EncoderClassifier

    def build(pretrained: bool) -> EncoderClassifier:
        torch.manual_seed(0)
        encoder = load_tile_encoder("gigapath-tiny", image_tokens=5)
        encoder.pretrained = pretrained  # as if its weights came from the hub
        return EncoderClassifier(add_lora(encoder, rank=2, alpha=4), TileCaptionClassifier(64, 8, 9, "image"))

    model = build(pretrained=True)
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".attn.")[1].split(".")[0] for n in trainable} == {"qkv", "proj"}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or name.startswith("classifier."):
                parameter.add_(0.1)
    state = model_state(model)
    assert not any(k.startswith("encoder.") and "lora_" not in k for k in state)
    fresh = build(pretrained=True)
    load_model_state(fresh, state, Path("model.safetensors"))
    pixels = torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8)
    assert torch.allclose(fresh.eval()(pixels=pixels), model.eval()(pixels=pixels), atol=1e-5)
    with pytest.raises(DataError, match="missing"):
        load_model_state(fresh, {k: v for k, v in state.items() if "lora_A" not in k}, Path("model.safetensors"))
    assert any(k.startswith("encoder.backbone.blocks") and "lora_" not in k for k in model_state(build(False)))


def test_real_csv_rows_with_copies_in_two_folders_never_straddle_splits(shared_data, tmp_path):
    """Rows of the real label CSV, including names listed under both of its folders: one split per file name, and
    evaluate scores exactly the tiles split.csv assigns to test."""
    import io

    import pandas as pd
    from PIL import Image

    real = pd.read_csv(shared_data / "bratspath" / "balanced_classes.csv")
    real["name"] = real["Input Path"].str.rsplit("/", n=1).str[-1]
    copies = real[real.duplicated("name", keep=False)]
    rows = []
    for code in ("CT", "PN", "MP"):
        twice = copies[copies["Ground-Truth"] == code].sort_values("name").head(16)  # names in both folders
        once = real[(real["Ground-Truth"] == code) & ~real["name"].isin(copies["name"])].head(8)
        rows.append(pd.concat([twice, once]))
    rows = pd.concat(rows)
    root = tmp_path / "BraTS-Path"
    rng = np.random.default_rng(0)
    colours = {"CT": (150, 60, 140), "PN": (200, 120, 170), "MP": (120, 40, 90)}
    pictures: dict[str, bytes] = {}
    for path, code, name in zip(rows["Input Path"], rows["Ground-Truth"], rows["name"]):
        if name not in pictures:  # both copies of a name hold the same picture, as on the real disk
            pixels = np.clip(np.array(colours[code]) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            pictures[name] = buffer.getvalue()
        target = root / Path(path).relative_to("BraTS-Path")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pictures[name])
    csv = tmp_path / "labels.csv"
    rows[["Input Path", "Ground-Truth"]].to_csv(csv, index=False)
    run = tmp_path / "run"
    assert train.main(["--data-root", str(root), "--labels-csv", str(csv), "--modality", "image", "--encoder",
                       "gigapath-tiny", "--width", "32", "--epochs", "1", "--feature-cache", str(tmp_path / "cache"),
                       "--no-progress", "--device", "cpu", "--precision", "fp32", "--output-dir", str(run)]) == 0
    split = pd.read_csv(run / "split.csv", dtype=str)
    assert len(split) == len(rows) == split["id"].nunique()
    assert split.groupby("group")["split"].nunique().max() == 1  # no file name in two splits
    pairs = int(rows.duplicated("name").sum())
    assert pairs >= 12 and (split.groupby("group").size() == 2).sum() == pairs  # both copies kept, one split each
    results = evaluate.evaluate_run(run, n_boot=10, device="cpu", feature_cache=tmp_path / "cache")
    test_ids = split.loc[split["split"] == "test", "id"].tolist()
    assert results["n"] == len(test_ids)
    assert pd.read_csv(run / "predictions" / "test.csv")["image"].tolist() == test_ids


def test_tta_averages_the_eight_dihedral_views(histology, tmp_path):
    """``--tta 8`` = the mean of the probabilities of the 8 views, each from features of the rotated tile."""
    from common.runs import load_run
    from pathology_brats import inference
    from pathology_brats.extract import dihedral
    from pathology_brats.inputs import TileDataset
    from pathology_brats.model import build_run_model

    run = tmp_path / "run"
    assert train.main([*_small(histology, tmp_path), "--modality", "image", "--output-dir", str(run)]) == 0
    loaded = load_run(run, "pathology_brats", build_run_model)
    tiles = sorted((histology / "CT").glob("*.jpg"))[:4]
    cpu, cache = torch.device("cpu"), tmp_path / "cache"
    averaged, kept = inference.tile_probabilities(loaded, tiles, None, cpu, cache, None, tta=8)
    # An independent path: rotate the crops by hand and run the encoder and the classifier on them.
    encoder = load_tile_encoder(loaded.meta["data"]["encoder"], loaded.meta["data"]["image_tokens"]).eval()
    from pathology_brats.encoder import crop_pixels, normalize_pixels, read_rgb

    crops = torch.stack([crop_pixels(read_rgb(t), encoder.preprocessing) for t in tiles])
    views = []
    with torch.no_grad():
        for view in range(8):
            features = encoder(normalize_pixels(dihedral(crops, view), "config", encoder.preprocessing))
            views.append(inference.predict(loaded.model, TileDataset(np.zeros(4), features)))
    assert kept.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(averaged, np.mean(views, axis=0), atol=1e-5)
    assert not np.allclose(views[0], views[1], atol=1e-4)  # the views do differ
    plain = evaluate.evaluate_run(run, n_boot=10, device="cpu", feature_cache=cache)
    with_tta = evaluate.evaluate_run(run, n_boot=10, device="cpu", feature_cache=cache, tta=8)
    assert with_tta["tta"] == 8 and plain["tta"] == 1 and with_tta["n"] == plain["n"]
