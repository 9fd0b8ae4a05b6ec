"""Real-path settings of brain3d_report training: gradient checkpointing of the encoder in stage 1, the volume size
refused before any model loads, separate learning rates, and the seed's stage-1 trainables."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest
import torch

from brain3d_report import train
from brain3d_report.model import build_model, check_volume_fits, trainable_parameters
from common.errors import ConfigError

VOLUME = (4, 32, 32)  # siglip-tiny: (2, 16, 16) tubelets, a 2 x 2 x 2 token grid


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("siglip-tiny", "tiny-gemma3", seed=0)


def _contrastive_gradients(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Gradients of one contrastive-stage loss (pooled visual vectors against fixed text targets) after
    ``apply_gradient_checkpointing`` with ``on`` or ``off``."""
    model.vision.gradient_checkpointing = False
    trainable = trainable_parameters(model, "contrastive")
    train.apply_gradient_checkpointing(model, "contrastive", "on" if checkpointing else "off", torch.device("cpu"))
    assert model.vision.gradient_checkpointing is checkpointing
    model.train()
    model.zero_grad(set_to_none=True)
    volumes = torch.rand(2, 1, *VOLUME, generator=torch.Generator().manual_seed(3))
    text = torch.randn(2, model.text_center.shape[0], generator=torch.Generator().manual_seed(4))
    pooled, projected, scale = model(volumes, text=text)
    loss = train.info_nce(pooled, projected, scale, torch.tensor([1, 2]))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainable.items() if p.grad is not None}
    model.vision.gradient_checkpointing = False
    return grads


def test_gradient_checkpointing_of_the_encoder_gives_the_same_gradients(tiny_model):
    plain = _contrastive_gradients(tiny_model, False)
    checkpointed = _contrastive_gradients(tiny_model, True)
    assert plain.keys() == checkpointed.keys()
    encoder = [name for name in plain if name.startswith("vision.encoder.layers.")]
    assert encoder and all(plain[name].abs().sum() > 0 for name in encoder)  # the layers do get gradients
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_saves_encoder_activations(tiny_model):
    """With checkpointing the backward keeps only each layer's input: fewer saved bytes in the forward."""
    def saved_bytes(checkpointing: bool) -> int:
        tiny_model.vision.gradient_checkpointing = checkpointing
        tiny_model.vision.train()
        tiny_model.vision.requires_grad_(True)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tiny_model.vision(torch.rand(1, 1, *VOLUME)).sum()
        tiny_model.vision.gradient_checkpointing = False
        return total

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_gradient_checkpointing_auto_is_on_only_on_cuda():
    assert train.use_gradient_checkpointing("auto", torch.device("cuda"))
    assert not train.use_gradient_checkpointing("auto", torch.device("cpu"))
    assert train.use_gradient_checkpointing("on", torch.device("cpu"))
    assert not train.use_gradient_checkpointing("off", torch.device("cuda"))


def test_a_volume_size_the_patch_does_not_divide_is_refused_before_a_model_loads(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="14"):
        check_volume_fits((64, 128, 128), "medsiglip-448", 2)
    check_volume_fits((64, 126, 126), "medsiglip-448", 2)
    with pytest.raises(ConfigError, match="depth"):
        check_volume_fits((63, 126, 126), "medsiglip-448", 2)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the volume size was checked")

    monkeypatch.setattr(train, "build_model", no_model)
    monkeypatch.setattr(train, "build_run_model", no_model)
    (tmp_path / "data").mkdir()
    start = time.perf_counter()
    code = train.main(["--stage", "contrastive", "--data-root", str(tmp_path / "data"), "--output-dir",
                       str(tmp_path / "run"), "--vision", "medsiglip-448", "--lm", "medgemma-4b", "--volume-size",
                       "64", "128", "128", "--device", "cpu", "--no-progress"])
    assert code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --volume-size:") and "126" in err[0], err


def _args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"lr": 1e-3, "lr_projector": None, "lr_lora": None, "train_vision": "all",
                                 **overrides})


def test_separate_learning_rates_for_projector_and_lora(tiny_model):
    train.add_lora(tiny_model, 4, 8, 0.0)
    trainable = trainable_parameters(tiny_model, "lora")
    groups = train.optimizer_groups(trainable, _args(lr_projector=2e-4, lr_lora=5e-5))
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    for name, param in trainable.items():
        assert rate[id(param)] == (2e-4 if name.startswith("projector.") else 5e-5), name
    assert len(train.optimizer_groups(trainable, _args())) == 1  # no flags: one rate, --lr
    # one AdamW step moves a projector weight by its own rate (Adam's first step is lr * sign(grad))
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    for param in trainable.values():
        param.grad = torch.ones_like(param)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer.step()
    for name, param in trainable.items():
        step = (before[name] - param.detach()).abs().max().item()
        assert step == pytest.approx(2e-4 if name.startswith("projector.") else 5e-5, rel=1e-3), name


def test_the_seeds_stage_one_trains_the_tubelet_embedding_at_a_fifth_of_the_rate():
    model = build_model("siglip-tiny", "tiny-gemma3", seed=0)
    trainable = trainable_parameters(model, "contrastive", "seed")
    vision = sorted(name for name in trainable if name.startswith("vision."))
    assert vision == ["vision.patch_embed.bias", "vision.patch_embed.weight"]
    assert {"logit_scale", "text_head.weight"} <= set(trainable)
    groups = train.optimizer_groups(trainable, _args(train_vision="seed"))
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert rate[id(trainable["vision.patch_embed.weight"])] == pytest.approx(train.SEED_PATCH_LR_SCALE * 1e-3)
    assert rate[id(trainable["logit_scale"])] == pytest.approx(1e-3)


def test_the_new_flags_reach_the_parser():
    args = train.get_args_parser().parse_args(["--lr-projector", "2e-4", "--lr-lora", "5e-5", "--train-vision",
                                               "seed"])
    assert (args.lr_projector, args.lr_lora, args.train_vision) == (2e-4, 5e-5, "seed")


def test_the_slice_baseline_encodes_bounded_chunks_with_the_same_result():
    """Slices encoded two at a time give the LM the same inputs (logits) and the same reports as one call over all
    of them and as the VLM's own pixel path; the vision tower never sees more than a chunk."""
    from brain3d_report.baselines import axial_slices, chunked_slice_inputs, generate_slice_reports, slice_conversation
    from common.vlm import generate_reports, load_vlm

    vlm = load_vlm("tiny-gemma3", "none", "cpu", "fp32", None, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the twin's image projection starts at zero (Hugging Face's init): give it weights
        for param in vlm.model.model.multi_modal_projector.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    volumes = torch.rand(2, 1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    chats = [slice_conversation(axial_slices(v, 5, 32)) for v in volumes]
    seen: list[int] = []
    hook = vlm.model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(len(kwargs.get("pixel_values", args[0] if args else None))),
        with_kwargs=True)
    try:
        small, large = chunked_slice_inputs(vlm, chats, 2), chunked_slice_inputs(vlm, chats, 100)
    finally:
        hook.remove()
    assert seen == [2, 2, 2, 2, 2, 10]  # 10 slices: five calls of two, then one of ten
    vlm.processor.tokenizer.padding_side = "left"
    pixel_path = vlm.processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   return_tensors="pt", processor_kwargs={"padding": True})
    with torch.no_grad():
        logits = [vlm.model(**inputs).logits for inputs in (small, large, pixel_path)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0], logits[2], rtol=1e-5, atol=1e-5)
    assert (logits[0][0] - logits[0][1]).abs().max() > 1e-4  # the two volumes' slices do change the logits
    assert generate_slice_reports(vlm, chats, 6, chunk=3) == generate_reports(vlm, chats, 6)


def test_meteor_seed_is_nltk_meteor_as_hand_computed():
    """NLTK METEOR (alpha 0.9, beta 3, gamma 0.5) from its definition: Fmean = PR / (alpha P + (1 - alpha) R),
    times 1 - gamma (chunks / matches)^beta. Exact matches only here (a WordNet without synonyms)."""
    from brain3d_report.evaluate import _NoWordNet, score_records, seed_meteor
    from common.metrics.text import TextScorer

    reference = "The lesion is in the left frontal lobe"
    candidates = ["the lesion is in the right frontal lobe", "the lesion is in the left frontal lobe"]
    values, note = seed_meteor(candidates, [reference] * 2, wordnet=_NoWordNet())
    # 7 of 8 tokens match in two chunks (left/right differ); the copy matches all 8 in one chunk
    assert note is None and values == pytest.approx([7 / 8 * (1 - 0.5 * (2 / 7) ** 3), 1 - 0.5 * (1 / 8) ** 3])

    records = [{"id": str(k), "reference": reference, "report": c, "healthy": False} for k, c in enumerate(candidates)]
    with TextScorer(bertscore=None, meteor=False) as scorer:
        scored = score_records(records, scorer, n_boot=20, n_boot_corpus=0, meteor_seed=True, wordnet=_NoWordNet())
        assert scored["all"].results["meteor_seed"] == pytest.approx(sum(values) / 2)
        missing = score_records(records, scorer, n_boot=20, n_boot_corpus=0, meteor_seed=True)
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:  # the data are not in NLTK's wheel: the key is left out with the reason
        assert "meteor_seed" not in missing["all"].results
        assert "nltk.downloader wordnet" in missing["all"].notes["meteor_seed"]


def test_the_memory_benchmark_counts_saved_activations_not_weights():
    """``saved_bytes`` counts what autograd keeps for the backward: a linear layer keeps its input (not its weight),
    exp keeps its output, a tensor saved twice counts once; one layer's share comes out of one- and two-layer runs."""
    from benchmarks.brain3d_memory import layer_and_rest, saved_bytes

    linear = torch.nn.Linear(16, 32)
    x = torch.randn(4, 16, requires_grad=True)
    assert saved_bytes(lambda: linear(x), list(linear.parameters())) == x.numel() * 4
    assert saved_bytes(lambda: torch.exp(linear(x)), list(linear.parameters())) == (4 * 16 + 4 * 32) * 4
    assert saved_bytes(lambda: x * x, []) == x.numel() * 4  # x saved twice, one storage
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 copy of the weight is not an activation
        assert saved_bytes(lambda: linear(x), list(linear.parameters())) == x.numel() * 2

    def stack(layers: int) -> int:
        blocks = [torch.nn.Linear(16, 16) for _ in range(layers)]
        head = torch.nn.Linear(16, 3)

        def step():
            hidden = x
            for block in blocks:
                hidden = torch.tanh(block(hidden))
            return head(hidden)

        return saved_bytes(step, [p for m in [*blocks, head] for p in m.parameters()])

    per_layer, rest = layer_and_rest(stack)
    # each block adds tanh's output (saved by tanh and by the next linear: one storage); the rest is x itself
    assert (per_layer, rest) == (4 * 16 * 4, 4 * 16 * 4)
    assert stack(5) == rest + 5 * per_layer


def test_the_brain_is_above_the_background_constant_in_both_conventions():
    """z-scored (constant negative background) and 0-background volumes: the same brain, the same model input."""
    from brain3d_report.data import BadVolume, background_value, brain_mask, check_voxels, scale_brain_percentiles

    rng = np.random.default_rng(0)
    inside = np.zeros((12, 12, 12), dtype=bool)
    inside[2:10, 3:9, 2:10] = True
    zscored = np.where(inside, rng.normal(0, 1, inside.shape), -3.5).astype(np.float32)  # half the brain below 0
    np.testing.assert_array_equal(brain_mask(zscored).numpy(), inside)
    zero_background = zscored - zscored.min()  # the same scan with its background moved to 0
    np.testing.assert_array_equal(brain_mask(zero_background).numpy(), inside)
    torch.testing.assert_close(scale_brain_percentiles(torch.from_numpy(zscored)),
                               scale_brain_percentiles(torch.from_numpy(zero_background)), rtol=0, atol=1e-6)
    ringing = zero_background.copy()
    ringing[0, 0, :3] = -0.01  # a few negative voxels from resampling are not the background
    assert background_value(ringing) == 0.0
    np.testing.assert_array_equal(brain_mask(ringing).numpy(), inside)
    speck = np.full((12, 12, 12), -3.5, dtype=np.float32)
    speck[5:7, 5:7, 5:7] = 1.0
    with pytest.raises(BadVolume, match="no brain: 8 of 1728 voxels are above -3.5"):
        check_voxels(speck)
