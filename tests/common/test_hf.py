"""common.hf: local save_pretrained directories load like hub ids, 4-bit works, offline errors are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from common import hf
from common.errors import ConfigError, DataError
from common.tiny import save_tiny_gemma3, tiny_gemma3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"), seed=0)


def _inputs(processor):
    processor.tokenizer.padding_side = "left"
    images = [Image.fromarray(np.full((28, 28), v, np.uint8)).convert("RGB") for v in (40, 200)]
    questions = ["Describe the lungs.", "Is there pneumonia in the right lower lobe?"]
    chats = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
             for im, q in zip(images, questions)]
    return processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", processor_kwargs={"padding": True})


def _generate(model, inputs, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs.to(dtype=model.dtype), max_new_tokens=8, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def test_local_directory_loads_like_in_memory_model(tiny_dir):
    assert hf.load_config(tiny_dir).model_type == "gemma3"
    model = hf.load_pretrained(Gemma3ForConditionalGeneration, tiny_dir)
    processor = hf.load_processor(AutoProcessor, str(tiny_dir))
    reference, _ = tiny_gemma3(seed=0)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    inputs = _inputs(processor)
    first = _generate(model, inputs)
    assert torch.equal(first, _generate(model, inputs))
    assert torch.equal(first, _generate(reference, inputs))


@pytest.mark.bitsandbytes
def test_4bit_load_generates_deterministically_and_is_smaller(tiny_dir):
    full = hf.load_pretrained(Gemma3ForConditionalGeneration, tiny_dir, dtype=torch.float32)
    quantized = hf.load_pretrained(Gemma3ForConditionalGeneration, tiny_dir, quantization="4bit")
    import bitsandbytes as bnb

    linears = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and linears[0].weight.quant_type == "nf4"
    assert hf.model_memory_bytes(quantized) < 0.6 * hf.model_memory_bytes(full)
    inputs = _inputs(hf.load_processor(AutoProcessor, tiny_dir))
    first = _generate(quantized, inputs)
    assert first.shape[0] == 2 and int(first.max()) < quantized.config.text_config.vocab_size
    assert torch.equal(first, _generate(quantized, inputs))


@pytest.mark.bitsandbytes
def test_8bit_load_is_smaller(tiny_dir):
    full = hf.load_pretrained(Gemma3ForConditionalGeneration, tiny_dir, dtype=torch.float32)
    quantized = hf.load_pretrained(Gemma3ForConditionalGeneration, tiny_dir, quantization="8bit")
    assert any(p.dtype == torch.int8 for p in quantized.parameters())
    assert hf.model_memory_bytes(quantized) < hf.model_memory_bytes(full)


def test_bnb_config_recipe():
    assert hf.bnb_config("none") is None
    four = hf.bnb_config("4bit", "cpu")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float32
    assert hf.bnb_config("8bit").load_in_8bit
    with pytest.raises(ConfigError, match="choose one of none, 4bit, 8bit"):
        hf.bnb_config("3bit")


def test_missing_bitsandbytes_is_one_config_line(monkeypatch):
    import common.device

    real = common.device.importlib.util.find_spec
    monkeypatch.setattr(common.device.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        hf.bnb_config("4bit")
    assert info.value.source == "--quantization" and "pip install bitsandbytes" in info.value.message


@pytest.mark.parametrize("loader", ["model", "processor", "config"])
def test_offline_uncached_hub_id_is_one_config_line(tmp_path, loader):
    with pytest.raises(ConfigError) as info:
        if loader == "model":
            hf.load_pretrained(Gemma3ForConditionalGeneration, "medvl-test/not-cached", cache_dir=tmp_path)
        elif loader == "processor":
            hf.load_processor(AutoProcessor, "medvl-test/not-cached", cache_dir=tmp_path)
        else:
            hf.load_config("medvl-test/not-cached", cache_dir=tmp_path)
    assert info.value.source == "medvl-test/not-cached"
    assert info.value.message == hf.OFFLINE_MESSAGE and "\n" not in str(info.value)


def test_bad_local_paths_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="directory does not exist"):
        hf.load_pretrained(Gemma3ForConditionalGeneration, tmp_path / "missing")
    with pytest.raises(DataError, match="directory does not exist"):
        hf.load_pretrained(Gemma3ForConditionalGeneration, "./runs/nowhere/model")
    with pytest.raises(DataError, match="no config.json"):
        hf.load_pretrained(Gemma3ForConditionalGeneration, tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="got a file"):
        hf.load_pretrained(Gemma3ForConditionalGeneration, tmp_path / "weights.bin")
    assert hf.resolve_source("google/medgemma-4b-it") == "google/medgemma-4b-it"


def test_model_memory_bytes_counts_parameters_and_buffers():
    module = torch.nn.BatchNorm1d(10)  # 20 parameters, 21 buffer values (mean, var, count)
    assert hf.model_memory_bytes(module) == 20 * 4 + 20 * 4 + 8
