"""Result tables: point values with percentile-bootstrap 95% intervals, written as JSON, Markdown and CSV.

A run's ``results.json`` is one flat dict (``{"auroc": v, "auroc_ci_low": lo, "auroc_ci_high": hi, ...}``) so that
runs compare with a ``jq`` or a ``pandas.DataFrame`` of many of them; ``results.md`` is the same table for people.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.rundir import atomic_write_json, atomic_write_text

log = logging.getLogger("medvl.tables")

CI_LOW, CI_HIGH = "_ci_low", "_ci_high"


def bootstrap_ci(metric_fn: Callable[..., float], *arrays, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """Point value of ``metric_fn(*arrays)`` and its percentile-bootstrap ``1 - alpha`` interval.

    All arrays are resampled together along axis 0 (sample i keeps its label, score and id). Resamples on which the
    metric is undefined (nan, or a ValueError such as sklearn's single-class AUROC) are skipped; when none is
    defined the interval is (nan, nan).

    Returns:
        ``(point, low, high)`` as floats.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    names = [f"array{i}" for i in range(len(arrays))]
    out = metrics_with_ci(lambda named: {"value": metric_fn(*(named[n] for n in names))}, dict(zip(names, arrays)),
                          n_boot=n_boot, seed=seed, alpha=alpha, warn_undefined=False)
    return out["value"], out["value" + CI_LOW], out["value" + CI_HIGH]


def metrics_with_ci(metric_fn: Callable[[dict[str, np.ndarray]], dict[str, float]], arrays: Mapping[str, Any],
                    keys: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05, warn_undefined: bool = True) -> dict[str, float]:
    """Point values and paired percentile-bootstrap intervals of every key of a dict-valued metric.

    ``metric_fn`` receives the named per-sample arrays (resampled together along axis 0) and returns a flat dict,
    as the functions of ``common.metrics`` do; it runs once per resample for all keys, so every key sees the same
    resamples. A key whose point value is undefined (nan: AUROC on a one-class split) is reported as nan with
    a warning, and resamples where a key is undefined are skipped for that key (every key, where the metric raises
    ValueError). ``bootstrap_ci`` is this loop for one scalar metric.

    Returns:
        ``{key: point, key_ci_low: low, key_ci_high: high}`` for each of ``keys`` (default: every numeric key).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    arrays = {name: np.asarray(values) for name, values in arrays.items()}
    lengths = {len(values) for values in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"arrays differ in length along axis 0: { {k: len(v) for k, v in arrays.items()} }")
    n = lengths.pop()
    point = metric_fn(arrays)
    keys = list(keys) if keys is not None else [k for k, v in point.items()
                                                 if isinstance(v, int | float | np.number) and not isinstance(v, bool)]
    draws: dict[str, list[float]] = {key: [] for key in keys}
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_boot):
            idx = rng.integers(0, n, size=n)
            try:
                values = metric_fn({name: a[idx] for name, a in arrays.items()})
            except ValueError:  # undefined on this resample (sklearn's single-class AUROC): skipped for every key
                continue
            for key in keys:
                value = float(values[key])
                if math.isfinite(value):
                    draws[key].append(value)
    out: dict[str, float] = {}
    for key in keys:
        value = float(point[key])
        if not math.isfinite(value) and warn_undefined:
            log.warning("%s is undefined on this data (a split with one class?); reported as nan", key)
        low, high = (np.percentile(draws[key], [100 * alpha / 2, 100 * (1 - alpha / 2)]) if draws[key]
                     else (float("nan"), float("nan")))
        out[key], out[key + CI_LOW], out[key + CI_HIGH] = value, float(low), float(high)
    return out


def ci_cell(results: Mapping[str, Any], key: str) -> str:
    """``value [low, high]`` of a key of a result dict at 3 decimals (for comparison tables); ``nan`` for an undefined
    or absent value; the value alone where no interval was drawn."""
    value = results.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    low, high = results.get(key + CI_LOW), results.get(key + CI_HIGH)
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _rows(results: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """(metric, value, ci_low, ci_high) rows in the dict's order; a CI key pairs with its metric when both exist."""
    paired = {k for k in results if k.endswith(CI_LOW) and k[: -len(CI_LOW)] + CI_HIGH in results
              and k[: -len(CI_LOW)] in results}
    paired |= {k[: -len(CI_LOW)] + CI_HIGH for k in paired}
    rows = []
    for key, value in results.items():
        if key in paired:
            continue
        if key + CI_LOW in paired:
            rows.append((key, value, results[key + CI_LOW], results[key + CI_HIGH]))
        else:
            rows.append((key, value, None, None))
    return rows


def to_markdown(results: dict[str, Any], title: str) -> str:
    """A ``| metric | value | 95% CI |`` table under a ``# title`` heading; numbers at 4 decimals."""
    lines = [f"# {title}", "", "| metric | value | 95% CI |", "|---|---|---|"]
    for key, value, low, high in _rows(results):
        ci = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None else ""
        lines.append(f"| {_fmt(key)} | {_fmt(value)} | {ci} |")
    return "\n".join(lines) + "\n"


def to_csv(results: dict[str, Any]) -> str:
    """The same rows as :func:`to_markdown` as CSV (``metric,value,ci_low,ci_high``), full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "value", "ci_low", "ci_high"])
    for key, value, low, high in _rows(results):
        writer.writerow([key, *("" if v is None else _plain(v) for v in (value, low, high))])
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def json_safe(obj: Any) -> Any:
    """Numpy scalars and arrays to Python values and non-finite floats to None, so the file is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_results(run_dir: str | Path, results: dict[str, Any], title: str, extra_markdown: str = "") -> None:
    """Write ``results.json`` (flat, nan as null), ``results.md`` and ``results.csv`` into ``run_dir`` atomically."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "results.json", json_safe(results))
    markdown = to_markdown(results, title)
    if extra_markdown:
        markdown += "\n" + extra_markdown.rstrip("\n") + "\n"
    atomic_write_text(run_dir / "results.md", markdown)
    atomic_write_text(run_dir / "results.csv", to_csv(results))


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of dict rows (benchmarks, model comparisons); columns default to the keys in first-seen order.

    Missing cells are blank; floats are shown at 4 decimals.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(_fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
