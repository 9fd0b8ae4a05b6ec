"""The three training stages on a small brain phantom: InfoNCE that learns at batch 1, exact resume, what is saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from brain3d_report import probe, train
from common.phantoms.brain import write_brain
from common.runs import load_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "brain3d_report"

@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brain_small")
    write_brain(root, n=12, seed=2, size=(32, 32, 32))
    return root


def _argv(brain: Path, tmp_path: Path, stage: str, out: str, *extra: str) -> list[str]:
    return ["--stage", stage, "--data-root", str(brain), "--output-dir", str(tmp_path / out),
            "--volume-size", "16", "32", "32", "--volume-cache", str(tmp_path / "cache"), "--no-progress",
            "--device", "cpu", "--precision", "fp32", *extra]


def test_info_nce_at_batch_one_is_zero_without_a_queue_and_learns_with_one():
    torch.manual_seed(0)
    image, text = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8)
    keys = torch.tensor([1])
    alone = train.info_nce(image, text, torch.tensor(10.0), keys)
    assert alone.item() == pytest.approx(0.0, abs=1e-6)  # the seed's stage 1: one logit, nothing to learn
    queue, queue_keys = torch.randn(6, 8), torch.arange(2, 8)
    loss = train.info_nce(image, text, torch.tensor(10.0), keys, queue, queue_keys)
    assert loss.item() > 0.01
    loss.backward()
    assert image.grad.abs().sum() > 0
    # A queued copy of the sample's own report is not a negative: masking it gives the loss without that entry.
    same = train.info_nce(image, text, torch.tensor(10.0), keys, torch.cat([queue, text]),
                          torch.cat([queue_keys, keys]))
    assert same.item() == pytest.approx(train.info_nce(image, text, torch.tensor(10.0), keys, queue,
                                                       queue_keys).item(), rel=1e-6)


def test_info_nce_matches_a_hand_computed_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    scale = torch.tensor(2.0)
    sims = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    i2t = torch.nn.functional.cross_entropy(scale * sims, torch.arange(2))
    t2i = torch.nn.functional.cross_entropy(scale * sims.T, torch.arange(2))
    assert train.info_nce(image, text, scale, torch.tensor([1, 2])).item() == pytest.approx(((i2t + t2i) / 2).item())


@pytest.mark.slow  # end-to-end; `pytest -m "not slow"` skips it
def test_contrastive_stage_at_batch_one_has_a_nonzero_falling_loss(brain, tmp_path):
    argv = _argv(brain, tmp_path, "contrastive", "r1", "--vision", "siglip-tiny", "--lm", "tiny-gemma3",
                 "--batch-size", "1", "--epochs", "8", "--lr", "2e-3", "--queue-size", "8")
    assert train.main(argv) == 0
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert all(loss > 0.05 for loss in losses)  # the seed's batch-1 InfoNCE was exactly 0 from the first step
    assert sum(losses[-2:]) < sum(losses[:2])  # eight cases at batch 1 are noisy: compare the ends of the run


def test_resume_after_a_kill_restores_the_queue_exactly(brain, tmp_path):
    common = ["--vision", "siglip-tiny", "--lm", "tiny-gemma3", "--batch-size", "2", "--epochs", "2",
              "--queue-size", "4", "--checkpoint-every", "2"]
    assert train.main(_argv(brain, tmp_path, "contrastive", "whole", *common)) == 0
    assert train.main(_argv(brain, tmp_path, "contrastive", "cut", *common, "--max-steps", "5")) == 0
    assert train.main(_argv(brain, tmp_path, "contrastive", "cut", *common, "--resume")) == 0

    def weights(run: str) -> dict[str, torch.Tensor]:
        with safe_open(str(tmp_path / run / "checkpoints" / "last" / "model.safetensors"), "pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}

    whole, cut = weights("whole"), weights("cut")
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_three_stages_chain_and_save_only_what_they_train(brain, tmp_path):
    r1 = _argv(brain, tmp_path, "contrastive", "r1", "--vision", "siglip-tiny", "--lm", "tiny-gemma3",
               "--epochs", "1", "--flip-augment", "random")
    assert train.main(r1) == 0
    with safe_open(str(tmp_path / "r1" / "best" / "model.safetensors"), "pt") as handle:
        assert not any(k.startswith("lm.") for k in handle.keys())  # the random twin is rebuilt from its seed
    # Stages 2 and 3 take the seed's schedules from their recipes, the flags given here over them.
    assert train.main(_argv(brain, tmp_path, "warmup", "r2", "--config", str(CONFIGS / "medgemma.warmup.yaml"),
                            "--init", str(tmp_path / "r1"), "--epochs", "2", "--grad-accum", "2",
                            "--max-text-len", "48", "--flip-augment", "both", "--keyword-weight", "5")) == 0
    assert train.main(_argv(brain, tmp_path, "lora", "r3", "--config", str(CONFIGS / "medgemma.lora.yaml"),
                            "--init", str(tmp_path / "r2"), "--epochs", "1", "--grad-accum", "2",
                            "--max-text-len", "48")) == 0
    with safe_open(str(tmp_path / "r3" / "best" / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any("lora_A" in k for k in keys) and any(k.startswith("projector.") for k in keys)
    assert "lm.model.embed_tokens.weight" not in keys  # the frozen LM is rebuilt from its preset
    assert (tmp_path / "r3" / "split.csv").read_text() == (tmp_path / "r1" / "split.csv").read_text()
    loaded = load_run(tmp_path / "r3", train.PIPELINE, train.model_builder())
    r2 = load_run(tmp_path / "r2", train.PIPELINE, train.model_builder())
    # Stage 3 started from stage 2: the vision encoder (frozen after stage 1) is the same in both.
    for (name, a), (_, b) in zip(loaded.model.vision.state_dict().items(), r2.model.vision.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(loaded.model.lm.get_input_embeddings().state_dict().items(),
                                 r2.model.lm.get_input_embeddings().state_dict().items()):
        assert torch.equal(a, b), name  # the frozen LM rebuilds the same from its preset
    meta = json.loads((tmp_path / "r3" / "best" / "model.json").read_text())
    assert meta["kwargs"]["lora"] == {"r": 4, "alpha": 8, "dropout": 0.05}
    assert meta["kwargs"]["model"]["lm_pretrain"] is None and meta["kwargs"]["model"]["input_range"] == "processor"
    split = [line.split(",") for line in (tmp_path / "r1" / "split.csv").read_text().splitlines()[1:]]
    # Every setting is recorded as given, or as its one default (no setting depends on which models run).
    for run, flip, weight in (("r1", "random", 1.0), ("r2", "both", 5.0), ("r3", "off", 1.0)):
        kwargs = json.loads((tmp_path / run / "best" / "model.json").read_text())["kwargs"]
        assert (kwargs["flip_augment"], kwargs["keyword_weight"], kwargs["text_embedding"]) == (flip, weight, "lm")
    n_train = sum(row[-1] == "train" for row in split)
    first = json.loads((tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == -(-2 * n_train // 2)  # each case as written and mirrored; batch 1, grad-accum 2
    # The warm-up trains the projector only: the compressor is stage 1's, and the whitening fitted on its tokens.
    r1 = load_run(tmp_path / "r1", train.PIPELINE, train.model_builder())
    for (name, a), (_, b) in zip(r1.model.compressor.state_dict().items(), r2.model.compressor.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(r2.model.token_whitening, torch.eye(r2.model.token_whitening.shape[0]))
    assert torch.equal(loaded.model.token_whitening, r2.model.token_whitening)
    assert "lr: 0.0002" in (tmp_path / "r2" / "config.yaml").read_text()  # the seed's warm-up schedule
    assert "lr: 5.0e-05" in (tmp_path / "r3" / "config.yaml").read_text()  # the seed's LoRA schedule
    val = [json.loads(line) for line in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["val_keyword_loss"] > 0 for row in val if "val_keyword_loss" in row)


def test_later_stages_need_init(brain, tmp_path, capsys):
    assert train.main(_argv(brain, tmp_path, "warmup", "r2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init" in err[0]


def test_side_probe_separates_and_the_shuffled_control_does_not():
    rng = torch.Generator().manual_seed(0)
    sides = {"train": ["left", "right"] * 20, "test": ["left", "right"] * 10}
    features, labels = {}, {}
    for name, part in sides.items():
        x = torch.randn(len(part), 16, generator=rng)
        x[:, 0] += torch.tensor([2.0 if s == "left" else -2.0 for s in part])
        features[name], labels[name] = x.numpy(), __import__("numpy").array(part)
    result = probe.side_probe(features, labels)
    assert result["side_acc"] >= 0.9
    assert 0.2 <= result["side_acc_shuffled"] <= 0.8


def test_text_whitening_gives_unit_variance_components_fitted_on_training_reports():
    from brain3d_report.model import build_model

    model = build_model("siglip-tiny", "tiny-gemma3", text_dim=24, text_whiten=6, seed=0, precision="fp32")
    generator = torch.Generator().manual_seed(0)
    scales = torch.cat([torch.full((18,), 0.1), torch.full((6,), 5.0)])
    embeddings = torch.randn(40, 24, generator=generator) * scales + 5.0
    model.fit_text_centering(embeddings)
    assert torch.allclose(model.text_center, embeddings.mean(0), atol=1e-5)
    whitened = (embeddings - model.text_center) @ model.text_whitening
    assert torch.allclose(torch.cov(whitened.T), torch.eye(6), atol=1e-4)
    # The six leading directions are the high-variance coordinates 18..23 of this data.
    assert model.text_whitening[:18].abs().max() < 0.05 * model.text_whitening[18:].abs().max()
    _, projected, _ = model(torch.zeros(1, 1, 16, 64, 64), text=embeddings[:3])
    assert torch.allclose(projected, model.text_head(whitened[:3]), atol=1e-5)


@pytest.mark.parametrize(("flag", "value"), [("--keyword-weight", "heavy"), ("--keyword-weight", "0"),
                                           ("--keyword-weight", "-1"), ("--keyword-weight", "inf"),
                                           ("--keyword-weight", "nan")])
def test_a_bad_number_flag_is_one_line(brain, tmp_path, capsys, flag, value):
    argv = _argv(brain, tmp_path, "contrastive", "r1", "--vision", "siglip-tiny", "--lm", "tiny-gemma3", flag, value)
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and value in err[0]
    assert not (tmp_path / "r1" / "best").exists()


def _mirror_fixture():
    from brain3d_report.data import mirror_report

    torch.manual_seed(0)
    volumes = torch.rand(6, 1, 2, 4, 3)
    reports = [f"case {k}: a mass in the {'left' if k % 2 else 'right'} frontal lobe" for k in range(6)]
    texts = reports + [mirror_report(t) for t in reports]
    # One row per text: its length, its count of "left", and the case it belongs to.
    target = torch.tensor([[len(t), t.count("left"), k % 6] for k, t in enumerate(texts)])
    return volumes, texts, target


def _check_pairing(batch, volumes, texts) -> list[bool]:
    """Each sample's volume is its case's, as written or mirrored, and its fields are those of the matching report."""
    assert set(batch) == {"volume", "target"}
    flips = []
    for volume, row in zip(batch["volume"], batch["target"]):
        case = int(row[2])
        flipped = torch.equal(volume, volumes[case].flip(-2))
        assert flipped or torch.equal(volume, volumes[case])
        assert int(row[1]) == texts[case + len(volumes) * flipped].count("left")  # the report of what is shown
        flips.append(flipped)
    return flips


def test_a_mirrored_training_set_pairs_each_flipped_volume_with_its_mirrored_report():
    from common.device_data import TrainBatches
    from common.engine import EpochSampler

    volumes, texts, target = _mirror_fixture()
    mirrored = volumes.flip(-2)
    both = train.stage_dataset(volumes, {"target": target}, "both", mirrored)
    assert len(both) == 12
    flips = _check_pairing(torch.utils.data.default_collate([both[i] for i in range(12)]), volumes, texts)
    assert flips == [False] * 6 + [True] * 6  # every case both ways, every epoch
    random_set = train.stage_dataset(volumes, {"target": target}, "random", mirrored)
    sampler = EpochSampler(len(volumes), seed=3)
    flips = []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        for batch in TrainBatches(random_set, sampler, batch_size=4, device=torch.device("cpu")):
            flips += _check_pairing(batch, volumes, texts)
    assert 0.3 < sum(flips) / len(flips) < 0.7  # about half, drawn afresh each epoch
    for flip in ("both", "random"):
        with pytest.raises(ValueError, match="rows for"):
            train.stage_dataset(volumes, {"target": target[:6]}, flip, mirrored)
        with pytest.raises(ValueError, match="mirrored inputs"):
            train.stage_dataset(volumes, {"target": target}, flip)


def test_caption_stages_train_on_frozen_encodings_with_the_loss_of_the_volumes():
    from brain3d_report.model import build_model, trainable_parameters

    model = build_model("siglip-tiny", "tiny-gemma3", seed=0)
    volumes = torch.rand(3, 1, 8, 32, 32)
    ids, mask = train.report_tokens(model.tokenizer, ["A mass in the left frontal lobe.", "Normal brain.",
                                                      "Edema in the right temporal lobe."], 24)
    prompt = train.prompt_tokens(model.tokenizer).expand(3, -1)
    with pytest.raises(ValueError, match="frozen"):
        train.encode_frozen(model, volumes, torch.device("cpu"))  # stage 1 trains the encoder
    trainable_parameters(model, "warmup")
    encoded = train.encode_frozen(model, volumes, torch.device("cpu"), batch_size=2)
    assert encoded.shape[:2] == (3, model.num_latents)
    model.train()
    from_volumes = model(volumes, prompt_ids=prompt, target_ids=ids, target_mask=mask)
    from_encodings = model(encoded, prompt_ids=prompt, target_ids=ids, target_mask=mask)
    assert torch.allclose(from_volumes, from_encodings, atol=1e-5) and from_volumes > 1.0


def test_keyword_token_mask_marks_the_tokens_of_the_clinical_words():
    from brain3d_report.model import lm_tokenizer

    tokenizer = lm_tokenizer("tiny-gemma3")
    reports = ["A mass lesion is seen in the left frontal lobe; no edema.", "Normal brain MRI."]
    ids, mask = train.report_tokens(tokenizer, reports, 128)
    keyword = train.keyword_token_mask(tokenizer, reports, 128)
    assert keyword.shape == ids.shape and not keyword[mask == 0].any() and not keyword[1].any()
    real = mask[0].bool()
    marked = tokenizer.decode(ids[0][keyword[0]]).replace(" ", "")
    unmarked = "|".join(tokenizer.decode([i]) for i in ids[0][real & ~keyword[0]])
    words = ["mass", "lesion", "left", "frontal", "no", "edema"]
    assert all(word in marked for word in words)  # every token of a clinical word is marked ...
    assert marked.index("mass") < marked.index("left") < marked.index("noedema")
    assert not any(word in unmarked for word in words)  # ... and no other token (a piece may hold " in the ")
    assert "lobe" not in marked and "seen" not in marked
    assert not keyword[0, int(mask[0].sum()) - 1]  # EOS is not a clinical word
    short = train.keyword_token_mask(tokenizer, reports, 8)
    assert short.shape[1] == 8 and torch.equal(short[0], keyword[0, :8] & (torch.arange(8) < 7))


SEED_SCHEDULES = {  # the seed's per stage: epochs, batch size, grad accumulation, lr, patience
    "contrastive": (8, 4, 1, 5e-4, None),  # batch 4 instead of its 1, which leaves InfoNCE without negatives
    "warmup": (10, 1, 8, 2e-4, None),
    "lora": (15, 1, 8, 5e-5, 5),
}


@pytest.mark.parametrize("stage", ["contrastive", "warmup", "lora"])
def test_every_default_is_the_same_whatever_the_models_and_each_seed_recipe_holds_its_schedule(stage):
    """No setting depends on which presets run or which stage: the parser's defaults are the defaults, and the
    seed's schedule of each stage is its ``medgemma.<stage>.yaml`` recipe (over those defaults)."""
    from common.cli import parse_args

    def settings(*argv: str) -> dict:
        args = vars(parse_args(train.get_args_parser(), ["--stage", stage, *argv]))
        return {k: v for k, v in args.items() if k not in ("vision", "lm", "config")}

    twins = settings("--vision", "siglip-tiny", "--lm", "tiny-gemma3-brain")
    assert twins == settings("--vision", "medsiglip-448", "--lm", "medgemma-4b")
    assert (twins["flip_augment"], twins["keyword_weight"], twins["text_embedding"], twins["input_range"]) == (
        "off", 1.0, "lm", "processor")
    recipe = settings("--config", str(CONFIGS / f"medgemma.{stage}.yaml"))
    schedule = tuple(recipe[k] for k in ("epochs", "batch_size", "grad_accum", "lr", "patience"))
    assert schedule == SEED_SCHEDULES[stage]
