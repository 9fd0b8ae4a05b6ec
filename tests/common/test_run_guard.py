"""The run-safety floor (``common.run_guard``) in every writing command: inputs are never outputs, one writer per
run, result sets staged apart and never dropped at a symlink, planted pickles refused in one line.

The guard runs right after argument parsing, so most cases need no data: a folder with one file stands for the
input, and the test checks that the command stopped (exit 2, one line) before touching it.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.errors import ConfigError, DataError
from common.run_guard import LOCK_FILE, check_not_inputs, run_lock
from common.rundir import pending_dirs, result_set

REPO = Path(__file__).resolve().parents[2]


def _state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (bytes and mtime) and every folder: what an untouched input keeps."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else (b"dir", 0)
            for p in sorted(folder.rglob("*"))}


def _folder(path: Path, *files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in files or ("keep.txt",):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(f"input {name}\n")
    return path


def _run_like(path: Path) -> Path:
    return _folder(path, "best/model.json", "best/model.safetensors", "config.yaml", "split.csv")


def _main(module: str):
    return importlib.import_module(module).main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- inputs are never outputs: (module, build(tmp) -> (argv, output flag, input flag, the input folder)) ----------

def _same(out_flag, in_flag, make=_folder, out_sub=None, extra=()):
    def build(tmp):
        inp = make(tmp / "input")
        out = inp / out_sub if out_sub else inp
        return [*extra, in_flag, str(inp), out_flag, str(out)], out_flag, in_flag, inp
    return build


def _file_case(out_flag, in_flag, name, extra_flags=()):
    """An output file that is the input file (``--json`` == ``--gold``)."""
    def build(tmp):
        folder = _folder(tmp / "input", name)
        target = folder / name
        argv = [in_flag, str(target), out_flag, str(target)]
        for flag in extra_flags:
            argv += [flag, str(_folder(tmp / flag.strip("-")) / "x.csv")]
        return argv, out_flag, in_flag, folder
    return build


def _run_file(out_flag, target, run_flag="--run-dir", extra=()):
    """An output file that is a file the run needs (``generate --out RUN/best/model.json``)."""
    def build(tmp):
        run = _run_like(tmp / "input")
        return [*extra, run_flag, str(run), out_flag, str(run / target)], out_flag, run_flag, run
    return build


OVERLAP_CASES = {
    "pneumonia.train out=data": ("pneumonia.train", _same("--output-dir", "--data-root")),
    "pneumonia.train out in data": ("pneumonia.train", _same("--output-dir", "--data-root", out_sub="runs/a")),
    "pneumonia.report out=run": ("pneumonia.report", _same("--output-dir", "--run-dir", _run_like)),
    "pneumonia.retrieval out=run best": ("pneumonia.retrieval",
                                         _same("--output-dir", "--run-dir", _run_like, "best", ["build"])),
    "cxr_localize.train out=encoder-init": ("cxr_localize.train", _same("--output-dir", "--encoder-init",
                                                                        _run_like)),
    "cxr_localize.pretrain out=data": ("cxr_localize.pretrain", _same("--output-dir", "--data-root")),
    "cxr_localize.evaluate run in data": ("cxr_localize.evaluate", _same("--run-dir", "--data-root",
                                                                         out_sub="run")),
    "mavl.train_fusion out=image-run": ("mavl_chexpert.train_fusion", _same("--output-dir", "--image-run",
                                                                            _run_like)),
    "mavl.train_image out in data": ("mavl_chexpert.train_image", _same("--output-dir", "--data-root",
                                                                        out_sub="run")),
    "mavl.text out=cache-dir": ("mavl_chexpert.text", _same("--output-dir", "--cache-dir")),
    "mavl.ablate out=cache-dir": ("mavl_chexpert.ablate", _same("--output-dir", "--cache-dir")),
    "pathology.train out=feature-cache": ("pathology_brats.train", _same("--output-dir", "--feature-cache")),
    "pathology.ablate out in data": ("pathology_brats.ablate", _same("--output-dir", "--data-root",
                                                                     out_sub="abl")),
    "pathology.evaluate run=feature-cache": ("pathology_brats.evaluate", _same("--run-dir",
                                                                               "--feature-cache", _run_like)),
    "pathology.submit out in run": ("pathology_brats.submit", _run_file("--out", "sub.csv",
                                                                       extra=["--images", "/nonexistent"])),
    "pathology.caption out=labels-csv": ("pathology_brats.caption",
                                         _file_case("--out", "--labels-csv", "labels.csv", ["--data-root"])),
    "pathology.score json=gold": ("pathology_brats.score", _file_case("--json", "--gold", "gold.csv",
                                                                      ["--submission"])),
    "brain3d.train out=init": ("brain3d_report.train", _same("--output-dir", "--init", _run_like,
                                                             extra=["--stage", "warmup"])),
    "brain3d.train out=volume-cache": ("brain3d_report.train", _same("--output-dir", "--volume-cache")),
    "brain3d.generate out=best weights": ("brain3d_report.generate", _run_file("--out", "best/model.json",
                                                                               extra=["--split", "test"])),
    "brain3d.generate out=config": ("brain3d_report.generate", _run_file("--out", "config.yaml")),
    "pneumonia.predict out=input": ("pneumonia.predict", _same("--out", "--input",
                                                               extra=["--run-dir", "/nonexistent"])),
    "cxr_localize.predict out in input": ("cxr_localize.predict", _same("--out", "--input", out_sub="preds",
                                                                        extra=["--run-dir", "/nonexistent"])),
    "mavl.predict out=run best": ("mavl_chexpert.predict", _run_file("--out", "best", extra=["--input", "/x.png"])),
    "brain3d.predict out=run": ("brain3d_report.predict", _same("--out", "--run-dir", _run_like,
                                                                 extra=["--input", "/x.nii.gz"])),
    "pathology.extract cache=data": ("pathology_brats.extract", _same("--feature-cache", "--data-root")),
    "brain3d.data write-split=split": ("brain3d_report.data", _file_case("--write-split", "--split", "split.csv")),
}


@pytest.mark.parametrize("case", OVERLAP_CASES)
def test_an_output_that_is_an_input_is_refused_before_anything_is_written(case, tmp_path, capsys):
    module, build = OVERLAP_CASES[case]
    argv, out_flag, in_flag, inp = build(tmp_path)
    before = _state(inp)
    assert _main(module)(argv) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {out_flag}: ") and in_flag in line and str(inp) in line, line
    assert _state(inp) == before  # bytes, mtimes, no new file or folder (no lock file left either)


def test_outputs_beside_inputs_are_allowed(tmp_path):
    data = _folder(tmp_path / "data")
    run = _run_like(tmp_path / "run")
    check_not_inputs({"--output-dir": tmp_path / "run2"}, {"--data-root": data, "--init": run})
    check_not_inputs({"--out": data / "captions.jsonl"}, {}, beside={"--data-root": data})  # caption's default
    check_not_inputs({"--out": run / "predictions" / "x.jsonl"}, {"--run-dir": [run / "best", run / "config.yaml"]})
    with pytest.raises(ConfigError, match="contains --data-root"):
        check_not_inputs({"--out": tmp_path}, {}, beside={"--data-root": data})
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    with pytest.raises(ConfigError, match="lies inside --data-root"):  # symlinks are followed
        check_not_inputs({"--output-dir": tmp_path / "link" / "out"}, {"--data-root": data})


# --- one writer per run -------------------------------------------------------------------------------------------

def _hold(run: Path, command: str = "holder.test"):
    """Lock ``run`` as another medvl command would (fd kept open by the caller)."""
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 424242, "command": command, "since": 0}).encode())
    return fd


LOCK_CASES = {
    "pneumonia.train": ["--output-dir", "{run}", "--data-root", "{data}", "--resume"],
    "pneumonia.evaluate": ["--run-dir", "{run}"],
    "pneumonia.explain": ["--run-dir", "{run}"],
    "pneumonia.report": ["--run-dir", "{run}"],
    "pneumonia.retrieval": ["build", "--run-dir", "{run}"],
    "cxr_localize.train": ["--output-dir", "{run}", "--data-root", "{data}", "--resume"],
    "cxr_localize.pretrain": ["--output-dir", "{run}", "--data-root", "{data}", "--resume"],
    "cxr_localize.evaluate": ["--run-dir", "{run}"],
    "mavl_chexpert.train_image": ["--output-dir", "{run}", "--data-root", "{data}", "--resume"],
    "mavl_chexpert.train_fusion": ["--output-dir", "{run}", "--image-run", "{data}", "--resume"],
    "mavl_chexpert.evaluate": ["--run-dir", "{run}"],
    "mavl_chexpert.ablate": ["--output-dir", "{run}", "--data-root", "{data}"],
    "mavl_chexpert.text": ["--output-dir", "{run}"],
    "pathology_brats.train": ["--output-dir", "{run}", "--data-root", "{data}", "--resume"],
    "pathology_brats.evaluate": ["--run-dir", "{run}"],
    "pathology_brats.ablate": ["--output-dir", "{run}", "--data-root", "{data}"],
    "brain3d_report.train": ["--output-dir", "{run}", "--data-root", "{data}", "--stage", "contrastive", "--resume"],
    "brain3d_report.generate": ["--run-dir", "{run}", "--split", "test"],
    "brain3d_report.evaluate": ["--run-dir", "{run}"],
    "brain3d_report.explain": ["--run-dir", "{run}"],
    "brain3d_report.baselines": ["--run-dir", "{run}"],
    "brain3d_report.probe": ["--run-dir", "{run}"],
    "pneumonia.predict": ["--run-dir", "{data}", "--input", "{data}/keep.txt", "--out", "{run}"],
    "brain3d_report.predict": ["--run-dir", "{data}", "--input", "{data}/keep.txt", "--out", "{run}"],
}


@pytest.mark.parametrize("module", LOCK_CASES)
def test_a_second_writer_of_a_run_stops_naming_the_first(module, tmp_path, capsys):
    run, data = _run_like(tmp_path / "run"), _folder(tmp_path / "data")
    fd = _hold(run)
    try:
        before = _state(run)
        argv = [a.format(run=run, data=data) for a in LOCK_CASES[module]]
        assert _main(module)(argv) == 2
        line = _one_line(capsys)
        assert "pid 424242 (holder.test)" in line and str(run) in line and "one writer per run" in line, line
        assert _state(run) == before
    finally:
        os.close(fd)


def test_the_lock_is_released_when_the_command_ends_and_the_holder_is_recorded(tmp_path, capsys):
    from pneumonia import evaluate

    run = _run_like(tmp_path / "run")
    assert evaluate.main(["--run-dir", str(run)]) == 2  # fails on the fake model, after taking the lock
    assert "model.json" in _one_line(capsys) and not (run / LOCK_FILE).exists()
    with run_lock(run):  # free again: a later command gets it
        record = json.loads((run / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
    fresh = tmp_path / "new"
    assert _main("pneumonia.train")(["--output-dir", str(fresh), "--data-root", str(tmp_path / "nodata")]) == 2
    capsys.readouterr()
    assert not fresh.exists()  # the folder made only to lock it is gone again


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from common.rundir import result_set
    from common.errors import MedvlError
    try:
        with result_set(Path(sys.argv[1])) as staging:
            (staging / "results.json").write_text(sys.argv[2])
            print(staging.name, flush=True)
            end = time.time() + 120
            while sys.argv[3] and not Path(sys.argv[3]).exists() and time.time() < end:
                time.sleep(0.05)  # hold the set open until the test says go
    except MedvlError as err:
        print("refused", err.source, err.message, flush=True)
""")


def _writer(run: Path, tag: str, go: Path | str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(run), tag, str(go)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_writers_of_one_result_set_never_share_staging(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    go = tmp_path / "go"
    first = _writer(run, "first", go)
    staging_name = first.stdout.readline().strip()
    assert staging_name.startswith(".pending-") and (run / staging_name).is_dir()
    second = _writer(run, "second")
    out, _ = second.communicate(timeout=60)
    assert out.startswith(f"refused {run}") and f"pid {first.pid}" in out, out
    reader = subprocess.run([sys.executable, "-c", "import sys; from common.rundir import recover_results; "
                             "recover_results(sys.argv[1])", str(run)], cwd=REPO, capture_output=True, timeout=60)
    assert reader.returncode == 0 and (run / staging_name).is_dir()  # a reader leaves a live writer's set alone
    go.touch()
    first.communicate(timeout=60)
    assert (run / "results.json").read_text() == "first" and not pending_dirs(run)
    names = []
    for tag in ("a", "b"):
        with result_set(run) as staging:
            names.append(staging.name)
            (staging / "results.json").write_text(tag)
    assert names[0] != names[1] and (run / "results.json").read_text() == "b"


def test_a_killed_writers_committed_set_is_finished_by_the_next(tmp_path):
    run = tmp_path / "run"
    (run / ".pending-1-dead" / "predictions").mkdir(parents=True)
    (run / ".pending-1-dead" / "predictions" / "test.csv").write_text("new")
    (run / ".pending-1-dead" / "COMMIT.json").write_text(json.dumps({"files": ["predictions/test.csv"]}))
    (run / ".pending-2-dead").mkdir()  # killed before its commit point
    (run / ".pending-2-dead" / "results.json").write_text("half")
    with result_set(run) as staging:
        (staging / "results.json").write_text("whole")
    assert (run / "predictions" / "test.csv").read_text() == "new" and (run / "results.json").read_text() == "whole"
    assert not pending_dirs(run)


def test_a_symlinked_folder_in_a_run_is_refused_and_the_old_results_stay(tmp_path, trained_pneumonia_run, capsys):
    from pneumonia import evaluate

    source, npz = trained_pneumonia_run
    run = Path(shutil.copytree(source, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))
    assert evaluate.main(["--run-dir", str(run), "--n-boot", "10", "--gallery", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    outside = tmp_path / "elsewhere"
    shutil.move(run / "figures", outside)
    (run / "figures").symlink_to(outside, target_is_directory=True)
    old_results, old_figures = (run / "results.json").read_bytes(), _state(outside)
    assert evaluate.main(["--run-dir", str(run), "--split", "val", "--n-boot", "10", "--gallery", "0",
                          "--device", "cpu"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {run / 'figures'}: is a symbolic link"), line
    assert (run / "results.json").read_bytes() == old_results and _state(outside) == old_figures
    assert not pending_dirs(run) and not (run / LOCK_FILE).exists()


# --- every error one line -----------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_encoder(folder: Path, marker: Path) -> Path:
    from transformers import BertConfig

    folder.mkdir(parents=True)
    BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=16).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return folder / "pytorch_model.bin"


def test_a_planted_pickle_in_a_model_folder_is_one_line(tmp_path, capsys):
    from transformers import AutoModel

    from common import hf

    marker = tmp_path / "pwned"
    weights = _pickled_encoder(tmp_path / "enc", marker)
    code = _main("mavl_chexpert.text")(["--text-encoder", str(tmp_path / "enc"), "--output-dir", str(tmp_path / "o")])
    line = _one_line(capsys)
    assert code == 2 and not marker.exists() and not (tmp_path / "o").exists()
    assert line.startswith(f"error: {weights}: pickle-format weights are never loaded"), line
    with pytest.raises(DataError) as info:  # an LM folder goes through the same loader
        hf.load_pretrained(AutoModel, tmp_path / "enc")
    assert info.value.source == str(weights) and not marker.exists()
