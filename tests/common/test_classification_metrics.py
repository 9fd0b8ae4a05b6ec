import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from common.metrics.classification import best_threshold, binary_metrics, multiclass_metrics, multilabel_metrics


def _binary_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, score


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.7, 0.999])
def test_binary_metrics_match_sklearn(threshold):
    y, score = _binary_data()
    pred = (score >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    got = binary_metrics(y, score, threshold=threshold)
    expected = {
        "acc": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, zero_division=0),
        "recall": skm.recall_score(y, pred, zero_division=0),
        "specificity": skm.recall_score(y, pred, pos_label=0, zero_division=0),
        "f1": skm.f1_score(y, pred, zero_division=0),
        "auroc": skm.roc_auc_score(y, score),
        "auprc": skm.average_precision_score(y, score),
        "mcc": skm.matthews_corrcoef(y, pred),
        "balanced_acc": skm.balanced_accuracy_score(y, pred),
        "threshold": threshold,
    }
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["specificity"] == pytest.approx(tn / (tn + fp))
    assert got["recall"] == pytest.approx(tp / (tp + fn))


def test_specificity_by_hand():
    # truth 0 0 0 0 1 1 1 ; predicted positive for scores >= 0.5 -> one false positive among four negatives
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.8, 0.9])
    got = binary_metrics(y, score)
    assert got["specificity"] == pytest.approx(3 / 4)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["acc"] == pytest.approx(5 / 7)


@pytest.mark.parametrize("label", [0, 1])
def test_binary_single_class_gives_nan_auroc_without_warnings(label):
    y = np.full(20, label)
    score = np.linspace(0, 1, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = binary_metrics(y, score)
    assert np.isnan(got["auroc"]) and np.isnan(got["auprc"])
    pred = (score >= 0.5).astype(int)
    assert got["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))


def test_binary_rejects_non_binary_labels():
    with pytest.raises(ValueError, match="only 0 and 1"):
        binary_metrics([0, 1, 2], [0.1, 0.5, 0.9])


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = proba.argmax(axis=1)
    got = multiclass_metrics(y, proba, labels=["a", "b", "c", "d"])
    cm = skm.confusion_matrix(y, pred)
    fp = cm.sum(axis=0) - np.diag(cm)
    tn = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
    expected = {
        "acc": skm.accuracy_score(y, pred),
        "balanced_acc": skm.balanced_accuracy_score(y, pred),
        "precision_macro": skm.precision_score(y, pred, average="macro"),
        "recall_macro": skm.recall_score(y, pred, average="macro"),
        "f1_macro": skm.f1_score(y, pred, average="macro"),
        "f1_micro": skm.f1_score(y, pred, average="micro"),
        "f1_weighted": skm.f1_score(y, pred, average="weighted"),
        "specificity_macro": np.mean(tn / (tn + fp)),
        "mcc": skm.matthews_corrcoef(y, pred),
        "auroc_macro": skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"),
    }
    per_f1 = skm.f1_score(y, pred, average=None)
    per_recall = skm.recall_score(y, pred, average=None)
    for k, name in enumerate("abcd"):
        expected[f"f1_{name}"] = per_f1[k]
        expected[f"recall_{name}"] = per_recall[k]
        expected[f"auroc_{name}"] = skm.roc_auc_score(y == k, proba[:, k])
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["acc"] > 0.5


def test_multiclass_absent_class_is_skipped_in_auroc():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 100)  # class 2 never occurs
    proba = rng.dirichlet(np.ones(3), 100)
    got = multiclass_metrics(y, proba, labels=["x", "y", "z"])
    assert np.isnan(got["auroc_z"])
    assert got["auroc_macro"] == pytest.approx(np.mean([got["auroc_x"], got["auroc_y"]]))


def test_multilabel_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    y = (rng.random((250, 5)) < [0.1, 0.3, 0.5, 0.2, 0.4]).astype(int)
    proba = np.clip(0.4 * y + 0.6 * rng.random((250, 5)), 0, 1)
    thresholds = np.array([0.3, 0.4, 0.5, 0.6, 0.5])
    names = ["atelectasis", "edema", "effusion", "pneumonia", "lung opacity"]
    pred = (proba >= thresholds).astype(int)
    got = multilabel_metrics(y, proba, thresholds=thresholds, label_names=names)
    expected = {"hamming_loss": skm.hamming_loss(y, pred), "acc_subset": skm.accuracy_score(y, pred),
                "auroc_macro": skm.roc_auc_score(y, proba, average="macro"),
                "auroc_micro": skm.roc_auc_score(y, proba, average="micro")}
    for name, fn in (("f1", skm.f1_score), ("precision", skm.precision_score), ("recall", skm.recall_score)):
        for average in ("macro", "micro"):
            expected[f"{name}_{average}"] = fn(y, pred, average=average, zero_division=0)
    for j, name in enumerate(names):
        key = name.replace(" ", "_")
        expected[f"auroc_{key}"] = skm.roc_auc_score(y[:, j], proba[:, j])
        expected[f"f1_{key}"] = skm.f1_score(y[:, j], pred[:, j])
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_multilabel_scalar_threshold_and_label_without_positives():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (80, 3))
    y[:, 2] = 0
    proba = rng.random((80, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = multilabel_metrics(y, proba, 0.5)
    pred = (proba >= 0.5).astype(int)
    assert got["f1_micro"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert got["auroc_macro"] == pytest.approx(np.mean([skm.roc_auc_score(y[:, j], proba[:, j]) for j in (0, 1)]))


def test_best_threshold_constructed_example():
    # Six negatives, five positives. Threshold 0.4 catches every positive with one false positive
    # (Youden 1 - 1/6), 0.6 misses one positive with no false positive (Youden 0.8): Youden and F1 pick 0.4.
    # Accuracy ties at 10/11 for both, and the tie goes to the higher threshold.
    y = np.array([0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
    score = np.array([0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.45, 0.6, 0.7, 0.8, 0.9])
    assert best_threshold(y, score, "youden") == pytest.approx(0.4)
    assert best_threshold(y, score, "f1") == pytest.approx(0.4)
    assert best_threshold(y, score, "acc") == pytest.approx(0.6)
    order = np.random.default_rng(0).permutation(len(y))
    assert best_threshold(y[order], score[order], "youden") == pytest.approx(0.4)


@pytest.mark.parametrize("metric,key", [("youden", None), ("f1", "f1"), ("acc", "acc")])
def test_best_threshold_is_optimal_over_all_candidates(metric, key):
    y, score = _binary_data(n=120, seed=5)
    score = np.round(score, 2)  # ties among scores
    chosen = best_threshold(y, score, metric)

    def value(t):
        m = binary_metrics(y, score, t)
        return m["recall"] + m["specificity"] - 1 if key is None else m[key]

    values = {t: value(t) for t in np.unique(score)}
    best = max(values.values())
    assert value(chosen) == pytest.approx(best)
    assert chosen == max(t for t, v in values.items() if v >= best - 1e-12)


def test_best_threshold_errors():
    with pytest.raises(ValueError, match="unknown threshold metric"):
        best_threshold([0, 1], [0.2, 0.8], "auc")
    with pytest.raises(ValueError, match="both classes"):
        best_threshold([1, 1], [0.2, 0.8])


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_fast_auroc_and_average_precision_equal_sklearn_with_ties(decimals):
    y, score = _binary_data(n=257, seed=decimals or 7)
    if decimals is not None:
        score = np.round(score, decimals)  # decimals=0 leaves only the scores 0 and 1: heavy ties
    got = binary_metrics(y, score)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    assert got["auprc"] == pytest.approx(skm.average_precision_score(y, score), abs=1e-12)


def test_masked_multilabel_metrics_equal_sklearn_on_the_observed_cells():
    rng = np.random.default_rng(5)
    y = (rng.random((120, 4)) < 0.35).astype(int)
    proba = np.clip(0.4 * y + 0.6 * rng.random((120, 4)), 0, 1)
    mask = rng.random((120, 4)) > 0.2
    thresholds = np.array([0.4, 0.5, 0.45, 0.55])
    pred = (proba >= thresholds).astype(int)
    got = multilabel_metrics(y, proba, thresholds, ["a", "b", "c", "d"], mask=mask)
    f1 = [skm.f1_score(y[mask[:, j], j], pred[mask[:, j], j]) for j in range(4)]
    assert got["f1_macro"] == pytest.approx(np.mean(f1))
    assert got["f1_c"] == pytest.approx(f1[2])
    assert got["f1_micro"] == pytest.approx(skm.f1_score(y[mask], pred[mask]))
    assert got["precision_micro"] == pytest.approx(skm.precision_score(y[mask], pred[mask]))
    assert got["hamming_loss"] == pytest.approx(np.mean(y[mask] != pred[mask]))
    full = mask.all(1)
    assert got["acc_subset"] == pytest.approx(skm.accuracy_score(y[full], pred[full]))
    assert got["auroc_b"] == pytest.approx(skm.roc_auc_score(y[mask[:, 1], 1], proba[mask[:, 1], 1]))
    # An unobserved cell cannot change anything: flipping its label leaves every number as it was.
    flipped = y.copy()
    flipped[~mask] = 1 - flipped[~mask]
    assert multilabel_metrics(flipped, proba, thresholds, ["a", "b", "c", "d"], mask=mask) == got
