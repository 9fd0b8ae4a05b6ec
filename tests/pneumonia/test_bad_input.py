"""Every bad input gives one line naming the file and the problem, exit code 2, and leaves written files alone."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia import evaluate, train


def _write(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "pneumoniamnist.npz", **arrays)
    return path / "pneumoniamnist.npz"


def _run_train(data_root, out, *extra):
    return train.main(["--data-root", str(data_root), "--output-dir", str(out), "--arch", "resnet-tiny",
                       "--epochs", "1", "--no-progress", *extra])


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


BAD_ARRAYS = {
    "missing key": ({"val_labels": None}, "missing key 'val_labels'"),
    "wrong shape": ({"train_images": np.zeros((12, 32, 32), np.uint8)}, "expected (N, 28, 28)"),
    "wrong dtype": ({"train_images": np.zeros((12, 28, 28), np.float32)}, "expected uint8"),
    "label out of range": ({"train_labels": np.full((12, 1), 2, np.uint8)}, "holds [2]"),
    "length mismatch": ({"val_labels": np.zeros((5, 1), np.uint8)}, "6 images but 5 labels"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_npz_structure(tmp_path, capsys, case):
    overrides, needle = BAD_ARRAYS[case]
    npz = _write(tmp_path / "data", **overrides)
    assert _run_train(tmp_path / "data", tmp_path / "run") == 2
    _one_error_line(capsys, str(npz), needle)


def test_one_class_training_split(tmp_path, capsys):
    """A training split of one class is refused before training, naming the file (the val check alone let it by)."""
    npz = _write(tmp_path / "data", train_labels=np.ones((12, 1), np.uint8))
    assert _run_train(tmp_path / "data", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    assert err.strip().splitlines()[-1] == (f"error: {npz}: the training split holds only 'pneumonia' images (12); "
                                            "a classifier needs both classes to learn from")
    assert not (tmp_path / "run" / "best").exists()


def test_missing_data_root_and_missing_file(tmp_path, capsys):
    assert train.main(["--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    _one_error_line(capsys, "--data-root")
    assert _run_train(tmp_path / "empty", tmp_path / "run") == 2
    line = _one_error_line(capsys, "pneumoniamnist.npz", "file not found")
    assert "zenodo" in line and "put it in" in line


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_npz(tmp_path, capsys, damage):
    npz = _write(tmp_path / "data")
    blob = npz.read_bytes()
    npz.write_bytes(b"not a zip at all" if damage == "garbage" else blob[: len(blob) // 2])
    assert _run_train(tmp_path / "data", tmp_path / "run") == 2
    _one_error_line(capsys, str(npz))


def test_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 2\nlearning_rate: 0.1\n")
    assert train.main(["--config", str(config), "--data-root", str(tmp_path)]) == 2
    _one_error_line(capsys, str(config), "unknown key 'learning_rate'")


def test_run_dir_without_model(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert evaluate.main(["--run-dir", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, str(tmp_path / "run"), "no trained model")


def test_resume_without_checkpoint_keeps_existing_files(tmp_path, capsys):
    _write(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"auroc": 0.9}')
    assert _run_train(tmp_path / "data", run, "--resume") == 2
    _one_error_line(capsys, "checkpoints/last", "no checkpoint")
    assert (run / "results.json").read_text() == '{"auroc": 0.9}'
