import math

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from rouge_score import rouge_scorer

from common.metrics.text import (
    JAVA_NOTE,
    BertScoreModel,
    TextScorer,
    corpus_scores,
    java_available,
    ptb_like_tokens,
    text_metrics,
    tokenize_pairs,
)
from common.presets import minilm_dir

needs_java = pytest.mark.skipif(not java_available(), reason="pycocoevalcap's PTB tokenizer and METEOR need java")

REFERENCES = [
    "The lesion area is in the left frontal lobe with mixed high and low signals.",
    "Edema is mainly observed around the right parietal lobe, indicating significant swelling.",
    "Necrosis appears as low signal regions (central) within the lesion.",
    "Ventricular compression is seen in the lateral ventricles with a mild midline shift.",
    "The brain parenchyma appears within normal limits on this FLAIR MRI.",
    "The tumor's enhancing rim surrounds a necrotic core in the left temporal lobe.",
]
CANDIDATES = [
    "The lesion area is in the left frontal and parietal lobes with mixed signals.",
    "Edema is observed around the right parietal lobe, suggesting tissue swelling.",
    "Necrosis is seen as low signal areas within the lesion.",
    "Ventricular compression is not observed.",
    "The brain parenchyma appears normal on this FLAIR MRI.",
    "An enhancing rim surrounds the necrotic core of the left temporal tumor.",
]
SHUFFLED = CANDIDATES[1:] + CANDIDATES[:1]
SEED_WEIGHTS = {"bleu1_seed": (1, 0, 0, 0), "bleu2_seed": (0.5, 0.5, 0, 0), "bleu3_seed": (1 / 3, 1 / 3, 1 / 3, 0),
                "bleu4_seed": (0.25, 0.25, 0.25, 0.25)}


@pytest.fixture(scope="module")
def scorer():
    # Built by the first test, so METEOR's JVM loads its paraphrase table while the Python-only metrics run.
    with TextScorer(bertscore="minilm") as text_scorer:
        yield text_scorer


@pytest.fixture(scope="module")
def result(scorer):
    return scorer.evaluate(CANDIDATES, REFERENCES)


@pytest.fixture(scope="module")
def ptb_tokens():
    """pycocoevalcap's PTBTokenizer called directly on candidates then references, in one JVM run."""
    texts = CANDIDATES + REFERENCES
    tokens = PTBTokenizer().tokenize({str(i): [{"caption": text}] for i, text in enumerate(texts)})
    tokens = [tokens[str(i)][0] for i in range(len(texts))]
    return tokens[:len(CANDIDATES)], tokens[len(CANDIDATES):]


def test_seed_bleu_and_rouge_l_are_nltk_and_rouge_score(scorer):
    per_case = scorer.pair_scores(CANDIDATES, REFERENCES)
    smoothing = SmoothingFunction().method1
    for key, weights in SEED_WEIGHTS.items():
        expected = [sentence_bleu([r.lower().split()], c.lower().split(), weights=weights,
                                  smoothing_function=smoothing) for c, r in zip(CANDIDATES, REFERENCES)]
        assert per_case[key] == pytest.approx(expected, abs=1e-12), key
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [rouge.score(r, c)["rougeL"].fmeasure for c, r in zip(CANDIDATES, REFERENCES)]
    assert per_case["rougeL"] == pytest.approx(expected, abs=1e-12)


def test_bertscore_is_bert_score_with_the_named_model(result):
    import bert_score  # imported here, not at collection, so the import overlaps METEOR's start-up

    assert [key for key in result.scores if key.startswith("bertscore")] == ["bertscore_f1_minilm"]
    _, _, f1 = bert_score.score(CANDIDATES, REFERENCES, model_type=str(minilm_dir()), num_layers=6)
    assert result.per_case["bertscore_f1_minilm"] == pytest.approx(f1.tolist(), abs=1e-5)
    assert result.notes["bertscore"] == "used minilm"


@needs_java
def test_tokens_are_pycocoevalcap_ptb_tokens(result, ptb_tokens):
    assert result.pairs.tokenizer == "ptb"
    assert (list(result.pairs.candidates), list(result.pairs.references)) == ptb_tokens
    assert "-lrb- central -rrb-" in result.pairs.references[2] and "tumor 's" in result.pairs.references[5]
    # the pure-Python stand-in for machines without java gives the same tokens on these reports
    assert [ptb_like_tokens(text) for text in CANDIDATES + REFERENCES] == ptb_tokens[0] + ptb_tokens[1]


def test_corpus_scores_on_a_resample_match_pycocoevalcap(result):
    pairs = result.pairs
    indices = [0, 0, 2, 3, 5]  # a bootstrap resample: repeats count twice
    gts = {str(k): [pairs.references[i]] for k, i in enumerate(indices)}
    res = {str(k): [pairs.candidates[i]] for k, i in enumerate(indices)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    got = corpus_scores(pairs, indices)
    assert [got[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert got["cider"] == pytest.approx(cider, abs=1e-12)
    assert got != corpus_scores(pairs)


@needs_java
def test_every_key_equals_its_library(scorer, result, ptb_tokens):
    candidates, references = ptb_tokens
    gts = {str(i): [r] for i, r in enumerate(references)}
    res = {str(i): [c] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_cases = Cider().compute_score(gts, res)
    meteor, meteor_cases = scorer.meteor_scorer.compute_score(gts, res)
    expected = {f"bleu{n}": bleu[n - 1] for n in range(1, 5)} | {"cider": cider, "meteor": meteor}
    # the per-report metrics, each checked against its library above, enter as their means
    expected |= {key: sum(values) / len(values) for key, values in result.per_case.items()
                 if key not in ("cider", "meteor_segment")}
    assert set(result.scores) == set(expected)
    for key, value in expected.items():
        assert result.scores[key] == pytest.approx(value, abs=1e-9), key
    assert result.per_case["cider"] == pytest.approx(list(cider_cases), abs=1e-12)
    assert result.per_case["meteor_segment"] == pytest.approx(meteor_cases, abs=1e-12)
    assert 0 < result.scores["meteor"] < 1 and result.scores["bleu4"] < result.scores["bleu1"] < 1


@needs_java
def test_identical_pairs_score_the_maximum(scorer, result):
    same = scorer.evaluate(REFERENCES, REFERENCES).scores
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", *SEED_WEIGHTS):
        assert same[key] == pytest.approx(1.0, abs=1e-9), key
    assert same["bertscore_f1_minilm"] == pytest.approx(1.0, abs=1e-5)
    assert same["cider"] > result.scores["cider"]  # CIDEr has no fixed maximum (its idf depends on the corpus)


def test_shuffled_pairing_scores_lower_on_every_key(scorer, result):
    shuffled = scorer.evaluate(SHUFFLED, REFERENCES).scores
    assert set(shuffled) == set(result.scores)
    for key, value in result.scores.items():
        assert shuffled[key] < value, key


def test_empty_candidate_scores_zero_without_crashing(scorer):
    got = scorer.evaluate(["", CANDIDATES[1], "   "], [REFERENCES[0], REFERENCES[1], ""])
    for key, values in got.per_case.items():
        assert values[0] == 0.0 and values[2] == 0.0, key
        assert values[1] > 0, key
    assert all(math.isfinite(value) for value in got.scores.values())


def test_without_java_meteor_is_left_out_and_noted(monkeypatch, tmp_path, result):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH: any call to it would fail
    assert not java_available()
    with TextScorer(bertscore=None) as no_java:
        got = no_java.evaluate(CANDIDATES, REFERENCES)
    assert "meteor" not in got.scores and "meteor_segment" not in got.per_case
    assert got.notes["meteor"] == JAVA_NOTE == "skipped: needs java"
    assert "needs java" in got.notes["tokenizer"]
    assert tokenize_pairs(CANDIDATES, REFERENCES).tokenizer == "ptb_like"
    # these reports tokenize alike either way, so BLEU and CIDEr do not move
    for key in ("bleu1", "bleu4", "cider", "rougeL", "bleu4_seed"):
        assert got.scores[key] == pytest.approx(result.scores[key], abs=1e-12), key
    assert "meteor" not in text_metrics(CANDIDATES[:2], REFERENCES[:2], bertscore=None)


def test_auto_bertscore_falls_back_to_the_named_offline_model(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("roberta-base", "config.json"), str):
        pytest.skip("roberta-base is in the local cache, so auto uses it")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with TextScorer(bertscore="auto", meteor=False) as auto:
        assert auto.bertscore_model.name == "minilm"
        note = auto.notes["bertscore"]
        assert note.startswith("roberta-base unavailable") and note.endswith("used minilm")
        assert list(auto.pair_scores(CANDIDATES[:1], REFERENCES[:1])) == [*SEED_WEIGHTS, "rougeL",
                                                                          "bertscore_f1_minilm"]


def test_roberta_code_path_runs_on_a_tokenizer_without_max_length(tmp_path):
    # roberta-base goes through bert-score's RoBERTa branch (prefix space, truncation at model_max_length); a tiny
    # RoBERTa whose tokenizer config omits model_max_length exercises both offline.
    import bert_score
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(REFERENCES * 4, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    tokenizer = RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tokenizer.save_pretrained(tmp_path)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, pad_token_id=1)
    RobertaModel(config).save_pretrained(tmp_path)
    model = BertScoreModel("tiny-roberta", str(tmp_path), 2, "tiny_roberta")
    with TextScorer(bertscore=model, meteor=False) as tiny:
        got = tiny.pair_scores(CANDIDATES, REFERENCES)["bertscore_f1_tiny_roberta"]
    direct = bert_score.BERTScorer(model_type=str(tmp_path), num_layers=2)
    direct._tokenizer.model_max_length = 512
    assert got == pytest.approx(direct.score(CANDIDATES, REFERENCES)[2].tolist(), abs=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: text_metrics(["a"], ["a", "b"]), "differ in length"),
    (lambda: text_metrics([], []), "empty"),
    (lambda: text_metrics(["a", None], ["a", "b"]), r"candidates\[1\]"),
    (lambda: text_metrics("a", "a"), "not a single string"),
    (lambda: TextScorer(bertscore="bert-large"), "unknown bertscore"),
    (lambda: corpus_scores(tokenize_pairs(["a"], ["a"], use_java=False), [1]), "indices must lie in 0..0"),
    (lambda: corpus_scores(tokenize_pairs(["a"], ["a"], use_java=False), []), "no reports"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
