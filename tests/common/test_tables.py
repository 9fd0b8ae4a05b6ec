import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from common.tables import bootstrap_ci, markdown_table, metrics_with_ci, to_csv, to_markdown, write_results


def _auroc(y, s):
    return skm.roc_auc_score(y, s)


def test_bootstrap_mean_interval_matches_normal_theory():
    x = np.random.default_rng(0).normal(loc=2.0, scale=1.0, size=2000)
    point, low, high = bootstrap_ci(np.mean, x, n_boot=1000, seed=0)
    assert point == pytest.approx(x.mean())
    half_width = 1.96 * x.std() / np.sqrt(x.size)
    assert low < point < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    assert (point - low) == pytest.approx(high - point, rel=0.3)


def test_bootstrap_narrows_with_more_samples_and_is_seeded():
    rng = np.random.default_rng(1)
    widths = []
    for n in (60, 600):
        y = rng.integers(0, 2, n)
        s = 0.3 * y + rng.random(n)
        point, low, high = bootstrap_ci(_auroc, y, s, n_boot=200, seed=0)
        assert low <= point <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    assert bootstrap_ci(_auroc, y, s, n_boot=20, seed=3) == bootstrap_ci(_auroc, y, s, n_boot=20, seed=3)
    assert bootstrap_ci(_auroc, y, s, n_boot=20, seed=3) != bootstrap_ci(_auroc, y, s, n_boot=20, seed=4)


def test_bootstrap_resamples_arrays_together():
    a = np.arange(50)
    point, low, high = bootstrap_ci(lambda u, v: float(np.mean(u == v)), a, a.copy(), n_boot=100)
    assert (point, low, high) == (1.0, 1.0, 1.0)
    rows = np.random.default_rng(0).random((40, 3))
    point, low, high = bootstrap_ci(lambda m, first: float(np.mean(m[:, 0] == first)), rows, rows[:, 0], n_boot=100)
    assert (point, low, high) == (1.0, 1.0, 1.0)


def test_bootstrap_skips_undefined_resamples():
    y = np.zeros(12, dtype=int)
    y[0] = 1  # most resamples of 12 miss the single positive: AUROC is undefined there
    s = np.linspace(1, 0, 12)
    point, low, high = bootstrap_ci(_auroc, y, s, n_boot=200, seed=0)
    assert point == 1.0 and low == 1.0 and high == 1.0
    nan_metric = lambda y, s: float("nan")  # noqa: E731
    point, low, high = bootstrap_ci(nan_metric, y, s, n_boot=20)
    assert np.isnan([point, low, high]).all()


def test_bootstrap_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci(_auroc, np.zeros(3), np.zeros(4))


def test_metrics_with_ci_matches_bootstrap_ci_key_by_key():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 100)
    s = 0.4 * y + rng.random(100)
    fns = {"auroc": _auroc, "acc": lambda y, s: skm.accuracy_score(y, s >= 0.7)}
    results = metrics_with_ci(lambda a: {name: fn(a["y"], a["s"]) for name, fn in fns.items()}, {"y": y, "s": s},
                              n_boot=100, seed=5)
    assert list(results) == ["auroc", "auroc_ci_low", "auroc_ci_high", "acc", "acc_ci_low", "acc_ci_high"]
    for name, fn in fns.items():
        point, low, high = bootstrap_ci(fn, y, s, n_boot=100, seed=5)
        assert results[name] == pytest.approx(point) and results[f"{name}_ci_low"] == pytest.approx(low)
        assert results[f"{name}_ci_high"] == pytest.approx(high)


def test_metrics_with_ci_one_class_gives_nan_and_a_warning(caplog):
    from common.metrics.classification import binary_metrics

    y, s = np.ones(30, int), np.linspace(0, 1, 30)
    results = metrics_with_ci(lambda a: binary_metrics(a["y"], a["s"]), {"y": y, "s": s}, keys=("auroc", "recall"),
                              n_boot=50)
    assert np.isnan([results["auroc"], results["auroc_ci_low"], results["auroc_ci_high"]]).all()
    assert results["recall"] == pytest.approx(0.5) and results["recall_ci_low"] < 0.5 < results["recall_ci_high"]
    assert "auroc is undefined" in caplog.text
    with pytest.raises(ValueError, match="differ in length"):
        metrics_with_ci(lambda a: {}, {"y": y, "s": s[:3]})


def test_to_markdown_pairs_intervals_and_formats():
    results = {"auroc": 0.912345, "auroc_ci_low": 0.85, "auroc_ci_high": 0.95, "n": 624, "model": "resnet18",
               "orphan_ci_low": 0.1, "ece": float("nan")}
    md = to_markdown(results, "PneumoniaMNIST test")
    lines = md.splitlines()
    assert lines[0] == "# PneumoniaMNIST test"
    assert "| metric | value | 95% CI |" in lines
    assert "| auroc | 0.9123 | [0.8500, 0.9500] |" in lines
    assert "| n | 624 |  |" in lines
    assert "| model | resnet18 |  |" in lines
    assert "| orphan_ci_low | 0.1000 |  |" in lines
    assert "| ece | nan |  |" in lines
    assert not any(line.startswith("| auroc_ci_") for line in lines)


def test_write_results_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    s = 0.4 * y + rng.random(80)
    results = metrics_with_ci(lambda a: {"auroc": _auroc(a["y"], a["s"])}, {"y": y, "s": s}, n_boot=100)
    results.update({"n": 80, "ece": float("nan"), "threshold": np.float32(0.5)})
    write_results(tmp_path, results, "test set", extra_markdown="![roc](figures/roc.png)")
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded == {"auroc": results["auroc"], "auroc_ci_low": results["auroc_ci_low"],
                      "auroc_ci_high": results["auroc_ci_high"], "n": 80, "ece": None, "threshold": 0.5}
    md = (tmp_path / "results.md").read_text()
    assert f"| auroc | {results['auroc']:.4f} | [{results['auroc_ci_low']:.4f}, {results['auroc_ci_high']:.4f}] |" in md
    assert md.rstrip().endswith("![roc](figures/roc.png)")
    table = pd.read_csv(tmp_path / "results.csv")
    assert list(table.columns) == ["metric", "value", "ci_low", "ci_high"]
    row = table.set_index("metric").loc["auroc"]
    assert (row.value, row.ci_low, row.ci_high) == pytest.approx(
        (results["auroc"], results["auroc_ci_low"], results["auroc_ci_high"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "results.md"]


def test_to_csv_rows():
    text = to_csv({"dice": 0.5, "dice_ci_low": 0.4, "dice_ci_high": 0.6, "n": 3})
    assert text.splitlines() == ["metric,value,ci_low,ci_high", "dice,0.5,0.4,0.6", "n,3,,"]


def test_markdown_table():
    md = markdown_table([{"model": "a", "auroc": 0.91234, "n": 3}, {"model": "b|c", "ms": 1.5}])
    assert md.splitlines() == [
        "| model | auroc | n | ms |",
        "|---|---|---|---|",
        "| a | 0.9123 | 3 |  |",
        "| b\\|c |  |  | 1.5000 |",
    ]
    assert markdown_table([{"x": 1, "y": 2}], columns=["y"]).splitlines()[2] == "| 2 |"


def test_ci_cell_formats_a_value_with_its_interval():
    from common.tables import ci_cell

    results = {"auroc": 0.91234, "auroc_ci_low": 0.8, "auroc_ci_high": 0.95, "acc": 0.5, "f1": float("nan"),
               "mcc": 0.25, "mcc_ci_low": float("nan"), "mcc_ci_high": float("nan")}
    assert ci_cell(results, "auroc") == "0.912 [0.800, 0.950]"
    assert ci_cell(results, "acc") == "0.500"  # no interval drawn
    assert ci_cell(results, "mcc") == "0.250"  # an interval that could not be drawn
    assert ci_cell(results, "f1") == ci_cell(results, "missing") == "nan"
