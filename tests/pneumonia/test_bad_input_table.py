"""The bad-input tables of pneumonia.train and pneumonia.evaluate: exit code 2, one line naming the file or flag,
nothing already written lost.

Each case builds its world in ``tmp_path`` (data copies, a copy of a trained run) and returns the argv, the text
the error line must name, and the folder whose files must come out of the failed command unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumonia import evaluate as pn_evaluate
from pneumonia import train as pn_train


def _snapshot(folder: Path | None) -> dict[str, bytes]:
    if folder is None or not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _npz(folder: Path, **overrides) -> Path:
    """A small valid PneumoniaMNIST file with some arrays replaced."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    arrays.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "pneumoniamnist.npz", **arrays)
    return folder / "pneumoniamnist.npz"


def _pn_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--output-dir", str(out), "--arch", "resnet-tiny", "--epochs", "1",
            "--no-progress", *extra]


# --- pneumonia.train -----------------------------------------------------------------------------------------------

def _flag(flag: str, value: str):
    def case(tmp, run):
        return _pn_train_args(tmp / "data", tmp / "out", flag, value), [flag], None
    return case


def _config(text: bytes | str, key: str):
    def case(tmp, run):
        config = tmp / "train.yaml"
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--config", str(config), *_pn_train_args(tmp / "data", tmp / "out")], [str(config), key], None
    return case


def _existing_run(*extra: str, needles=("--output-dir", "already holds a run")):
    def case(tmp, run):
        return _pn_train_args(tmp / "data", run, *extra), list(needles), run
    return case


def _resume_changed(flag: str, value: str, key: str):
    def case(tmp, run):
        args = ["--data-root", str(tmp / "data"), "--output-dir", str(run), "--arch", "resnet-tiny", "--epochs", "4",
                "--batch-size", "32", "--lr", "3e-3", "--no-progress", "--seed", "0", "--resume", flag, value]
        return args, ["--resume", key], run
    return case


def _data_case(**overrides):
    def case(tmp, run):
        npz = _npz(tmp / "bad", **overrides)
        return _pn_train_args(tmp / "bad", tmp / "out"), [str(npz)], None
    return case


def _output_is_file(tmp, run):
    (tmp / "afile").write_text("keep me")
    return _pn_train_args(tmp / "data", tmp / "afile"), ["--output-dir", "is a file"], tmp


TRAIN_CASES = {
    "lr nan": _flag("--lr", "nan"),
    "lr negative": _flag("--lr", "-0.1"),
    "num-workers negative": _flag("--num-workers", "-1"),
    "train-limit 0": _flag("--train-limit", "0"),
    "train-limit negative": _flag("--train-limit", "-5"),
    "epochs 0": _flag("--epochs", "0"),
    "batch-size text": _flag("--batch-size", "many"),
    "seed text": _flag("--seed", "abc"),
    "max-steps 0": _flag("--max-steps", "0"),
    "clip inf": _flag("--clip-grad-norm", "inf"),
    "min-lr-ratio 2": _flag("--min-lr-ratio", "2"),
    "unknown device": _flag("--device", "gpu"),
    "absent cuda index": _flag("--device", "cuda:7"),
    "bad monitor": _flag("--monitor", "val_auc"),
    "bad choice": _flag("--arch", "resnet1000"),
    "unknown flag": _flag("--epoch", "3"),
    "output dir is a file": _output_is_file,
    "yaml wrong type": _config("epochs: ten\n", "epochs"),
    "yaml string for boolean": _config('augment: "no"\n', "augment"),
    "yaml number for boolean": _config("augment: 0\n", "augment"),
    "yaml float for int": _config("batch-size: 3.5\n", "batch-size"),
    "yaml bool for int": _config("epochs: true\n", "epochs"),
    "yaml nan": _config("lr: .nan\n", "lr"),
    "yaml list for scalar": _config("lr: [1, 2]\n", "lr"),
    "yaml not utf-8": _config(b"epochs: 3\narch: r\xe9snet\n", "UTF-8"),
    "yaml bad choice": _config("arch: vgg\n", "arch"),
    "rerun without resume": _existing_run(),
    "resume and overwrite": _existing_run("--resume", "--overwrite", needles=("--overwrite",)),
    "resume with changed arch": _resume_changed("--batch-size", "16", "batch_size"),
    "resume with changed batch": _resume_changed("--threshold-rule", "f1", "threshold_rule"),
    "empty training split": _data_case(train_images=np.zeros((0, 28, 28), np.uint8),
                                       train_labels=np.zeros((0, 1), np.uint8)),
    "one-class validation": _data_case(val_labels=np.zeros((6, 1), np.uint8)),
    "empty validation split": _data_case(val_images=np.zeros((0, 28, 28), np.uint8),
                                         val_labels=np.zeros((0, 1), np.uint8)),
}


@pytest.fixture
def world(tmp_path, trained_pneumonia_run):
    run_dir, npz = trained_pneumonia_run
    (tmp_path / "data").mkdir()
    shutil.copy(npz, tmp_path / "data" / npz.name)
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    return tmp_path, run


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_pneumonia_train_bad_input(case, world, assert_one_error_line):
    tmp, run = world
    argv, needles, keep = TRAIN_CASES[case](tmp, run)
    before = _snapshot(keep)
    assert pn_train.main(argv) == 2
    assert_one_error_line(needles)
    assert _snapshot(keep) == before
    assert not (tmp / "out").exists()


def test_yaml_values_obey_the_flag_rules(world):
    tmp, _ = world
    config = tmp / "ok.yaml"
    config.write_text("augment: false\nlr: 1e-3\nbatch-size: 16\ntrain_limit: 40\n")
    args = pn_train.parse_args(pn_train.get_args_parser(), ["--config", str(config)])
    assert (args.augment, args.lr, args.batch_size, args.train_limit) == (False, 1e-3, 16, 40)


# --- pneumonia.evaluate --------------------------------------------------------------------------------------------

def _edit_meta(**changes):
    def case(tmp, run):
        path = run / "best" / "model.json"
        meta = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value
        path.write_text(json.dumps(meta))
        return ["--run-dir", str(run)], [str(path), next(iter(changes))], run
    return case


def _damage(relative: str, blob: bytes, needle: str | None = None):
    def case(tmp, run):
        path = run / relative
        path.write_bytes(blob)
        return ["--run-dir", str(run)], [str(path)] + ([needle] if needle else []), run
    return case


def _empty_test_split(tmp, run):
    npz = _npz(tmp / "empty", test_images=np.zeros((0, 28, 28), np.uint8), test_labels=np.zeros((0, 1), np.uint8))
    return ["--run-dir", str(run), "--data-root", str(tmp / "empty")], [str(npz), "empty"], run


EVALUATE_CASES = {
    "model.json without threshold": _edit_meta(thresholds={}),
    "model.json without preset": _edit_meta(preset=None),
    "model.json without format": _edit_meta(format=None),
    "model.json older format": _edit_meta(format="medvl-model-0"),
    "model.json threshold as text": _edit_meta(thresholds={"decision": "high"}),
    "model.json threshold above 1": _edit_meta(thresholds={"decision": 1.5}),
    "model.json unknown preset": _edit_meta(preset="vgg"),
    "model.json size not an int": _edit_meta(preprocessing={"image_size": "28"}),
    "model.json kwargs not a dict": _edit_meta(kwargs=[]),
    "model.json unknown kwarg": _edit_meta(kwargs={"depth": 3}),
    "model.json of another pipeline": _edit_meta(pipeline="cxr_localize"),
    "model.json of another stage": _edit_meta(stage="pretrain"),
    "model.json not JSON": _damage("best/model.json", b"{oops", "not valid JSON"),
    "weights garbage": _damage("best/model.safetensors", b"\x00" * 16, "cannot read weights"),
    "metrics.jsonl broken line": _damage("metrics.jsonl", b'{"epoch": 1}\nnot json\n{"epoch": 2}\n', "line 2"),
    "empty test split": _empty_test_split,
    "n-boot 0": lambda tmp, run: (["--run-dir", str(run), "--n-boot", "0"], ["--n-boot"], run),
    "bad split": lambda tmp, run: (["--run-dir", str(run), "--split", "holdout"], ["--split"], run),
    "missing run dir": lambda tmp, run: (["--run-dir", str(tmp / "nope")], [str(tmp / "nope")], run),
    "no run dir flag": lambda tmp, run: ([], ["--run-dir", "required"], run),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_pneumonia_evaluate_bad_input(case, world, capsys, assert_one_error_line):
    tmp, run = world
    assert pn_evaluate.main(["--run-dir", str(run), "--n-boot", "20", "--gallery", "0"]) == 0
    capsys.readouterr()
    argv, needles, keep = EVALUATE_CASES[case](tmp, run)
    before = _snapshot(keep)
    assert pn_evaluate.main(argv) == 2
    assert_one_error_line(needles)
    assert _snapshot(keep) == before  # the earlier predictions and results are all still there


def test_partial_last_metrics_line_is_tolerated(world):
    _, run = world
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"epoch": 5, "tr')
    assert pn_evaluate.main(["--run-dir", str(run), "--n-boot", "20", "--gallery", "0"]) == 0
