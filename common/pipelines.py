"""Pipeline declarations: what each pipeline tells the floor about itself, found without naming it.

Each pipeline package holds one ``PIPELINE = Pipeline(...)`` in its ``__init__.py``. In a checkout that is all the
floor needs (``checkout_pipelines`` finds the top-level packages that declare one); an installed distribution also
lists it in the ``medvl.declarations`` entry-point group (``<name> = "<package>:PIPELINE"``). The floor reads the
declarations here and nowhere names a pipeline:

    run_outputs   the files and folders (names or glob patterns, relative to the run directory) that the pipeline's
                  commands write into a run directory, beyond the training loop's own (``FLOOR_OUTPUTS``):
                  ``--overwrite`` removes the union over every declared pipeline (``run_outputs()``)
    demo          ``"module:function"`` of its ``make demo`` section: ``demo_section(out_dir) -> str`` (``common.demo``)
    app           ``"module:attr"`` of its ``common.app.AppSpec`` (the web app's tab)
    commands      the modules its command lines run (``python -m <module>``), for documentation and the
                  entry-point tests
    stages        its training, in order: ``(stage, command module)`` pairs; a run of a stage writes ``"stage":
                  <stage>`` into ``model.json``, and a command that trains several stages takes ``--stage <stage>``
    predicts      the command that writes a trained run's ``predictions/``
    scores        the command that scores those predictions into the run's results: always ``<package>.evaluate``,
                  which also predicts unless ``predicts`` names another command (then it asks for that one first)
    tokenizer_corpora  ``{name: "module:function"}``: text corpora a tiny tokenizer of ``common.tiny`` may be
                  trained on (only called to rebuild ``common/assets/tiny_tokenizers.json``)

Importing a declared package also registers the presets only that pipeline uses (``common.presets``), so
``python -m common.presets`` lists them after ``discover()``.

    python -c "from common.pipelines import discover; print([p.name for p in discover()])"
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.rundir.layout import FLOOR_OUTPUTS

GROUP = "medvl.declarations"

@dataclass(frozen=True)
class Pipeline:
    """One pipeline, as the floor sees it (see the module docstring for each field)."""

    name: str  # the package, and ``model.json``'s ``pipeline``
    title: str
    run_outputs: tuple[str, ...] = ()
    demo: str = ""
    app: str = ""
    commands: tuple[str, ...] = field(default=())
    stages: tuple[tuple[str, str], ...] = ()
    predicts: str = ""
    scores: str = ""
    tokenizer_corpora: dict[str, str] = field(default_factory=dict)

    def demo_section(self) -> Callable[[Path], str]:
        """The pipeline's ``demo_section(out_dir) -> str``."""
        return _attr(self.demo, "demo_section")

    def app_spec(self) -> Any:
        """The pipeline's ``AppSpec``."""
        return _attr(self.app, "APP")


def stage_table(pipelines: Iterable[Pipeline] | None = None) -> str:
    """The Markdown table of each pipeline's stages, predicting and scoring commands (ARCHITECTURE.md holds it)."""
    rows = ["| pipeline | training stages, in order: `stage` (command) | predicts | scores |", "|---|---|---|---|"]
    for pipeline in discover() if pipelines is None else pipelines:
        stages = " → ".join(f"`{stage}` (`{module}" + (f" --stage {stage}" if _shared(pipeline, module) else "") + "`)"
                            for stage, module in pipeline.stages)
        rows.append(f"| {pipeline.name} | {stages} | `{pipeline.predicts}` | `{pipeline.scores}` |")
    return "\n".join(rows) + "\n"


def _shared(pipeline: Pipeline, module: str) -> bool:
    """Whether ``module`` trains more than one of ``pipeline``'s stages (it then takes ``--stage``)."""
    return sum(m == module for _, m in pipeline.stages) > 1


def _attr(value: str, default: str) -> Any:
    module, _, attr = value.partition(":")
    return getattr(importlib.import_module(module.strip()), (attr or default).strip())


def entry_point_values(group: str, pyproject: Path | None = None) -> list[str]:
    """The values of entry-point ``group``, sorted by name: the installed ones, else those of this checkout's
    ``pyproject.toml`` (an editable install made before the group existed has none)."""
    values = [ep.value for ep in sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)]
    if values:
        return values
    pyproject = pyproject or Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed entry points are the only source
        return []
    table = tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {}).get(group, {})
    return [table[name] for name in sorted(table)]


def load_declared(value: str, kind: type, default_attr: str, flag: str = "pipelines") -> Any:
    """The ``kind`` object that ``value`` (``module:attr``, or a module holding ``default_attr``) names; anything
    else is one ConfigError naming ``flag``."""
    module, _, attr = value.partition(":")
    try:
        spec = getattr(importlib.import_module(module.strip()), (attr or default_attr).strip())
    except (ImportError, AttributeError) as err:
        raise ConfigError(flag, f"{value!r} does not name a {kind.__name__} ({err})") from err
    if not isinstance(spec, kind):
        raise ConfigError(flag, f"{value!r} is a {type(spec).__name__}, not a {kind.__name__}")
    return spec


def load(value: str) -> Pipeline:
    """The ``Pipeline`` that ``value`` (``package:PIPELINE``, or a package holding ``PIPELINE``) names."""
    return load_declared(value, Pipeline, "PIPELINE")


def tokenizer_corpus(name: str) -> Callable[[], list[str]]:
    """The corpus function a declared pipeline registers under ``name`` (``Pipeline.tokenizer_corpora``)."""
    for pipeline in discover():
        if name in pipeline.tokenizer_corpora:
            return _attr(pipeline.tokenizer_corpora[name], "")
    raise ConfigError("tokenizer corpus", f"no declared pipeline provides a corpus named {name!r}")


_DECLARATION = re.compile(r"^PIPELINE\s*=\s*Pipeline\(", re.MULTILINE)


def checkout_pipelines(root: Path | None = None) -> list[str]:
    """``package:PIPELINE`` for each top-level package of the checkout (``root``, default the folder holding
    ``common/``, when it holds a ``pyproject.toml``) whose ``__init__.py`` assigns ``PIPELINE = Pipeline(...)``,
    sorted: a new pipeline in a checkout is found from its own folder, without an entry in ``pyproject.toml``. The
    files are read as text, not imported."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():  # an installed medvl (site-packages): its entry points say it all
        return []
    found = []
    for init in sorted(root.glob("*/__init__.py")):
        package = init.parent.name
        if package.isidentifier() and not package.startswith("_"):
            try:
                if _DECLARATION.search(init.read_text(encoding="utf-8")):
                    found.append(f"{package}:PIPELINE")
            except (OSError, UnicodeDecodeError):
                continue
    return found


def discover(names: Sequence[str] | None = None, root: Path | None = None) -> list[Pipeline]:
    """The declared pipelines, in name order: those of ``names``, else the ``medvl.declarations`` entry points (an
    installed distribution) together with the packages of the checkout that declare one (``checkout_pipelines``)."""
    if names:
        return [load(v) for v in names]
    values = {v.partition(":")[0]: v for v in checkout_pipelines(root)}
    values.update({v.partition(":")[0]: v for v in entry_point_values(GROUP)})
    return [load(values[package]) for package in sorted(values)]


def run_outputs(pipelines: Iterable[Pipeline] | None = None) -> tuple[str, ...]:
    """Every name a run directory may hold from an earlier run: the floor's and each declared pipeline's."""
    pipelines = discover() if pipelines is None else pipelines
    names = list(FLOOR_OUTPUTS)
    for pipeline in pipelines:
        names += [n for n in pipeline.run_outputs if n not in names]
    return tuple(names)


def matching_outputs(run_dir: Path, patterns: Iterable[str]) -> list[Path]:
    """The entries of ``run_dir`` (top level only) that one of ``patterns`` names, sorted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    patterns = tuple(patterns)
    return sorted(p for p in run_dir.iterdir() if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))


__all__ = ["GROUP", "FLOOR_OUTPUTS", "Pipeline", "entry_point_values", "load_declared", "load", "discover",
           "checkout_pipelines",
           "tokenizer_corpus", "stage_table",
           "run_outputs", "matching_outputs"]
