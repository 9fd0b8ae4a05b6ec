"""Tiny presets: real classes, trained tokenizers, seeded weights, and the published MedGemma-4B size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertModel, CLIPTextModel, CLIPTokenizer, Gemma3ForConditionalGeneration, Gemma3Processor

from common import tiny


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gemma_tokenizer_round_trips_and_compresses():
    tokenizer = tiny.tiny_gemma_tokenizer()
    text = "Patchy opacity in the right lower lobe, consistent with pneumonia."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text) / 3, "trained merges should cover whole words of the corpus"
    assert tokenizer.unk_token_id not in ids
    for token in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"):
        assert tokenizer(token, add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids(token)]


def test_brain_gemma_tokenizer_keeps_report_words_whole():
    tokenizer = tiny.tiny_gemma_tokenizer(tiny.BRAIN_GEMMA_VOCAB, corpus="brain")
    text = ("A mass lesion is seen in the left frontal lobe with mixed high and low signals. Edema is significant. "
            "No focal lesion; the ventricles are normal in size.")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert not any("▁" in piece.strip("▁") for piece in pieces)  # no piece spans a word boundary
    for word in ("left", "right", "bilateral", "frontal", "parietal", "temporal", "occipital", "Edema", "lesion",
                 "Necrosis", "No", "not"):
        assert tokenizer.convert_ids_to_tokens(tokenizer(f"{word} ", add_special_tokens=False).input_ids) == [
            f"{word}▁"], word
    radiology = tiny.tiny_gemma_tokenizer()
    assert len(ids) < 0.6 * len(radiology(text, add_special_tokens=False).input_ids)
    model, processor = tiny.tiny_gemma3_brain(seed=0)
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert model.config.text_config.vocab_size == len(tokenizer)


def test_tiny_gemma3_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model_a, _ = tiny.tiny_gemma3(seed=0)
    assert torch.equal(torch.rand(3), expected)
    model_b, _ = tiny.tiny_gemma3(seed=0)
    model_c, _ = tiny.tiny_gemma3(seed=1)
    assert isinstance(model_a, Gemma3ForConditionalGeneration)
    assert _same_weights(model_a, model_b)
    assert not _same_weights(model_a, model_c)


def test_tiny_gemma3_chat_template_and_generate_like_medgemma():
    model, processor = tiny.tiny_gemma3()
    assert isinstance(processor, Gemma3Processor)
    image = Image.fromarray(np.full((28, 28), 128, np.uint8)).convert("RGB")
    messages = [[{"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]},
                 {"role": "user", "content": [{"type": "image", "image": image},
                                              {"type": "text", "text": "Is there pneumonia?"}]}]]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    config = model.config
    assert ids.count(config.image_token_index) == config.mm_tokens_per_image == 16
    assert ids.count(config.boi_token_index) == 1 and ids.count(config.eoi_token_index) == 1
    text = processor.decode(inputs["input_ids"][0])
    assert text.startswith("<bos><start_of_turn>user\nYou are a radiologist.\n\n")
    assert text.endswith("Is there pneumonia?<end_of_turn>\n<start_of_turn>model\n")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, tiny.TINY_GEMMA3_IMAGE_SIZE, tiny.TINY_GEMMA3_IMAGE_SIZE)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) > 0 and int(new.max()) < len(processor.tokenizer)
    reply = processor.decode(new, skip_special_tokens=True)
    assert any(ch.isalpha() for ch in reply)
    assert processor.tokenizer.unk_token_id not in new.tolist()  # checked on ids: decoding would hide <unk>


def test_tiny_clip_text_pools_at_end_of_text_and_reloads(tmp_path):
    model, tokenizer = tiny.tiny_clip_text(seed=0)
    assert isinstance(model, CLIPTextModel) and model.config.hidden_size == tiny.CLIP_TEXT_HIDDEN == 64
    batch = tokenizer(["No evidence of pneumonia", "right lower lobe CONSOLIDATION"], padding=True,
                      return_tensors="pt")
    assert batch.input_ids[1].tolist() == tokenizer(["right lower lobe consolidation"], padding="max_length",
                                                    max_length=batch.input_ids.shape[1]).input_ids[0]
    with torch.no_grad():
        out = model(**batch)
    assert tuple(out.pooler_output.shape) == (2, 64)
    eos = [row.tolist().index(tokenizer.eos_token_id) for row in batch.input_ids]
    assert torch.allclose(out.pooler_output, out.last_hidden_state[torch.arange(2), eos])
    assert not torch.allclose(out.pooler_output[0], out.pooler_output[1])

    tiny.save_tiny_clip_text(tmp_path, seed=0)
    reloaded, tokenizer2 = CLIPTextModel.from_pretrained(tmp_path), CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer2("pleural effusion").input_ids == tokenizer("pleural effusion").input_ids
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).pooler_output, out.pooler_output)


def test_tiny_bert_tokenizer_and_model():
    model, tokenizer = tiny.tiny_bert(seed=0)
    assert isinstance(model, BertModel)
    ids = tokenizer("Mild cardiomegaly.").input_ids
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "mild cardiomegaly."
    with torch.no_grad():
        pooled = model(**tokenizer(["a", "b"], return_tensors="pt", padding=True)).pooler_output
    assert tuple(pooled.shape) == (2, 64)


def test_medgemma_4b_parameter_count_on_meta_device():
    config = tiny.medgemma_4b_config()
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(tiny.MEDGEMMA_4B_PARAMETERS, rel=0.02)
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    assert vision == pytest.approx(4.17e8, rel=0.01), "SigLIP so400m/14 at 896 px without its pooling head"
    text = config.text_config
    assert text.layer_types.count("full_attention") == 34 // 6 and text.sliding_window == 1024
