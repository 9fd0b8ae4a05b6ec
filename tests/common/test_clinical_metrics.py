import json
import math

import numpy as np
import pytest

from common.metrics.clinical import (
    SEED_KEYWORDS,
    clinical_f1,
    clinical_per_case,
    extract_findings,
    lesion_detection,
    states_lesion,
)

# Five hand-written pairs; the sets each mode finds are written beside each case, the arithmetic below.
REFERENCES = [
    # A  seed:      lat {left}  anat {frontal}             path {lesion, edema, compression}
    #    corrected: lat {left}  anat {frontal, ventricle}  path {lesion, edema}  ("compression is not observed")
    "The lesion is in the left frontal lobe. Edema surrounds it. Ventricular compression is not observed.",
    # B  healthy: nothing in any category, either mode
    "No focal abnormalities are identified on this FLAIR MRI examination.",
    # C  healthy: nothing in any category, either mode
    "Normal brain appearance is noted on this FLAIR sequence.",
    # D  seed:      lat {right}  anat {ventricle}              path {edema, compression, necrosis}
    #    corrected: lat {right}  anat {cerebellum, ventricle}  path {edema, compression}  ("no necrosis")
    "Edema in the right cerebellar hemisphere with compression of the fourth ventricle; no necrosis.",
    # E  seed:      lat {bilateral}  anat {frontal}  path {edema}  ("lesions" is not "lesion")
    #    corrected: lat {bilateral}  anat {frontal}  path {lesion, edema}
    "Bilateral frontal lesions with edema.",
]
CANDIDATES = [
    # A  seed:      lat {left}  anat {frontal, parietal}             path {lesion, edema, necrosis}
    #    corrected: lat {left}  anat {frontal, parietal, ventricle}  path {lesion, edema, necrosis, compression}
    "A lesion in the left frontal and parietal lobes with edema and necrosis; the ventricles are compressed.",
    # B  nothing, either mode
    "The brain parenchyma appears within normal limits on this FLAIR MRI.",
    # C  seed:      lat {right}  anat {temporal}  path {mass, enhancement}
    #    corrected: lat {right}  anat {temporal}  path {mass}  ("without enhancement")
    "There is a mass in the right temporal lobe without enhancement.",
    # D  seed:      lat {right}  anat {cerebellum}             path {edema}  ("tumour", "compresses" never match)
    #    corrected: lat {right}  anat {cerebellum, ventricle}  path {tumor, compression}  ("No edema")
    "No edema. Right cerebellum tumour compresses the ventricles.",
    # E  seed:      lat {left}  anat {frontal}  path {lesion, edema}  ("edema is absent" still counts)
    #    corrected: lat {left}  anat {frontal}  path {lesion}
    "Left frontal lesion; edema is absent.",
]


def test_seed_mode_by_hand():
    # per case (lat, anat, path):
    #   A: 1;  anat P=1/2 R=1 -> 2/3;  path tp=2 P=2/3 R=2/3 -> 2/3
    #   B: empty reference and empty candidate -> 1, 1, 1
    #   C: empty reference, candidate names something -> 0, 0, 0
    #   D: 1;  anat tp=0 -> 0;  path tp=1 P=1 R=1/3 -> 2*(1/3)/(4/3) = 1/2
    #   E: lat tp=0 -> 0;  anat 1;  path tp=1 P=1/2 R=1 -> 2/3
    got = clinical_f1(CANDIDATES, REFERENCES, mode="seed")
    assert set(got) == {"lat_f1_seed", "anat_f1_seed", "path_f1_seed"}
    assert got["lat_f1_seed"] == pytest.approx((1 + 1 + 0 + 1 + 0) / 5)  # 3/5
    assert got["anat_f1_seed"] == pytest.approx((2 / 3 + 1 + 0 + 0 + 1) / 5)  # 8/15
    assert got["path_f1_seed"] == pytest.approx((2 / 3 + 1 + 0 + 1 / 2 + 2 / 3) / 5)  # 17/30


def test_corrected_mode_by_hand():
    # B and C have references without keywords: left out of every category (2 excluded each).
    #   A: lat 1;  anat tp=2 P=2/3 R=1 -> 4/5;  path tp=2 P=2/4 R=1 -> 2/3
    #   D: lat 1;  anat 1;  path tp=1 (compression) P=1/2 R=1/2 -> 1/2
    #   E: lat 0;  anat 1;  path tp=1 P=1 R=1/2 -> 2/3
    got = clinical_f1(CANDIDATES, REFERENCES, mode="corrected")
    assert got["lat_f1"] == pytest.approx((1 + 1 + 0) / 3)  # 2/3
    assert got["anat_f1"] == pytest.approx((4 / 5 + 1 + 1) / 3)  # 14/15
    assert got["path_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)  # 11/18
    assert got["lat_excluded"] == got["anat_excluded"] == got["path_excluded"] == 2
    assert clinical_f1(CANDIDATES, REFERENCES) == got  # corrected is the default


def test_per_case_values_average_to_the_totals():
    per_case = clinical_per_case(CANDIDATES, REFERENCES)
    assert [math.isnan(v) for v in per_case["path_f1"]] == [False, True, True, False, False]
    assert per_case["anat_f1"][0] == pytest.approx(0.8)
    totals = clinical_f1(CANDIDATES, REFERENCES)
    for key, values in per_case.items():
        assert np.nanmean(values) == pytest.approx(totals[key])
    seed = clinical_per_case(CANDIDATES, REFERENCES, mode="seed")
    assert seed["lat_f1_seed"] == [1.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("text, pathology", [
    ("No edema.", set()),
    ("Without enhancement.", set()),
    ("There is no evidence of surrounding edema.", set()),
    ("No clear signs of deformation or compression.", set()),
    ("Neither edema nor necrosis.", set()),
    ("Absence of enhancement.", set()),
    ("Ventricular compression is not observed.", set()),
    ("Necrosis is not clearly demonstrated.", set()),
    ("Edema is absent.", set()),
    ("The ventricles are not compressed.", set()),
    ("There is no evidence of tumor, edema or ventricular compression.", set()),  # a negated list, to its end
    ("There is no edema, necrosis or enhancement to suggest a tumor.", set()),
    ("No mass is seen in the region of the temporal lobe near the edema.", {"edema"}),  # too far, not a list
    ("No midline shift, but edema is present.", {"edema"}),  # "but" ends the negation
    ("No necrosis. Edema is seen in the left frontal lobe.", {"edema"}),  # so does the sentence
    ("Edema is not limited to the frontal lobe.", {"edema"}),  # "not limited" negates nothing
])
def test_negated_findings_do_not_count(text, pathology):
    assert extract_findings(text)["path"] == pathology
    # the seed counts every keyword, negated or not
    padded = " " + "".join(" " if c in ".,;!?()" else c for c in text.lower()) + " "
    assert extract_findings(text, mode="seed")["path"] == {w for w in SEED_KEYWORDS["path"] if f" {w} " in padded}


def test_negation_leaves_locations_of_the_finding():
    found = extract_findings("Edema without enhancement in the left frontal lobe.")
    assert found == {"lat": {"left"}, "anat": {"frontal"}, "path": {"edema"}}


@pytest.mark.parametrize("text, category, corrected, seed", [
    ("the ventricles", "anat", {"ventricle"}, set()),
    ("ventricular compression", "anat", {"ventricle"}, set()),
    ("a cerebellar lesion", "anat", {"cerebellum"}, set()),
    ("periventricular edema", "anat", {"periventricular"}, {"periventricular"}),
    ("a frontoparietal lesion", "anat", {"frontal", "parietal"}, set()),
    ("a fronto-parietal lesion", "anat", {"frontal", "parietal"}, set()),
    ("temporo-occipital", "anat", {"temporal", "occipital"}, set()),
    ("multiple tumours", "path", {"tumor"}, set()),
    ("necrotic core", "path", {"necrosis"}, set()),
    ("enhancing rim", "path", {"enhancement"}, set()),
    ("lesions", "path", {"lesion"}, set()),
    ("bilaterally", "lat", {"bilateral"}, set()),
    ("Left-sided", "lat", {"left"}, set()),  # the seed splits words on spaces only
    ("left\nfrontal", "lat", {"left"}, set()),  # ... not on line breaks
    ("(left)", "lat", {"left"}, {"left"}),  # but strips .,;!?()
])
def test_word_forms(text, category, corrected, seed):
    assert extract_findings(text)[category] == corrected
    assert extract_findings(text, mode="seed")[category] == seed


def test_healthy_specificity_and_tumour_sensitivity():
    candidates = [
        CANDIDATES[1],  # healthy, states nothing -> correct
        CANDIDATES[2],  # healthy, "a mass" -> false lesion
        "No focal abnormality; no mass or edema.",  # healthy, all negated -> correct
        CANDIDATES[0],  # tumour, "a lesion" -> found
        "The brain shows normal signal characteristics on FLAIR sequence.",  # tumour, missed
    ]
    got = lesion_detection(candidates, [True, True, True, False, False])
    assert got["healthy_specificity"] == pytest.approx(2 / 3)
    assert got["tumour_sensitivity"] == pytest.approx(1 / 2)
    assert (got["n_healthy"], got["n_tumour"]) == (3, 2)
    assert states_lesion("Abnormal signal in the left frontal lobe.")
    assert not states_lesion("No definite focal abnormality is identified in the provided FLAIR scan.")
    assert math.isnan(lesion_detection(["No edema."], [False])["healthy_specificity"])


@pytest.mark.parametrize("call, message", [
    (lambda: clinical_f1(["a"], ["a", "b"]), "differ in length"),
    (lambda: clinical_f1([], []), "candidates is empty"),
    (lambda: clinical_f1(["a"], ["a"], mode="strict"), "unknown mode"),
    (lambda: clinical_f1(["a", None], ["a", "b"]), r"candidates\[1\]"),
    (lambda: clinical_f1("left", "left"), "not a single string"),
    (lambda: lesion_detection([], []), "candidates is empty"),
    (lambda: lesion_detection(["a"], [True, False]), "differ in length"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture(scope="module")
def textbrats_reports(shared_data):
    path = shared_data / "textbrats" / "reports.json"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return list(json.loads(path.read_text()).values())


@pytest.mark.parametrize("mode", ["seed", "corrected"])
def test_real_reports_against_themselves_and_shuffled(textbrats_reports, mode):
    reports = textbrats_reports
    assert all(value == 1.0 for key, value in clinical_f1(reports, reports, mode).items() if "_f1" in key)
    shuffled = [reports[i] for i in np.random.default_rng(0).permutation(len(reports))]
    for key, value in clinical_f1(shuffled, reports, mode).items():
        if "_f1" in key:
            assert value < 1.0, key
    assert all(states_lesion(report) for report in reports)  # every TextBraTS case is a tumour


def test_keyword_spans_are_the_words_the_corrected_mode_reads():
    from common.metrics.clinical import keyword_spans

    text = "Edema surrounds a left frontoparietal mass; the ventricles are not compressed. Normal otherwise."
    words = [text[start:end] for start, end in keyword_spans(text)]
    assert words == ["Edema", "left", "frontoparietal", "mass", "ventricles", "not", "compressed"]
    assert keyword_spans("No abnormality.") == [(0, 2), (3, 14)]  # the negation decides a healthy report
    assert keyword_spans("Normal otherwise.") == []
    with pytest.raises(ValueError):
        keyword_spans(None)
