"""One run loader: every pipeline's trained run loads through ``common.runs.load_run``, and no pipeline module has a
loader of its own (a name that shadows ``common.runs``'s, or a raw read of a run's ``model.json`` or weights)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

from common import runs
from common.pipelines import discover
from tests.app.conftest import PIPELINES

LOADERS = {n for n in runs.__all__ if getattr(getattr(runs, n), "__module__", None) == "common.runs"}
"""What ``common.runs`` defines (``load_run``, ``read_run_record``, ``LoadedRun`` ...), not what it re-exports."""
RAW_READERS = {"read_model_json", "read_weights", "load_model_files", "load_model_state"}
"""``common.rundir``'s readers of a model folder: only ``common.runs`` reads a run's model with them."""


FILE_READS = {"read_text", "read_bytes", "open", "load", "loads"}


def _names_model_json(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and node.value == "model.json") or (
        isinstance(node, ast.Name | ast.Attribute) and getattr(node, "id", getattr(node, "attr", None)) == "META_FILE")


def _pipeline_sources() -> list[Path]:
    roots = [Path(importlib.import_module(p.name).__file__).parent for p in discover()]
    assert len(roots) >= 5
    return [path for root in roots for path in sorted(root.rglob("*.py"))]


def test_no_pipeline_module_shadows_or_bypasses_the_run_loader():
    shadowing, raw = [], []
    for path in _pipeline_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            defined = [node.name] if isinstance(node, ast.FunctionDef | ast.ClassDef) else [
                t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            shadowing += [f"{path}: {name}" for name in defined if name in LOADERS]
            if isinstance(node, ast.ImportFrom) and node.module != "common.runs":
                shadowing += [f"{path}: {a.asname} from {node.module}" for a in node.names
                              if (a.asname or a.name) in LOADERS]
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                raw += [f"{path}:{node.lineno}: {name}"] if name in RAW_READERS else []
                if name in FILE_READS and any(_names_model_json(inner) for inner in ast.walk(node)):
                    raw.append(f"{path}:{node.lineno}: {name} of model.json")
    assert not shadowing, shadowing
    assert not raw, raw


@pytest.mark.parametrize("value", PIPELINES)
def test_every_pipeline_loads_its_run_through_common_runs(value, app_runs, tmp_path, monkeypatch):
    """The app's predictor of each pipeline (what its ``predict`` builds) gets its weights from ``load_run``: the
    weights that ``common.runs`` loads are the run's, and the model it returned is the one predicting."""
    from common.app import Session
    from common.app import discover as discover_apps

    calls = []
    load_run = runs.load_run

    def spy(run_dir, pipeline, build, stage=None, device="cpu"):
        loaded = load_run(run_dir, pipeline, build, stage, device)
        calls.append((Path(run_dir).resolve(), pipeline, loaded))
        return loaded

    name = value.split(".")[0]
    importlib.import_module(f"{name}.predict")
    modules = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith(f"{name}.") and getattr(m, "load_run", None) is load_run]
    assert modules, f"no {name} module imports common.runs.load_run"
    for module in modules:
        monkeypatch.setattr(module, "load_run", spy)
    session = Session(discover_apps([value]), app_runs, "cpu", work=tmp_path)
    run = Path(session.runs(name)[0])
    predictor = session.predictor(name, str(run))
    assert [(path, pipeline) for path, pipeline, _ in calls] == [(run.resolve(), name)]
    model = calls[0][2].model
    assert any(value is model for value in vars(predictor).values()) or any(
        getattr(value, "model", None) is model for value in vars(predictor).values())
