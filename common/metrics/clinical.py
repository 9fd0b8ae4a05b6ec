"""Clinical keyword F1 of brain MRI reports (laterality, anatomy, pathology), in the seed's way and a corrected way.

    python -c "from common.metrics.clinical import clinical_f1; print(clinical_f1(['No edema.'], ['Left edema.']))"

A report generator can score well on BLEU while naming the wrong hemisphere, so the decisive words are scored on
their own: per report, the set of keywords of a category in the candidate is compared with the set in the
reference (precision, recall, F1), and the F1 values are averaged over reports.

``mode="seed"`` reproduces ``ClinicalMetrics`` of BrainGemma3D's ``braingemma3d_evaluation.py`` exactly, so numbers
can be set beside the published ones: singular keywords only ("ventricles", "ventricular" and "cerebellar" never
match), "no edema" counts as edema, and a reference without keywords scores 1.0 when the candidate has none too
(0.0 otherwise), which lets templated healthy controls inflate every average.

``mode="corrected"`` matches word forms of the same concepts, ignores negated pathology ("no edema", "without
enhancement", "no evidence of ... edema", "compression is not observed"), and leaves out of a category the reports
whose reference names nothing of it, reporting how many were left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

MODES = ("corrected", "seed")
CATEGORIES = ("lat", "anat", "path")
"""Key prefixes: laterality, anatomy, pathology."""

SEED_KEYWORDS: dict[str, tuple[str, ...]] = {
    "lat": ("left", "right", "bilateral"),
    "anat": ("frontal", "parietal", "temporal", "occipital", "cerebellum", "ventricle", "periventricular"),
    "path": ("edema", "necrosis", "enhancement", "compression", "tumor", "mass", "lesion"),
}
"""The seed's keyword lists, in its order."""

_SEED_STRIPPED = ".,;!?()"

WORD_FORMS: dict[str, dict[str, str]] = {
    "lat": {"left": "left", "right": "right", "bilateral": "bilateral", "bilaterally": "bilateral"},
    "anat": {
        "frontal": "frontal", "fronto": "frontal",
        "parietal": "parietal", "parieto": "parietal",
        "temporal": "temporal", "temporo": "temporal",
        "occipital": "occipital", "occipito": "occipital",
        "cerebellum": "cerebellum", "cerebellar": "cerebellum", "cerebella": "cerebellum",
        "ventricle": "ventricle", "ventricles": "ventricle", "ventricular": "ventricle",
        "intraventricular": "ventricle",
        "periventricular": "periventricular",
    },
    "path": {
        "edema": "edema", "oedema": "edema", "edematous": "edema", "oedematous": "edema",
        "necrosis": "necrosis", "necrotic": "necrosis", "necroses": "necrosis",
        "enhancement": "enhancement", "enhancing": "enhancement", "enhanced": "enhancement",
        "enhances": "enhancement", "enhance": "enhancement",
        "compression": "compression", "compressed": "compression", "compressive": "compression",
        "compressing": "compression", "compresses": "compression", "compress": "compression",
        "tumor": "tumor", "tumour": "tumor", "tumors": "tumor", "tumours": "tumor",
        "mass": "mass", "masses": "mass",
        "lesion": "lesion", "lesions": "lesion",
    },
}
"""Corrected mode: word form -> the seed keyword (concept) it stands for."""

_LOBE_COMPOUND = re.compile(r"(?:fronto|parieto|temporo|occipito)+(?:frontal|parietal|temporal|occipital)")
_LOBE_PART = re.compile(r"fronto|parieto|temporo|occipito|frontal|parietal|temporal|occipital")

ABNORMALITY_WORDS = frozenset({"abnormal", "abnormality", "abnormalities", "hyperintense", "hyperintensity",
                               "hyperintensities"})
"""Words that state a lesion without naming a pathology keyword ("abnormal signal in the left frontal lobe")."""

NEGATION_WINDOW = 5
"""Most words between a negation trigger and the finding it negates: NegEx (Chapman et al. 2001) looks five words
ahead, so that a negation early in a long sentence does not reach unrelated findings."""

_PRE_NEGATIONS = (("no",), ("without",), ("neither",), ("nor",), ("absence", "of"), ("free", "of"),
                  ("negative", "for"), ("rule", "out"), ("ruled", "out"))
_POST_NEGATION_VERBS = frozenset({"observed", "seen", "evident", "identified", "present", "detected",
                                  "demonstrated", "visible", "noted", "apparent", "appreciated", "found", "shown"})
_TERMINATIONS = frozenset({"but", "however", "although", "though", "except", "whereas", "while", "yet", "which",
                           "indicating", "suggesting"})
_CLAUSE_END = frozenset(".;:!?")
_LIST_WORDS = frozenset({"or", "and", "nor"})
_TOKEN = re.compile(r"[a-z]+|[.;:!?]")


def _check_texts(name: str, texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of strings, not a single string")
    if not len(texts):
        raise ValueError(f"no reports to score: {name} is empty")
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise ValueError(f"{name}[{bad}] is {type(texts[bad]).__name__}, expected a string")


def _check_pairs(candidates: Sequence[str], references: Sequence[str]) -> None:
    if not isinstance(candidates, str) and not isinstance(references, str) and len(candidates) != len(references):
        raise ValueError(f"candidates and references differ in length: {len(candidates)} vs {len(references)}")
    _check_texts("candidates", candidates)
    _check_texts("references", references)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def _seed_findings(text: str) -> dict[str, frozenset[str]]:
    """The seed's ``extract_entities``: lowercase, ``.,;!?()`` -> space, keyword between two spaces."""
    text = text.lower()
    for char in _SEED_STRIPPED:
        text = text.replace(char, " ")
    padded = f" {text} "
    return {cat: frozenset(kw for kw in keywords if f" {kw} " in padded) for cat, keywords in SEED_KEYWORDS.items()}


def _concepts(word: str) -> list[tuple[str, str]]:
    """(category, concept) pairs a word names; lobe compounds ("frontoparietal") name each lobe."""
    found = [(cat, forms[word]) for cat, forms in WORD_FORMS.items() if word in forms]
    if not found and _LOBE_COMPOUND.fullmatch(word):
        found = [("anat", WORD_FORMS["anat"][part]) for part in _LOBE_PART.findall(word)]
    return found


def _in_list(word: str) -> bool:
    """A word that continues a negated list of findings ("no edema, necrosis or ventricular compression")."""
    return word in _LIST_WORDS or bool(_concepts(word)) or word in ABNORMALITY_WORDS


def _negated(tokens: list[str], index: int) -> bool:
    """Whether the word at ``index`` lies in the scope of a negation within its clause.

    A trigger before it ("no", "without", "absence of" ...; "not" right before it) or a verb phrase after it ("is
    not observed", "is not clearly demonstrated", "is absent") negates it when at most ``NEGATION_WINDOW`` words
    separate them and none of those is a clause end (``.;:!?``) or a termination word ("but", "however",
    "indicating" ...). Before the word, the other members of a list of findings and its conjunctions do not count
    towards the window, so a negation covers its whole list ("no evidence of tumor, edema or ventricular
    compression").
    """
    if tokens[max(0, index - 1):index] == ["not"] or (
            index >= 2 and tokens[index - 2] == "not" and tokens[index - 1].endswith("ly")):
        return True  # "the ventricles are not compressed", "not clearly enhancing"
    start, counted = index, 0
    while start > 0 and counted < NEGATION_WINDOW + 2:
        previous = tokens[start - 1]
        if previous in _CLAUSE_END or previous in _TERMINATIONS:
            break
        start -= 1
        counted += not _in_list(previous)
    before = tokens[start:index]
    for trigger in _PRE_NEGATIONS:
        for pos in range(len(before) - len(trigger) + 1):
            words_between = sum(not _in_list(w) for w in before[pos + len(trigger):])
            if tuple(before[pos:pos + len(trigger)]) == trigger and words_between <= NEGATION_WINDOW:
                return True
    for offset in range(1, NEGATION_WINDOW + 2):
        pos = index + offset
        if pos >= len(tokens) or tokens[pos] in _CLAUSE_END or tokens[pos] in _TERMINATIONS:
            return False
        if tokens[pos] == "absent":
            return True
        if tokens[pos] == "not":
            following = tokens[pos + 1:pos + 3]
            if following[:1] and following[0] in _POST_NEGATION_VERBS:
                return True
            if len(following) == 2 and following[0].endswith("ly") and following[1] in _POST_NEGATION_VERBS:
                return True
    return False


def _corrected_findings(text: str) -> tuple[dict[str, frozenset[str]], bool]:
    """Concepts per category (pathology only where not negated) and whether an abnormality word is asserted."""
    tokens = _TOKEN.findall(text.lower())
    found: dict[str, set[str]] = {cat: set() for cat in CATEGORIES}
    abnormal = False
    for index, word in enumerate(tokens):
        concepts = _concepts(word)
        # Negation is applied to findings only: a location word in a negated clause still places the finding that
        # the report asserts ("edema without enhancement in the left frontal lobe").
        if any(cat == "path" for cat, _ in concepts) or word in ABNORMALITY_WORDS:
            if _negated(tokens, index):
                continue
            abnormal = abnormal or word in ABNORMALITY_WORDS
        for cat, concept in concepts:
            found[cat].add(concept)
    return {cat: frozenset(values) for cat, values in found.items()}, abnormal


NEGATION_CUES = frozenset({"no", "not", "without", "neither", "nor", "absence", "absent"})
"""The one-word negation cues of the corrected mode: they decide whether a finding (and a lesion) is stated."""


def keyword_spans(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the words the corrected mode reads, in order: clinical concepts (any
    category, any word form, lobe compounds; negated or not), abnormality words and negation cues. These are the
    words a report generator must get right ("No focal lesion" is the first word of a healthy report)."""
    if not isinstance(text, str):
        raise ValueError(f"a report must be a string, got {type(text).__name__}")
    return [(m.start(), m.end()) for m in re.finditer(r"[a-z]+", text.lower())
            if _concepts(m.group()) or m.group() in ABNORMALITY_WORDS or m.group() in NEGATION_CUES]


def extract_findings(text: str, mode: str = "corrected") -> dict[str, frozenset[str]]:
    """The keywords (seed) or concepts (corrected, named by the seed's keywords) a report states, per category.

    Args:
        text: one report.
        mode: ``"corrected"`` or ``"seed"``.

    Returns:
        ``{"lat": {...}, "anat": {...}, "path": {...}}``, e.g. ``{"lat": {"left"}, "anat": {"frontal"}, ...}``.
    """
    _check_mode(mode)
    if not isinstance(text, str):
        raise ValueError(f"a report must be a string, got {type(text).__name__}")
    return _seed_findings(text) if mode == "seed" else _corrected_findings(text)[0]


def _f1(reference: frozenset[str], candidate: frozenset[str]) -> float:
    true_positives = len(reference & candidate)
    if true_positives == 0:
        return 0.0
    precision, recall = true_positives / len(candidate), true_positives / len(reference)
    return 2 * precision * recall / (precision + recall)


def _suffix(mode: str) -> str:
    return "_seed" if mode == "seed" else ""


def clinical_per_case(candidates: Sequence[str], references: Sequence[str],
                      mode: str = "corrected") -> dict[str, list[float]]:
    """Per-report F1 of each category, for per-case tables and bootstrap resampling.

    Args:
        candidates: generated reports.
        references: the radiologists' reports, in the same order.
        mode: ``"corrected"`` or ``"seed"``.

    Returns:
        ``lat_f1, anat_f1, path_f1`` (corrected; ``nan`` where the reference names nothing of the category) or
        ``lat_f1_seed, anat_f1_seed, path_f1_seed`` (seed; 1.0 where both name nothing, 0.0 where only the
        candidate does). :func:`clinical_f1` is the ``nanmean`` of each list.

    Raises:
        ValueError: on an unknown mode, lists of different lengths, empty lists or a non-string report.
    """
    _check_mode(mode)
    _check_pairs(candidates, references)
    out: dict[str, list[float]] = {f"{cat}_f1{_suffix(mode)}": [] for cat in CATEGORIES}
    for candidate, reference in zip(candidates, references):
        found_candidate, found_reference = extract_findings(candidate, mode), extract_findings(reference, mode)
        for cat in CATEGORIES:
            ref_set, cand_set = found_reference[cat], found_candidate[cat]
            if not ref_set:
                value = (1.0 if not cand_set else 0.0) if mode == "seed" else math.nan
            else:
                value = _f1(ref_set, cand_set)
            out[f"{cat}_f1{_suffix(mode)}"].append(value)
    return out


def clinical_f1(candidates: Sequence[str], references: Sequence[str], mode: str = "corrected") -> dict[str, float]:
    """Laterality, anatomy and pathology F1 averaged over reports.

    Args:
        candidates: generated reports.
        references: the radiologists' reports, in the same order.
        mode: ``"corrected"`` (word forms, negation, exclusion) or ``"seed"`` (BrainGemma3D's rules exactly).

    Returns:
        corrected: ``lat_f1, anat_f1, path_f1`` (``nan`` when every reference lacks the category) and
        ``lat_excluded, anat_excluded, path_excluded``, the number of reports left out of each category;
        seed: ``lat_f1_seed, anat_f1_seed, path_f1_seed``.

    Raises:
        ValueError: on an unknown mode, lists of different lengths, empty lists or a non-string report.
    """
    per_case = clinical_per_case(candidates, references, mode)
    out: dict[str, float] = {}
    for key, values in per_case.items():
        array = np.asarray(values, dtype=float)
        included = ~np.isnan(array)
        out[key] = float(array[included].mean()) if included.any() else math.nan
        if mode == "corrected":
            out[key.replace("_f1", "_excluded")] = int((~included).sum())
    return out


def states_lesion(text: str) -> bool:
    """Whether a report asserts a lesion: a pathology concept or an abnormality word that is not negated.

    "No focal abnormalities are identified" and "The brain parenchyma appears within normal limits" state none;
    "Edema surrounds a left frontal mass" and "abnormal signal in the left frontal lobe" state one.
    """
    if not isinstance(text, str):
        raise ValueError(f"a report must be a string, got {type(text).__name__}")
    findings, abnormal = _corrected_findings(text)
    return abnormal or bool(findings["path"])


def lesion_detection(candidates: Sequence[str], is_healthy: Sequence[bool]) -> dict[str, float]:
    """Healthy specificity and tumour sensitivity of the generated reports, as lesion present / absent calls.

    Args:
        candidates: generated reports.
        is_healthy: per report, whether the case is a healthy control (``False``: a tumour case).

    Returns:
        ``healthy_specificity`` (share of healthy controls whose report states no lesion), ``tumour_sensitivity``
        (share of tumour cases whose report states one), each ``nan`` without cases of its kind, and
        ``n_healthy, n_tumour``. Per case, the call is :func:`states_lesion`.

    Raises:
        ValueError: on lists of different lengths, empty lists or a non-string report.
    """
    _check_texts("candidates", candidates)
    if len(candidates) != len(is_healthy):
        raise ValueError(f"candidates and is_healthy differ in length: {len(candidates)} vs {len(is_healthy)}")
    stated = np.array([states_lesion(text) for text in candidates], dtype=bool)
    healthy = np.array([bool(flag) for flag in is_healthy], dtype=bool)
    n_healthy, n_tumour = int(healthy.sum()), int((~healthy).sum())
    return {
        "healthy_specificity": float((~stated[healthy]).mean()) if n_healthy else math.nan,
        "tumour_sensitivity": float(stated[~healthy].mean()) if n_tumour else math.nan,
        "n_healthy": n_healthy,
        "n_tumour": n_tumour,
    }


__all__ = ["ABNORMALITY_WORDS", "CATEGORIES", "MODES", "NEGATION_CUES", "NEGATION_WINDOW", "SEED_KEYWORDS",
           "WORD_FORMS", "clinical_f1", "clinical_per_case", "extract_findings", "keyword_spans", "lesion_detection",
           "states_lesion"]
