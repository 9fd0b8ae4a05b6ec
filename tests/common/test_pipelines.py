"""Pipeline declarations (``common.pipelines``): found through the entry points, and ``--overwrite`` removes every
output a pipeline declares, so no result of an earlier run stays beside the new one."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

from common.engine import TrainConfig, fit
from common.pipelines import FLOOR_OUTPUTS, Pipeline, discover, matching_outputs, run_outputs, stage_table
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
        assert list(inspect.signature(pipeline.demo_section()).parameters) == ["out_dir"]  # one signature
        for module in pipeline.commands:
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module


def test_a_new_pipeline_is_found_from_its_own_folder_without_pyproject(tmp_path, monkeypatch):
    """Adding a pipeline to a checkout is its folder: a top-level package whose ``__init__.py`` declares ``PIPELINE``
    is discovered, its outputs join what ``--overwrite`` removes and its stages the stage table."""
    from common.pipelines import checkout_pipelines

    assert checkout_pipelines(tmp_path) == []  # not a checkout: no pyproject.toml
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'medvl'\n")
    (tmp_path / "toyseg").mkdir()
    (tmp_path / "toyseg" / "__init__.py").write_text(
        'from common.pipelines import Pipeline\n\n'
        'PIPELINE = Pipeline(name="toyseg", title="Toy segmentation", run_outputs=("toy_masks",),\n'
        '                    commands=("toyseg.train",), stages=(("train", "toyseg.train"),),\n'
        '                    predicts="toyseg.evaluate", scores="toyseg.evaluate")\n')
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "__init__.py").write_text("PIPELINES = []  # not a declaration\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert checkout_pipelines(tmp_path) == ["toyseg:PIPELINE"]
    found = {p.name: p for p in discover(root=tmp_path)}
    assert "toyseg" in found and {p.name for p in PIPELINES} <= set(found)  # the installed ones stay
    assert "toy_masks" in run_outputs(found.values()) and "toy_masks" not in run_outputs()
    assert "| toyseg | `train` (`toyseg.train`) | `toyseg.evaluate` | `toyseg.evaluate` |" in stage_table(
        [found["toyseg"]])
    (tmp_path / "run" / "toy_masks").mkdir(parents=True)
    assert matching_outputs(tmp_path / "run", run_outputs(found.values())) == [tmp_path / "run" / "toy_masks"]


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


def _writes_stage(module_name: str, stage: str) -> bool:
    """Whether the module's source writes ``stage`` as a run's stage: ``"stage": "<stage>"`` or ``stage="<stage>"``."""
    tree = ast.parse((REPO / (module_name.replace(".", "/") + ".py")).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value == "stage" and isinstance(v, ast.Constant) and v.value == stage
                for k, v in zip(node.keys, node.values)):
            return True
        if isinstance(node, ast.keyword) and node.arg == "stage" and isinstance(node.value, ast.Constant) \
                and node.value.value == stage:
            return True
    return False


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_stages_predicting_and_scoring_commands_are_declared_and_run(pipeline, capsys):
    """One multi-stage convention: each stage names the command that trains it (a command training several stages
    takes them as ``--stage`` choices, one stage's command writes its name into ``model.json``); ``evaluate``
    scores in every pipeline, and predicts too unless the pipeline names another predicting command."""
    stages = [stage for stage, _ in pipeline.stages]
    assert stages and len(set(stages)) == len(stages)
    assert pipeline.scores == f"{pipeline.name}.evaluate"
    for module_name in {*(module for _, module in pipeline.stages), pipeline.predicts, pipeline.scores}:
        assert module_name in pipeline.commands, module_name
        module = importlib.import_module(module_name)
        assert callable(module.main) and isinstance(module.get_args_parser(), argparse.ArgumentParser)
        with pytest.raises(SystemExit) as info:
            module.main(["--help"])
        assert info.value.code == 0 and capsys.readouterr().out.startswith("usage:")
    for module_name in {module for _, module in pipeline.stages}:
        own = [stage for stage, m in pipeline.stages if m == module_name]
        flags = [a for a in importlib.import_module(module_name).get_args_parser()._actions
                 if "--stage" in a.option_strings]
        if len(own) > 1:
            assert flags and list(flags[0].choices) == own, (module_name, own)
        else:
            assert _writes_stage(module_name, own[0]), (module_name, own[0])


@pytest.mark.parametrize("pipeline", [p for p in PIPELINES if p.predicts != p.scores], ids=lambda p: p.name)
def test_evaluate_without_predictions_asks_for_the_predicting_command(pipeline, tmp_path, capsys):
    code = importlib.import_module(pipeline.scores).main(["--run-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert f"python -m {pipeline.predicts}" in err


def test_architecture_and_each_readme_state_the_stage_convention():
    assert stage_table() in (REPO / "ARCHITECTURE.md").read_text()
    for pipeline in PIPELINES:
        readme = REPO / pipeline.name / "README.md"
        readme = readme if readme.is_file() else REPO / "README.md"
        assert stage_table([pipeline]) in readme.read_text(), readme
