"""The submission validator and the organisers' scorer: hand-computed cases, an independent re-implementation of
the organisers' steps (re + dict join + sklearn), and one-line errors for every bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from pathology_brats import score, validate
from pathology_brats.challenge_metrics import ORGANISERS_KEYS, SCORER_KEYS, challenge_scores
from pathology_brats.schema import get_schema
from pathology_brats.score import join_submission, score_submission
from pathology_brats.validate import submission_violations

# restated from the organisers' workflows (wf-pathology/validation-phase.cwl of each year), not imported
PATTERNS = {"2024": r"BraTSPath_Val.*png$", "2025": r"BraTSPath_Val.*jpg$", "2026": r"val_\w+"}
GOLD = {"2024": ("SubjectID", "Target"), "2025": ("SubjectID", "Target"), "2026": ("Name", "GT")}
IDS = {"2024": "BraTSPath_Val_{:04d}.png", "2025": "BraTSPath_Val_{:04d}.jpg", "2026": "val_{:05d}.png"}


def _gold(year, targets, ids=None):
    ids = ids or [IDS[year].format(i) for i in range(len(targets))]
    return pd.DataFrame({GOLD[year][0]: ids, GOLD[year][1]: [str(t) for t in targets]})


def _submission(rows):
    return pd.DataFrame(rows, columns=["SubjectID", "Prediction"])


# --- hand-computed ------------------------------------------------------------------------------------------------

def test_2025_by_hand():
    """targets 0 1 2 2, predictions 0 2 2 and a missing row (-> penalty 9); 10 scored classes.

    accuracy = f1 = recall (micro) = 2/4 = 0.5; micro specificity: 4 rows x 9 negative classes = 36, 2 of them
    false positives -> 34/36. MCC = (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) with c=2, s=4,
    predicted counts {0:1, 2:2, 9:1}, true counts {0:1, 1:1, 2:2}: (8 - (1 + 4)) / sqrt(10 * 10) = 0.3.
    """
    got = score_submission(_submission([("BraTSPath_Val_0000.jpg", 0), ("BraTSPath_Val_0001.jpg", 2),
                                        ("BraTSPath_Val_0002.jpg", 2)]), _gold("2025", [0, 1, 2, 2]), "2025")
    assert got == pytest.approx({"mcc": 0.3, "f1_global": 0.5, "accuracy_global": 0.5,
                                 "specificity_global": 34 / 36, "recall_global": 0.5})


def test_2024_by_hand():
    """targets 0 0 1 5, predictions 0 1 1 and a missing row (-> penalty 6); 7 scored classes.

    accuracy 2/4; micro specificity (4 x 6 - 2) / (4 x 6) = 22/24; MCC with predicted counts {0:1, 1:2, 6:1}, true
    counts {0:2, 1:1, 5:1}: (2*4 - (1*2 + 2*1)) / sqrt((16 - 6)(16 - 6)) = 0.4.
    """
    got = score_submission(_submission([("BraTSPath_Val_0000.png", 0), ("BraTSPath_Val_0001.png", 1),
                                        ("BraTSPath_Val_0002.png", 1)]), _gold("2024", [0, 0, 1, 5]), "2024")
    assert got == pytest.approx({"mcc": 0.4, "f1_global": 0.5, "accuracy_global": 0.5,
                                 "specificity_global": 22 / 24, "recall_global": 0.5})


def test_2026_by_hand():
    """targets 0 0 1 1, predictions 0 1 1 and a missing row (-> penalty 10); 11 scored classes.

    Classes seen (0, 1, 10) enter the macro averages. recall 1/2, 1/2, 0 -> 1/3; F1: class 0 tp1 fn1 -> 2/3,
    class 1 tp1 fp1 fn1 -> 2/4, class 10 fp1 -> 0: (2/3 + 1/2) / 3 = 7/18. Specificity weighted by support (2, 2):
    class 0 has no false positive -> 1, class 1 one of its two negatives predicted 1 -> 1/2: 0.75.
    Tie-exact AUROC: class 0 scores 1 0 | 0 0 (positives | negatives): 2 wins + 2 ties of 4 pairs -> 0.75;
    class 1 scores 1 0 | 0 1: 1 win, 2 ties, 1 loss -> 0.5; weighted (2, 2) -> 0.625.
    """
    got = score_submission(_submission([("val_00000.png", 0), ("val_00001.png", 1), ("val_00002.png", 1)]),
                           _gold("2026", [0, 0, 1, 1]), "2026")
    assert tuple(got) == SCORER_KEYS["2026"]
    expected = {"mcc": got["mcc"], "f1_per_class_average": 7 / 18, "accuracy_global": 0.5,
                "specificity_per_class_weighted": 0.75, "recall_per_class_average": 1 / 3,
                "auroc_per_class_weighted": got["auroc_per_class_weighted"], "auroc_per_class_weighted_exact": 0.625}
    assert got == pytest.approx(expected)
    # MCC: c=2, s=4, predicted {0:1, 1:2, 10:1}, true {0:2, 1:2}: (8 - (2 + 4)) / sqrt((16 - 6)(16 - 8))
    assert got["mcc"] == pytest.approx(2 / np.sqrt(80))


# --- an independent implementation of the organisers' steps ---------------------------------------------------------

def _organisers_labels(submission, gold, year):
    """score.py's join in plain Python: first pattern match as the id, left join on gold, penalty where missing."""
    pattern, penalty = re.compile(PATTERNS[year]), get_schema(year).penalty
    predicted = {pattern.search(s).group(0): int(p) for s, p in zip(submission.SubjectID, submission.Prediction)}
    ids, targets = gold[GOLD[year][0]], gold[GOLD[year][1]].astype(int)
    return targets.to_numpy(), np.array([predicted.get(pattern.search(i).group(0), penalty) for i in ids])


def _reference(y, p, year):
    """GaNDLF's keys from a confusion matrix and sklearn; AUROC on the scores GaNDLF builds, and on exact ties."""
    k = get_schema(year).num_scored_classes
    cm = skm.confusion_matrix(y, p, labels=np.arange(k))
    tp, support = np.diag(cm), cm.sum(1)
    fp = cm.sum(0) - tp
    tn = len(y) - support - fp
    out = {"mcc": skm.matthews_corrcoef(y, p), "accuracy_global": skm.accuracy_score(y, p)}
    if year != "2026":
        out.update(f1_global=skm.f1_score(y, p, average="micro"), recall_global=skm.recall_score(y, p, average="micro"),
                   specificity_global=tn.sum() / (tn.sum() + fp.sum()))
        return out
    present = np.flatnonzero(support)
    softmax = torch.softmax(torch.nn.functional.one_hot(torch.as_tensor(p), k).float(), dim=1).numpy()
    out.update(f1_per_class_average=skm.f1_score(y, p, average="macro", zero_division=0),
               recall_per_class_average=skm.recall_score(y, p, average="macro", zero_division=0),
               specificity_per_class_weighted=np.average(tn / (tn + fp), weights=support),
               auroc_per_class_weighted=np.average([skm.roc_auc_score(y == c, softmax[:, c]) for c in present],
                                                   weights=support[present]),
               auroc_per_class_weighted_exact=np.average([skm.roc_auc_score(y == c, p == c) for c in present],
                                                         weights=support[present]))
    return out


@pytest.mark.parametrize("year", ["2024", "2025", "2026"])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_an_independent_implementation(year, seed):
    rng = np.random.default_rng(seed)
    k = len(get_schema(year).classes)
    y = rng.integers(0, k, 120)
    gold = _gold(year, y)
    p = np.where(rng.random(120) < 0.55, y, rng.integers(0, k, 120))
    kept = rng.random(120) > 0.1  # ~12 rows missing -> penalty
    ids = [("preds/" if i % 3 == 0 else "") + s for i, s in enumerate(gold.iloc[:, 0])]  # a folder prefix on some
    rows = [(i, int(c)) for i, c, keep in zip(ids, p, kept, strict=True) if keep]
    rows += [(IDS[year].format(500 + j), j % k) for j in range(5)]  # extra rows, not in the gold
    submission = _submission(rng.permutation(np.array(rows, dtype=object)).tolist())
    got = score_submission(submission, gold, year)
    y_ref, p_ref = _organisers_labels(submission, gold, year)
    assert (p_ref == get_schema(year).penalty).sum() == (~kept).sum() > 0
    assert tuple(got) == SCORER_KEYS[year]
    assert got == pytest.approx(_reference(y_ref, p_ref, year), abs=1e-6)
    assert got == challenge_scores(y_ref, p_ref, year)


# --- join: penalty, extra rows, ids ---------------------------------------------------------------------------------

def test_missing_rows_get_the_penalty_label():
    """No prediction names a gold id: all 3 rows are 9, none right; micro specificity 1 - 3 / (3 x 9) = 8/9."""
    gold = _gold("2025", [0, 1, 2])
    submission = _submission([("BraTSPath_Val_0099.jpg", 0)])
    joined = join_submission(submission, gold, "2025")
    assert joined["Prediction"].tolist() == [9, 9, 9] and joined["missing"].all()
    got = score_submission(submission, gold, "2025")
    assert got["accuracy_global"] == 0 and got["specificity_global"] == pytest.approx(8 / 9)


def test_extra_rows_are_ignored():
    gold = _gold("2026", [0, 3, 3, 9])
    rows = [("val_00000.png", 0), ("val_00001.png", 3), ("val_00002.png", 1), ("val_00003.png", 9)]
    alone = score_submission(_submission(rows), gold, "2026")
    extra = score_submission(_submission([("val_00777.png", 5), *rows, ("val_00042.png", 2)]), gold, "2026")
    assert extra == alone and alone["accuracy_global"] == pytest.approx(0.75)


@pytest.mark.parametrize("year, gold_id, submitted, extracted", [
    ("2025", "BraTSPath_Val_0007.jpg", "preds/run1/BraTSPath_Val_0007.jpg", "BraTSPath_Val_0007.jpg"),
    ("2024", "data/BraTSPath_Val_0007.png", "BraTSPath_Val_0007.png", "BraTSPath_Val_0007.png"),
    ("2026", "val_00007.png", "BraTSPath_val_00007.jpg", "val_00007"),  # \w+ stops at the dot: extension ignored
])
def test_ids_are_joined_on_the_extracted_name(year, gold_id, submitted, extracted):
    joined = join_submission(_submission([(submitted, 4)]), _gold(year, [4], [gold_id]), year)
    assert joined["SubjectID"].tolist() == [extracted] and joined["Prediction"].tolist() == [4]
    assert not joined["missing"].any()


def test_2026_gold_in_the_older_layout_is_read_as_the_organisers_rename_allows():
    gold = pd.DataFrame({"SubjectID": ["val_00000.png", "val_00001.png"], "Target": ["2", "5"]})
    joined = join_submission(_submission([("val_00001.png", 5)]), gold, "2026")
    assert joined["Prediction"].tolist() == [10, 5]


def test_organisers_keys_are_the_published_names_and_exact_is_added_only_for_auroc():
    assert ORGANISERS_KEYS["2025"] == ("mcc", "f1_global", "accuracy_global", "specificity_global", "recall_global")
    assert SCORER_KEYS["2025"] == ORGANISERS_KEYS["2025"] == SCORER_KEYS["2024"]
    assert SCORER_KEYS["2026"] == (*ORGANISERS_KEYS["2026"], "auroc_per_class_weighted_exact")


# --- validate: the CLI --------------------------------------------------------------------------------------------

GOOD = {"2024": ["BraTSPath_Val_0001.png,5", "BraTSPath_Val_0002.png,0"],
        "2025": ["BraTSPath_Val_0001.jpg,3", "BraTSPath_Val_0002.jpg,8"],
        "2026": ["val_00001.png,9", "val_00002.png,0"]}


def _write(tmp_path, lines, name="submission.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("year", ["2024", "2025", "2026"])
def test_a_valid_submission_passes(tmp_path, capsys, year):
    path = _write(tmp_path, ["SubjectID,Prediction", *GOOD[year]])
    images = tmp_path / "images"
    images.mkdir()
    for line in GOOD[year]:
        (images / line.split(",")[0]).write_bytes(b"")
    assert validate.main(["--submission", str(path), "--schema", year, "--images", str(images)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"ok: {path}: 2 rows") and err == ""


@pytest.mark.parametrize("year, lines, line, problem", [
    ("2025", ["SubjectID,Label", "BraTSPath_Val_0001.jpg,3"], 1, "header must be exactly SubjectID,Prediction"),
    ("2025", ["SubjectID,Prediction,Score", "BraTSPath_Val_0001.jpg,3,0.9"], 1, "got SubjectID,Prediction,Score"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Val_0001.jpg,3", "BraTSPath_Val_0002.jpg,2.5"], 3, "not an integer"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Val_0001.jpg,CT"], 2, "'CT' is not an integer"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Val_0001.jpg,"], 2, "'' is not an integer"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Val_0001.jpg,12"], 2, "outside the 2025 class codes 0..8"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Val_0001.jpg,-1"], 2, "outside the 2025 class codes 0..8"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Val_0001.jpg,9"], 2, "9 is the 2025 penalty label"),
    ("2024", ["SubjectID,Prediction", "BraTSPath_Val_0001.png,6"], 2, "6 is the 2024 penalty label"),
    ("2024", ["SubjectID,Prediction", "BraTSPath_Val_0001.png,8"], 2, "outside the 2024 class codes 0..5"),
    ("2026", ["SubjectID,Prediction", "val_00001.png,10"], 2, "10 is the 2026 penalty label"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Val_0001.jpg,1", "BraTSPath_Val_0001.jpg,2"], 3, "repeats line 2"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Val_0001.png,1"], 2, r"does not match the 2025 pattern"),
    ("2025", ["SubjectID,Prediction", "BraTSPath_Test_0001.jpg,1"], 2, r"BraTSPath_Val.*jpg$"),
    ("2024", ["SubjectID,Prediction", "BraTSPath_Val_0001.jpg,1"], 2, r"BraTSPath_Val.*png$"),
    ("2026", ["SubjectID,Prediction", "VAL-00001.png,1"], 2, r"does not match the 2026 pattern val_\w+"),
])
def test_each_violation_is_one_line_naming_file_and_row(tmp_path, capsys, year, lines, line, problem):
    path = _write(tmp_path, lines)
    assert validate.main(["--submission", str(path), "--schema", year]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: line {line}: ") and problem in err


def test_an_id_that_names_no_image(tmp_path, capsys):
    path = _write(tmp_path, ["SubjectID,Prediction", *GOOD["2025"]])
    (tmp_path / "BraTSPath_Val_0001.jpg").write_bytes(b"")
    assert validate.main(["--submission", str(path), "--images", str(tmp_path)]) == 2  # default schema 2025
    err = capsys.readouterr().err
    assert err == f"error: {path}: line 3: SubjectID 'BraTSPath_Val_0002.jpg' names no file in {tmp_path}\n"


@pytest.mark.parametrize("content, problem", [(b"", "not a readable CSV"), (b"\xff\xfe\x00bad", "not a readable CSV")])
def test_an_unreadable_submission_is_one_line(tmp_path, capsys, content, problem):
    path = tmp_path / "submission.csv"
    path.write_bytes(content)
    assert validate.main(["--submission", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: {problem}")


def test_submission_violations_on_a_frame_as_submit_calls_it():
    frame = pd.DataFrame({"SubjectID": ["val_00001.png", "val_00002.png"], "Prediction": np.array([9, 10])})
    assert submission_violations(frame, "2026") == [
        "line 3: Prediction 10 is the 2026 penalty label (what a missing row is scored as), not a class code (0..9)"]
    assert submission_violations(frame.iloc[:1], get_schema("2026")) == []


# --- score: the CLI -----------------------------------------------------------------------------------------------

def test_score_cli_writes_the_keys_as_json(tmp_path, capsys):
    submission = _write(tmp_path, ["SubjectID,Prediction", "x/BraTSPath_Val_0000.jpg,0", "BraTSPath_Val_0001.jpg,2",
                                   "BraTSPath_Val_0002.jpg,2", "BraTSPath_Val_0099.jpg,1"])
    gold = _write(tmp_path, ["SubjectID,Target", "BraTSPath_Val_0000.jpg,0", "BraTSPath_Val_0001.jpg,1",
                             "BraTSPath_Val_0002.jpg,2", "BraTSPath_Val_0003.jpg,2"], "gold.csv")
    out_json = tmp_path / "scores" / "s.json"
    assert score.main(["--submission", str(submission), "--gold", str(gold), "--json", str(out_json)]) == 0
    written = json.loads(out_json.read_text())
    assert written == pytest.approx({"mcc": 0.3, "f1_global": 0.5, "accuracy_global": 0.5,
                                     "specificity_global": 34 / 36, "recall_global": 0.5})  # the 2025 case by hand
    out = capsys.readouterr().out
    assert "4 gold rows, 1 without a prediction (scored as 9), 1 submission rows ignored" in out


@pytest.mark.parametrize("year, sub_lines, gold_lines, which, problem", [
    ("2025", GOOD["2025"], ["Name,GT", "BraTSPath_Val_0001.jpg,1"], "gold",
     "missing column(s) SubjectID, Target of the 2025 gold layout (has Name, GT)"),
    ("2026", GOOD["2026"], ["ID,Label", "val_00001.png,1"], "gold", "missing column(s) Name, GT of the 2026 gold"),
    ("2025", GOOD["2025"], ["SubjectID,Target", "BraTSPath_Val_0001.jpg,9"], "gold", "'9' is not an integer in 0..8"),
    ("2025", GOOD["2025"], ["SubjectID,Target", "BraTSPath_Val_0001.jpg,1", "BraTSPath_Val_0001.jpg,2"], "gold",
     "appears more than once"),
    ("2025", GOOD["2025"], ["SubjectID,Target", "case_1.jpg,1"], "gold", "does not match the 2025 pattern"),
    ("2025", ["a/BraTSPath_Val_0001.jpg,1", "b/BraTSPath_Val_0001.jpg,2"], ["SubjectID,Target",
     "BraTSPath_Val_0001.jpg,1"], "submission", "two rows name the gold id 'BraTSPath_Val_0001.jpg'"),
    ("2025", ["BraTSPath_Val_0001.jpg,9"], ["SubjectID,Target", "BraTSPath_Val_0001.jpg,1"], "submission",
     "line 2: Prediction 9 is the 2025 penalty label"),
])
def test_score_bad_inputs_are_one_line(tmp_path, capsys, year, sub_lines, gold_lines, which, problem):
    paths = {"submission": _write(tmp_path, ["SubjectID,Prediction", *sub_lines]),
             "gold": _write(tmp_path, gold_lines, "gold.csv")}
    out_json = tmp_path / "s.json"
    argv = ["--submission", str(paths["submission"]), "--gold", str(paths["gold"]), "--schema", year,
            "--json", str(out_json)]
    assert score.main(argv) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(f"error: {paths[which]}: ")
    assert problem in captured.err and captured.out == "" and not out_json.exists()


@pytest.mark.parametrize("content, problem", [(None, "file not found"), (b"\xff\xfe\x00\x81", "not a readable CSV"),
                                              (b"", "not a readable CSV")])
def test_score_unreadable_gold(tmp_path, capsys, content, problem):
    submission = _write(tmp_path, ["SubjectID,Prediction", *GOOD["2025"]])
    gold = tmp_path / "gold.csv"
    if content is not None:
        gold.write_bytes(content)
    assert score.main(["--submission", str(submission), "--gold", str(gold)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {gold}: {problem}")
