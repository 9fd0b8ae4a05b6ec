"""Pipeline declarations (``common.pipelines``): found through the entry points, and ``--overwrite`` removes every
output a pipeline declares, so no result of an earlier run stays beside the new one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from common.engine import TrainConfig, fit
from common.pipelines import FLOOR_OUTPUTS, Pipeline, discover, matching_outputs, run_outputs
from common.rundir import read_jsonl
from tests.common.toy import ToyTask, toy_data

REPO = Path(__file__).resolve().parents[2]
PIPELINES = discover()
EARLIER = "written by the earlier run"


def test_every_pipeline_package_is_declared():
    names = [p.name for p in PIPELINES]
    assert names == sorted(names) and len(names) >= 5
    assert all((REPO / name / "__init__.py").is_file() for name in names)
    for pipeline in PIPELINES:
        assert isinstance(pipeline, Pipeline) and pipeline.run_outputs
        assert pipeline.app_spec().name == pipeline.name
        assert callable(pipeline.demo_section())
        for module in pipeline.commands:
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module


def test_run_outputs_is_the_union_and_matches_globs(tmp_path):
    names = run_outputs()
    assert set(FLOOR_OUTPUTS) <= set(names)
    assert {"probe.json", "explain", "baselines.*", "metrics_full*.json", "oracle", "retrieval"} <= set(names)
    for name in ("metrics_full_test.json", "baselines.md", ".pending-12-ab", "results_shuffled.md", "keep.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in matching_outputs(tmp_path, names)] == [
        ".pending-12-ab", "baselines.md", "metrics_full_test.json", "results_shuffled.md"]


def _fit(run, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    config = TrainConfig(epochs=1, batch_size=16, device="cpu", precision="fp32", progress=False, **kw)
    return fit(model, torch.optim.SGD(model.parameters(), lr=0.01), toy_data(48, dim=5), toy_data(16, dim=5),
               ToyTask(), config, run)


def _plant(run: Path, name: str) -> None:
    """An earlier run's output called ``name`` (a glob becomes one name it matches): a folder when it has no
    suffix, else a file."""
    path = run / name.replace("*", "_test")
    if "." in path.name.lstrip("."):
        path.write_text(EARLIER)
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "old.txt").write_text(EARLIER)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_overwrite_leaves_no_output_of_the_earlier_run(tmp_path, pipeline):
    run = tmp_path / "run"
    _fit(run)
    for name in (*pipeline.run_outputs, ".pending-1-old"):
        _plant(run, name)
    (run / "my_notes.txt").write_text("mine")  # not a run output: kept
    result = _fit(run, overwrite=True)
    assert result.completed and len(read_jsonl(run / "metrics.jsonl")) == 1
    left = [p for p in run.rglob("*") if p.is_file() and EARLIER in p.read_text(errors="ignore")]
    assert not left, f"{pipeline.name}: {left} survived --overwrite"
    assert (run / "my_notes.txt").read_text() == "mine"


FLOOR = REPO / "common"


def _mentions(text: str, names: list[str]) -> set[str]:
    """Pipeline packages ``text`` imports or names: a package name, a module path below it, or the name quoted."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found |= {name for name in names for m in modules if m == name or m.startswith(name + ".")}
    for name in names:
        # "pneumonia" is also a disease: a word alone is text, a module path, a path or a quoted name is the package
        if re.search(rf"\b{name}(\.[a-z_]|/)|[\"'`]{name}[\"'`]", text) or ("_" in name and re.search(rf"\b{name}\b",
                                                                                                        text)):
            found.add(name)
    return found


def test_the_floor_imports_and_names_no_pipeline():
    names = [p.name for p in PIPELINES]
    offenders = {}
    for path in sorted(FLOOR.rglob("*.py")):
        found = _mentions(path.read_text(), names)
        if found:
            offenders[str(path.relative_to(REPO))] = sorted(found)
    assert not offenders, f"the floor names pipelines: {offenders}"
    assert _mentions("import pneumonia.model\n", names) == {"pneumonia"}
    assert _mentions('x = "findings suggest pneumonia"\n', names) == set()


def test_a_tokenizer_corpus_a_pipeline_declares_is_found_without_the_floor_naming_it():
    from brain3d_report.lm_twin import tokenizer_corpus
    from common import tiny
    from common.errors import ConfigError

    assert tiny._corpus("brain") == tokenizer_corpus() and len(tokenizer_corpus()) > 200
    assert tiny._corpus("radiology") == tiny.radiology_corpus()
    with pytest.raises(ConfigError, match="no declared pipeline provides a corpus named 'x-ray'"):
        tiny._corpus("x-ray")
