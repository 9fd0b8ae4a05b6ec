"""One run format for every pipeline: the ``best/model.json`` schema, and the loader every tool uses.

``model.json`` (beside ``model.safetensors``) holds:

    format         "medvl-model-1"
    pipeline       the package that trained it (its ``common.pipelines`` declaration's name)
    stage          the training script that wrote it: "train", "pretrain", ...
    preset         the model preset (``common.presets``) or architecture the pipeline's builder takes
    kwargs         the builder's keyword arguments, so the model is rebuilt from this file alone
    labels         class names (empty where the task has none)
    preprocessing  what an input goes through before the model (image size, normalisation, ...)
    thresholds     decision thresholds chosen on validation ({"decision": 0.26}, {"mask": 0.5})
    monitor        the validation metric that chose this epoch
    data           where the training data came from ({"root": ..., ...}); tools default to it
    val_metrics    that epoch's validation numbers
    git_sha, versions   provenance, added by ``common.rundir.save_model``

Pipelines may add keys of their own (one records its text encoder); these are the ones every
tool can rely on. ``read_run_record`` is the one reader of the file (checked); ``load_run`` the one loader of a
trained model: it rebuilds the model with the pipeline's builder and loads the weights, turning every way that can
fail into one line naming the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, DataError
from common.rundir import (
    META_FILE,
    WEIGHTS_FILE,
    find_model_dir,
    load_model_state,
    read_model_json,
    read_weights,
    require_keys,
    save_model,
)

log = logging.getLogger("medvl.runs")

MODEL_FORMAT = "medvl-model-1"
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format": str, "pipeline": str, "stage": str, "preset": str, "kwargs": dict, "labels": list,
    "preprocessing": dict, "thresholds": dict, "monitor": (str, type(None)), "data": dict,
}


def model_record(*, pipeline: str, stage: str, preset: str, kwargs: dict[str, Any], labels: list[str],
                 preprocessing: dict[str, Any], thresholds: dict[str, float], monitor: str | None,
                 data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A ``model.json`` record in the one schema (keyword-only, so no field is forgotten)."""
    return {"format": MODEL_FORMAT, "pipeline": pipeline, "stage": stage, "preset": preset, "kwargs": dict(kwargs),
            "labels": list(labels), "preprocessing": dict(preprocessing), "thresholds": dict(thresholds),
            "monitor": monitor, "data": dict(data), **extra}


def save_run_model(directory: Path, model: torch.nn.Module, record: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``model.json`` after checking the record against the schema."""
    check_record(record, Path(directory) / META_FILE)
    return save_model(directory, model, record)


def check_record(meta: Any, path: Path) -> dict[str, Any]:
    """Every schema key present with its type, and thresholds that are probabilities."""
    require_keys(meta, path, {"format": str})
    if meta["format"] != MODEL_FORMAT:
        raise DataError(path, f"format {meta['format']!r} is not {MODEL_FORMAT!r} (written by another medvl "
                              "version; retrain)")
    require_keys(meta, path, SCHEMA)
    for name, value in meta["thresholds"].items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise DataError(path, f"thresholds.{name} must be a number in [0, 1], not {value!r}")
    if not all(isinstance(label, str) for label in meta["labels"]):
        raise DataError(path, "labels must be a list of class names")
    return meta


@dataclass
class LoadedRun:
    """A run's best model (eval mode, on the requested device), its ``model.json`` and the folder they came from."""

    model: torch.nn.Module
    meta: dict[str, Any]
    directory: Path


def read_run_record(run_dir: Path, pipeline: str | None = None,
                    stage: str | Sequence[str] | None = None) -> tuple[dict[str, Any], Path]:
    """``(model.json, folder)`` of a run's best model (a run directory or its ``best/``), checked against the schema,
    its weights file present and, when given, to be ``pipeline``'s and of ``stage`` (one stage or several). The one
    reader of ``model.json``: a tool answers a finished or mismatched job from it before any model is built.
    """
    directory = find_model_dir(Path(run_dir))
    path = directory / META_FILE
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(weights, "no trained model here (run training first, or pass the run directory)")
    meta = read_model_json(directory)
    if isinstance(meta, dict) and "format" not in meta and ("arch" in meta or "kind" in meta):
        raise DataError(path, "written by an older medvl (no 'format' key); retrain to use it here")
    check_record(meta, path)
    if pipeline is not None and meta["pipeline"] != pipeline:
        raise DataError(path, f"pipeline is {meta['pipeline']!r}: not a {pipeline} model")
    stages = (stage,) if isinstance(stage, str) else tuple(stage or ())
    if stages and meta["stage"] not in stages:
        raise DataError(path, f"stage is {meta['stage']!r}: this needs a {pipeline or meta['pipeline']} "
                              f"{' or '.join(stages)} model")
    return meta, directory


def load_run(run_dir: Path, pipeline: str, build: Callable[[dict[str, Any]], torch.nn.Module],
             stage: str | Sequence[str] | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's best model from ``model.json`` with ``build(meta)`` and load its weights: the one loader of
    a trained model, for every pipeline and stage (``stage``: the stages the caller accepts; default any). A builder
    may return part of a larger model (a pre-training stage's encoder, loaded into the model that trains next).

    Raises:
        DataError: no model, a model of another pipeline or stage, a key missing or of the wrong type, a record
            the builder rejects, or weights that do not fit the rebuilt model; each names the file.
    """
    meta, directory = read_run_record(run_dir, pipeline, stage)
    state = read_weights(directory)
    try:
        model = build(meta)
    except TypeError as err:
        raise DataError(directory / META_FILE, f"kwargs do not fit preset {meta['preset']!r} ({err})") from err
    except (ConfigError, KeyError, ValueError) as err:
        reason = err.message if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
        raise DataError(directory / META_FILE, f"does not describe a buildable model ({reason})") from err
    load_model_state(model, state, directory / WEIGHTS_FILE)
    return LoadedRun(model.to(device).eval(), meta, directory)


def run_state(run_dir: Path) -> str:
    """``done`` (finished, with a best model), ``partial`` (started: resume or redo) or ``new``."""
    from common.rundir import BEST_DIR, LAST_DIR, committed_dir

    run_dir = Path(run_dir)
    trainer = committed_dir(run_dir / LAST_DIR) / "trainer.json"
    if trainer.is_file():
        try:
            finished = json.loads(trainer.read_text())["loop"]["finished"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(trainer, f"unreadable ({err}); remove {run_dir} to train this run again") from err
        return "done" if finished and (run_dir / BEST_DIR).is_dir() else "partial"
    return "partial" if run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()) else "new"


def settings_changes(module, argv: list[str], run_dir: Path) -> list[str]:
    """``key old -> new`` for each setting of ``module``'s parsed ``argv`` that differs from the run's
    ``config.yaml`` (settings that do not change the weights, such as the device, and settings left to the script's
    own default (None), left out)."""
    import yaml

    from common.cli import config_text, parse_args
    from common.rundir import RESUMABLE_CHANGES

    path = Path(run_dir) / "config.yaml"
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return [f"{path.name} (unreadable)"]
    new = yaml.safe_load(config_text(parse_args(module.get_args_parser(), argv))) or {}
    if not isinstance(old, dict):
        return [f"{path.name} (not a mapping)"]
    keys = sorted((set(old) | set(new)) - set(RESUMABLE_CHANGES))
    # A None the script resolves later (a per-stage default) is compared by what the run recorded, not by None.
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if new.get(k) is not None and old.get(k) != new.get(k)]


def train_or_resume(module, argv: list[str], run_dir: Path) -> None:
    """Run ``module.main(argv)`` for ``run_dir`` unless it finished with these settings: resumed when it has a
    checkpoint, redone (``--overwrite``) when it stopped before its first one or was trained with other settings
    (logged), so a driver of several runs (ablations) never mixes runs of old settings into a new table."""
    from common.rundir import LAST_DIR

    state = run_state(run_dir)
    changes = settings_changes(module, argv, run_dir) if state != "new" else []
    if changes:
        log.warning("%s was trained with other settings (%s); training it again", run_dir, "; ".join(changes))
        state = "stale"
    elif state == "done":
        return
    flag = ["--resume"] if state == "partial" and (Path(run_dir) / LAST_DIR).exists() else (
        ["--overwrite"] if state in ("partial", "stale") else [])
    code = module.main([*argv, *flag])
    if code != 0:
        raise DataError(run_dir, f"{module.__name__} failed (exit {code}); see the line above")


__all__ = ["run_state", "settings_changes", "train_or_resume", "MODEL_FORMAT", "SCHEMA", "model_record",
           "save_run_model", "check_record", "read_run_record", "load_run", "LoadedRun"]
