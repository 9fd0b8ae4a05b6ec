"""Tiny presets of the real Hugging Face classes, with random weights, for tests and CPU demos.

    python -c "from common.tiny import tiny_gemma3; model, processor = tiny_gemma3(); print(model.num_parameters())"

Each preset builds the same class a real checkpoint loads into (``Gemma3ForConditionalGeneration``,
``CLIPTextModel``, ``BertModel``) with a tokenizer of that model's own class, whose vocabulary is trained here
with the ``tokenizers`` library on a small built-in corpus of radiology sentences (or, for the brain report twin,
on the packaged TextBraTS reports). Code that runs on a tiny preset therefore runs unchanged on the published
checkpoint; only the sizes differ. Weights are random but
fixed by ``seed``, so generated text is noise made of corpus words, the same on every run.

``medgemma_4b_config`` records the published architecture of ``google/medgemma-4b-it`` (the Gemma 3 4B
layout) so that its parameter count and memory can be checked without downloading it.
"""

from __future__ import annotations

import functools
import itertools
import json
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.models import BPE, WordPiece
from tokenizers.trainers import BpeTrainer, WordPieceTrainer
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    SiglipVisionConfig,
)

CLIP_TEXT_HIDDEN = 64
"""Width of ``tiny_clip_text``'s hidden states and of its pooled output (``pooler_output``)."""

TINY_GEMMA3_IMAGE_SIZE = 64
"""Side of the square image the tiny Gemma 3 processor resizes to (MedGemma: 896)."""

_FINDINGS = (
    "the lungs are clear", "there is no focal consolidation", "no pleural effusion or pneumothorax",
    "patchy opacity in the right lower lobe", "consolidation in the left lower lobe",
    "bilateral interstitial opacities", "the cardiomediastinal silhouette is within normal limits",
    "the heart size is normal", "mild cardiomegaly", "there is a small left pleural effusion",
    "the costophrenic angles are sharp", "perihilar airspace disease", "the osseous structures are intact",
    "no acute cardiopulmonary process", "findings are consistent with pneumonia",
    "no evidence of pneumonia", "lobar pneumonia in the right upper lobe", "atelectasis at the lung bases",
    "the trachea is midline", "pulmonary vascularity is within normal limits",
)
_IMPRESSIONS = (
    "normal chest radiograph", "findings suggest pneumonia", "right lower lobe pneumonia",
    "no acute disease", "clinical correlation is recommended", "follow up radiograph in six weeks",
    "likely viral pneumonia", "the image is of low resolution", "opacity may represent infection",
)
_VIEWS = ("frontal view of the chest", "portable anteroposterior chest", "posteroanterior and lateral views")

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma 3's chat format: turns between ``<start_of_turn>``/``<end_of_turn>``, the system text folded into the
first user turn, and ``<start_of_image>`` where an image goes (the processor expands it to the image tokens)."""

_GEMMA_SPECIAL = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
                  "mask_token": "<mask>"}
_GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
_GEMMA_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_soft_token>"}
_ALPHABET = list(string.ascii_letters + string.digits + string.punctuation + "\n")
_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def radiology_corpus() -> list[str]:
    """Report-like sentences (view, findings, impression) enumerated in a fixed order: the tokenizer corpus."""
    sentences = []
    for i, (view, finding, impression) in enumerate(itertools.product(_VIEWS, _FINDINGS, _IMPRESSIONS)):
        other = _FINDINGS[(i * 7) % len(_FINDINGS)]
        sentences.append(f"{view.capitalize()}. {finding.capitalize()}, and {other}. Impression: {impression}.")
    sentences += [f"Is there pneumonia? Answer normal or pneumonia.\n\nFindings: {finding.capitalize()}.\n"
                  f"Impression: {impression.capitalize()}." for finding, impression in zip(_FINDINGS, _IMPRESSIONS * 3)]
    return sentences


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Fix the initial weights without disturbing the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


TOKENIZER_ASSETS = Path(__file__).resolve().parent / "assets" / "tiny_tokenizers.json"


def _frozen(name: str, vocab_size: int, train) -> dict:
    """The trained tokenizer model stored in ``assets/``, or a fresh training when it is absent.

    The ``tokenizers`` trainers break frequency ties in hash-map order, which changes from process to process;
    reading the model trained once keeps token ids, and so every tiny model's outputs, identical across
    processes (a killed run resumes to the same result). ``python -m common.tiny`` rewrites the file.
    """
    key = f"{name}-{vocab_size}"
    if TOKENIZER_ASSETS.is_file():
        stored = json.loads(TOKENIZER_ASSETS.read_text())
        if key in stored:
            return stored[key]
    return train()


TOKENIZER_CORPORA = {"radiology": radiology_corpus}
"""Corpora a tiny tokenizer is trained on, by name; a pipeline declares its own (``Pipeline.tokenizer_corpora``,
e.g. the brain report text), found through ``common.pipelines`` when an asset is rebuilt."""


def _corpus(name: str) -> list[str]:
    if name in TOKENIZER_CORPORA:
        return TOKENIZER_CORPORA[name]()
    from common.pipelines import tokenizer_corpus

    return tokenizer_corpus(name)()


def _train(backend: Tokenizer, trainer, corpus: str = "radiology") -> dict:
    """Train ``backend``'s model in its own normalizer/pre-tokenizer pipeline and return the model as JSON."""
    backend.train_from_iterator(_corpus(corpus), trainer=trainer)
    return json.loads(backend.to_str())["model"]


def _merges(model_json: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]


@functools.cache
def _gemma_vocab(vocab_size: int, corpus: str = "radiology") -> tuple[dict[str, int], list[tuple[str, str]]]:
    name = "gemma" if corpus == "radiology" else f"gemma-{corpus}"
    model = _frozen(name, vocab_size, lambda: _train_gemma(vocab_size, corpus))
    return model["vocab"], _merges(model)


def _train_gemma(vocab_size: int, corpus: str = "radiology") -> dict:
    backend = GemmaTokenizer().backend_tokenizer
    backend.model = BPE(unk_token="<unk>", fuse_unk=True)
    specials = [*_GEMMA_SPECIAL.values(), *_GEMMA_TURN_TOKENS, *_GEMMA_IMAGE_TOKENS.values()]
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=_ALPHABET,
                         show_progress=False)
    if corpus != "radiology":
        # Gemma's own pre-tokenizer splits on " ", which its normalizer has already turned into "▁", so merges may
        # cross words ("in▁the▁right▁"). Learning them inside words keeps one piece per clinical word, as MedGemma's
        # vocabulary has it; encoding needs no change, as no learned merge spans a word boundary.
        backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_previous")
    return _train(backend, trainer, corpus)


def tiny_gemma_tokenizer(vocab_size: int = 700, corpus: str = "radiology") -> GemmaTokenizer:
    """A ``GemmaTokenizer`` with Gemma 3's turn and image tokens and chat template.

    The BPE alphabet is printable ASCII; other characters map to ``<unk>`` (Gemma falls back to bytes: their 256
    tokens are left out so that random weights generate word pieces rather than stray bytes). ``corpus`` names the
    text the pieces are learned from (``TOKENIZER_CORPORA``).
    """
    vocab, merges = _gemma_vocab(vocab_size, corpus)
    tokenizer = GemmaTokenizer(vocab=dict(vocab), merges=list(merges), **_GEMMA_SPECIAL,
                               extra_special_tokens=dict(_GEMMA_IMAGE_TOKENS), chat_template=GEMMA3_CHAT_TEMPLATE,
                               add_bos_token=True, model_max_length=2048)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False)
                          for t in (*_GEMMA_TURN_TOKENS, *_GEMMA_IMAGE_TOKENS.values())], special_tokens=True)
    return tokenizer


BRAIN_GEMMA_VOCAB = 1500
"""Pieces of ``tiny_gemma3_brain``'s tokenizer: enough for the words of brain MRI reports to be single pieces, as
they are in MedGemma's 262k-piece vocabulary (a phantom report of 79 words: 108 pieces with BOS; the 700-piece
radiology tokenizer cuts it into 249, mostly letters)."""


def tiny_gemma3(seed: int = 0, tokenizer: GemmaTokenizer | None = None, width: int = 64
                ) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A 2-layer Gemma 3 with a 2-layer SigLIP tower and the real ``Gemma3Processor``, in eval mode.

    It accepts exactly MedGemma's inputs: ``processor.apply_chat_template`` on messages holding an image, then
    ``model.generate``. The image is cut into 8x8 patches (64 px -> 64 patches) and pooled to 16 image tokens.
    ``tokenizer``: another tiny Gemma tokenizer (default: the 700-piece radiology one); ``width``: the LM's hidden
    size (heads of 32 dimensions, MLP twice as wide).
    """
    tokenizer = tokenizer if tokenizer is not None else tiny_gemma_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _GEMMA_IMAGE_TOKENS.items()}
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    mm_tokens = 16
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=width // 32, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
    )
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=TINY_GEMMA3_IMAGE_SIZE, patch_size=8, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          image_token_index=ids["image_token"])
    with _seeded(seed):
        model = Gemma3ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    image_processor = Gemma3ImageProcessor(
        size={"height": TINY_GEMMA3_IMAGE_SIZE, "width": TINY_GEMMA3_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=mm_tokens)
    return model, processor


def tiny_gemma3_brain(seed: int = 0) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """``tiny_gemma3`` with a tokenizer learned from brain MRI reports (``BRAIN_GEMMA_VOCAB`` pieces).

    The offline twin of MedGemma for the 3D brain report pipeline: a twin that spells "ventricular" in six letter
    pieces writes reports several times longer than MedGemma does, and a 2-layer LM loses the thread of them.
    """
    return tiny_gemma3(seed, tokenizer=tiny_gemma_tokenizer(BRAIN_GEMMA_VOCAB, corpus="brain"), width=128)


def tiny_gemma3_text(seed: int = 0, width: int = 64) -> tuple[Gemma3ForCausalLM, GemmaTokenizer]:
    """A 2-layer text-only ``Gemma3ForCausalLM`` with the 700-piece tiny Gemma tokenizer, in eval mode: the twin of
    ``gemma3-270m`` (same class, Gemma tokenizer class, test size)."""
    tokenizer = tiny_gemma_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=width // 32, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with _seeded(seed):
        model = Gemma3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _save_pair(model, processor, directory: Path) -> Path:
    """Write a model and its processor/tokenizer side by side, as a hub checkpoint is laid out."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


def save_tiny_gemma3(directory: Path, seed: int = 0) -> Path:
    """Write ``tiny_gemma3(seed)`` in Hugging Face format, loadable by ``common.hf`` like a hub checkpoint."""
    return _save_pair(*tiny_gemma3(seed), directory)


@functools.cache
def _clip_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = _frozen("clip", vocab_size, lambda: _train_clip(vocab_size))
    return model["vocab"], _merges(model)


def _train_clip(vocab_size: int) -> dict:
    backend = CLIPTokenizer().backend_tokenizer
    backend.model = BPE(end_of_word_suffix="</w>", continuing_subword_prefix="")
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(_CLIP_SPECIAL), end_of_word_suffix="</w>",
                         show_progress=False)
    return _train(backend, trainer)


def tiny_clip_tokenizer(vocab_size: int = 600) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` (lower-cased byte-level BPE, ``</w>`` word ends) padded to CLIP's 77 tokens."""
    vocab, merges = _clip_vocab(vocab_size)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def tiny_clip_text(seed: int = 0) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A 2-layer ``CLIPTextModel`` of width ``CLIP_TEXT_HIDDEN`` (64), in eval mode.

    ``pooler_output`` is the final hidden state at each text's end-of-text token, of size 64, as in CLIP.
    """
    tokenizer = tiny_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_TEXT_HIDDEN, intermediate_size=2 * CLIP_TEXT_HIDDEN,
        projection_dim=CLIP_TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        model = CLIPTextModel(config).eval()
    return model, tokenizer


def save_tiny_clip_text(directory: Path, seed: int = 0) -> Path:
    """Write ``tiny_clip_text(seed)`` (model and tokenizer) in Hugging Face format."""
    return _save_pair(*tiny_clip_text(seed), directory)


@functools.cache
def _bert_vocab(vocab_size: int) -> dict[str, int]:
    return _frozen("bert", vocab_size, lambda: _train_bert(vocab_size))["vocab"]


def _train_bert(vocab_size: int) -> dict:
    backend = BertTokenizer().backend_tokenizer
    backend.model = WordPiece(unk_token="[UNK]")
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(_BERT_SPECIAL), show_progress=False)
    return _train(backend, trainer)


TOKENIZER_TRAINERS = {"gemma-700": lambda: _train_gemma(700), "clip-600": lambda: _train_clip(600),
                      "bert-500": lambda: _train_bert(500),
                      f"gemma-brain-{BRAIN_GEMMA_VOCAB}": lambda: _train_gemma(BRAIN_GEMMA_VOCAB, "brain")}


def write_tokenizer_assets(retrain: bool = False) -> Path:
    """Train the tiny tokenizers missing from the stored file (all of them with ``retrain``) and store them.

    A retrained tokenizer may number its pieces differently (see ``_frozen``), which changes every tiny model
    built on it, so the stored ones are kept unless asked.
    """
    from common.rundir import atomic_write_json

    stored = json.loads(TOKENIZER_ASSETS.read_text()) if TOKENIZER_ASSETS.is_file() and not retrain else {}
    models = {key: stored[key] if key in stored else train() for key, train in TOKENIZER_TRAINERS.items()}
    return atomic_write_json(TOKENIZER_ASSETS, models)


def tiny_bert_tokenizer(vocab_size: int = 500) -> BertTokenizer:
    """A ``BertTokenizer`` (lower-cased WordPiece with ``[CLS] ... [SEP]``)."""
    return BertTokenizer(vocab=dict(_bert_vocab(vocab_size)), model_max_length=128)


def tiny_bert(seed: int = 0) -> tuple[BertModel, BertTokenizer]:
    """A 2-layer ``BertModel`` of width 64 (``pooler_output`` 64-d), in eval mode."""
    tokenizer = tiny_bert_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                        pad_token_id=tokenizer.pad_token_id)
    with _seeded(seed):
        model = BertModel(config).eval()
    return model, tokenizer


def save_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """Write ``tiny_bert(seed)`` (model and tokenizer) in Hugging Face format."""
    return _save_pair(*tiny_bert(seed), directory)


MEDGEMMA_4B_PARAMETERS = 4.3e9
"""Parameter count of ``google/medgemma-4b-it`` as its model card states it (4.3B, to two digits)."""


def medgemma_4b_config() -> Gemma3Config:
    """The published architecture of ``google/medgemma-4b-it`` (identical to ``google/gemma-3-4b-it``).

    Text: Gemma 3, hidden 2560, 34 layers, 8 query / 4 key-value heads of 256, MLP 10240, vocabulary 262,208,
    a sliding window of 1024 on five layers of six (every sixth global), RoPE theta 1e6 (global, linear
    scaling x8) and 1e4 (local). Vision: SigLIP so400m/14 at 896 px (27 layers, width 1152, MLP 4304, 16 heads),
    no pooling head; 4096 patches are average-pooled to 256 tokens per image.
    """
    text = Gemma3TextConfig(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
        sliding_window=1024, sliding_window_pattern=6,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106],
    )
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=255_999,
                        eoi_token_index=256_000, image_token_index=262_144)


def get_args_parser():
    """``python -m common.tiny``: train the tokenizers missing from the frozen assets (when a tiny vocabulary is
    added or changed)."""
    from common.cli import MedvlArgumentParser

    parser = MedvlArgumentParser(prog="python -m common.tiny", description=get_args_parser.__doc__)
    parser.add_argument("--retrain", action="store_true",
                        help="retrain every tokenizer, not only the missing ones (renumbers their pieces)")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    print(f"wrote {write_tokenizer_assets(retrain=args.retrain)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
