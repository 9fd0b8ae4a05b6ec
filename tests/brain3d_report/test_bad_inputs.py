"""One table of bad inputs per brain3d_report CLI: exit code 2, one line naming the file, folder or flag at fault,
and nothing already written lost; plus the damaged volume cache, which is repaired rather than refused.

The data are tiny NIfTI files written here with nibabel (a bright ellipsoid "brain" on a zero background, 12^3
voxels); the generate cases that need a trained model reuse the session's tiny run of ``test_generate_evaluate``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brain3d_report import evaluate, generate, train
from brain3d_report.data import load_cases, make_dataset, split_volumes
from common.errors import DataError

SHAPE = (12, 12, 12)
REPORTS = {"left": "A mass lesion is seen in the left frontal lobe with surrounding edema.",
           "right": "A mass lesion is seen in the right parietal lobe with surrounding edema."}


def _brain(seed: int = 0) -> np.ndarray:
    """A positive ellipsoid with texture on a zero background: what a skull-stripped FLAIR looks like to the checks."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.7
    texture = np.random.default_rng(seed).uniform(50, 150, SHAPE)
    return (texture * inside).astype(np.float32)


def _nifti(path: Path, volume: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def _tree(root: Path) -> Path:
    """Four tumour cases (two left, two right) and two healthy controls."""
    for k in range(4):
        case = f"BraTS20_Training_{k + 1:03d}"
        _nifti(root / case / f"{case}_flair.nii.gz", _brain(k))
        (root / case / f"{case}_flair_text.txt").write_text(REPORTS["left" if k % 2 else "right"])
    for k in range(2):
        _nifti(root / "healthy" / f"sub-{k + 1:04d}.nii.gz", _brain(10 + k))
    return root


def _flair(root: Path, k: int) -> Path:
    return root / f"BraTS20_Training_{k:03d}" / f"BraTS20_Training_{k:03d}_flair.nii.gz"


def _split_csv(root: Path, rows: list[tuple[str, str]]) -> Path:
    path = root.parent / "split.csv"
    path.write_text("id,group,split\n" + "".join(f"{i},{i},{s}\n" for i, s in rows))
    return path


ALL_ROWS = [("BraTS20_Training_001", "train"), ("BraTS20_Training_002", "train"), ("BraTS20_Training_003", "val"),
            ("BraTS20_Training_004", "test"), ("sub-0001", "train"), ("sub-0002", "val")]


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- bad volumes: what each one is and the words that must name it ---------------------------------------------------

def _nan(path: Path) -> None:
    volume = _brain()
    volume[3, 4, 5] = np.nan
    _nifti(path, volume)


def _with(volume: np.ndarray) -> Callable[[Path], None]:
    return lambda path: _nifti(path, volume)


def _few_voxels() -> np.ndarray:
    volume = np.zeros(SHAPE, np.float32)
    volume[5:7, 5:7, 5:7] = 100.0  # 8 voxels: a speck, not a brain
    return volume


def _four_d(path: Path) -> None:
    _nifti(path, np.stack([_brain(), _brain()], -1))


def _zero_affine(path: Path) -> None:
    _nifti(path, _brain())
    header = nib.load(path).header.copy()
    header["srow_x"] = header["srow_y"] = header["srow_z"] = 0
    header["qform_code"], header["sform_code"] = 0, 1
    nib.save(nib.Nifti1Image(_brain(), None, header=header), path)


VOXEL_CASES = {
    "NaN voxel": (_nan, "1 NaN and 0 infinite of 1728 voxels"),
    "all zero": (_with(np.zeros(SHAPE, np.float32)), "every one of the 1728 voxels is 0"),
    "constant": (_with(np.full(SHAPE, 7.0, np.float32)), "is 7 (a constant volume"),
    "no brain": (_with(_few_voxels()), "no brain: 8 of 1728 voxels are above 0"),
    "negative only": (_with(-_brain() - 1), "no brain: 0 of 1728"),
}
HEADER_CASES = {
    "4-D": (_four_d, "is 4-D with shape (12, 12, 12, 2)"),
    "zero affine": (_zero_affine, "zero or singular"),
}


# --- brain3d_report.train ------------------------------------------------------------------------------------------

def _train(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "contrastive", "--data-root", str(root), "--output-dir", str(out), "--vision", "siglip-tiny",
            "--lm", "tiny-gemma3", "--text-embedding", "lm", "--volume-size", "4", "16", "16", "--epochs", "1",
            "--no-progress", "--device", "cpu", "--precision", "fp32", "--volume-cache", str(out.parent / "cache"),
            *extra]


def _volume_case(make: Callable[[Path], None], words: str, k: int):
    def case(tmp: Path):
        root = _tree(tmp / "data")
        make(_flair(root, k))
        return _train(root, tmp / "run", "--split", str(_split_csv(root, ALL_ROWS))), [str(_flair(root, k)), words]
    return case


def _two_flairs(tmp: Path):
    root = _tree(tmp / "data")
    folder = root / "BraTS20_Training_002"
    shutil.copy(_flair(root, 2), folder / "BraTS20_Training_002_flair.nii")
    return _train(root, tmp / "run"), [f"{folder}:", "2 FLAIR files",
                                       "BraTS20_Training_002_flair.nii, BraTS20_Training_002_flair.nii.gz"]


def _two_flair_names(tmp: Path):
    root = _tree(tmp / "data")
    folder = root / "BraTS20_Training_003"
    shutil.copy(_flair(root, 3), folder / "BraTS20_Training_003-t2f.nii.gz")
    return _train(root, tmp / "run"), [f"{folder}:", "BraTS20_Training_003-t2f.nii.gz",
                                       "BraTS20_Training_003_flair.nii.gz"]


def _shared_id(tmp: Path):
    root = _tree(tmp / "data")
    (root / "sub-0002").mkdir()
    shutil.copy(_flair(root, 1), root / "sub-0002" / "sub-0002_flair.nii.gz")
    (root / "sub-0002" / "sub-0002_flair_text.txt").write_text(REPORTS["left"])
    return _train(root, tmp / "run"), [str(root / "healthy" / "sub-0002.nii.gz"), "sub-0002",
                                       str(root / "sub-0002" / "sub-0002_flair.nii.gz")]


def _duplicate_split_row(tmp: Path):
    root = _tree(tmp / "data")
    split = _split_csv(root, [*ALL_ROWS, ("BraTS20_Training_004", "test")])
    return _train(root, tmp / "run", "--split", str(split)), [str(split), "BraTS20_Training_004",
                                                               "listed twice (lines 5 and 8)"]


def _duplicate_report_key(tmp: Path):
    root = _tree(tmp / "data")
    reports = tmp / "reports.json"
    reports.write_text('{"BraTS20_Training_001": "a", "BraTS20_Training_002": "b", "BraTS20_Training_001": "c"}')
    return _train(root, tmp / "run", "--reports", str(reports)), [str(reports), "BraTS20_Training_001 has two reports"]


TRAIN_CASES = {
    **{f"{name} (train split)": _volume_case(make, words, 2) for name, (make, words) in VOXEL_CASES.items()},
    "NaN voxel (val split)": _volume_case(_nan, VOXEL_CASES["NaN voxel"][1], 3),
    **{name: _volume_case(make, words, 1) for name, (make, words) in HEADER_CASES.items()},
    "two FLAIR files (.nii beside .nii.gz)": _two_flairs,
    "two FLAIR files (2020 and 2023 names)": _two_flair_names,
    "healthy control with a tumour case's id": _shared_id,
    "split.csv lists a case twice": _duplicate_split_row,
    "reports JSON names a case twice": _duplicate_report_key,
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_train_bad_input_is_one_line_naming_the_file(name, tmp_path, capsys):
    argv, needles = TRAIN_CASES[name](tmp_path)
    assert train.main(argv) == 2
    _one_error_line(capsys, *needles)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_skip_bad_drops_and_counts_a_bad_volume_when_training(tmp_path):
    root = _tree(tmp_path / "data")
    _nan(_flair(root, 2))
    _with(np.zeros(SHAPE, np.float32))(_flair(root, 3))
    cases = load_cases(root, split=_split_csv(root, ALL_ROWS), skip_bad=True)
    with pytest.raises(DataError, match="NaN") as info:
        split_volumes(cases, ("train", "val"), (4, 16, 16), None)
    assert Path(info.value.source) == _flair(root, 2)
    volumes = split_volumes(cases, ("train", "val"), (4, 16, 16), None, skip_bad=True)
    assert {k: tuple(v.shape) for k, v in volumes.items()} == {"train": (2, 1, 4, 16, 16), "val": (1, 1, 4, 16, 16)}
    assert [Path(p) for p, _ in cases.skipped] == [_flair(root, 2), _flair(root, 3)]
    assert "BraTS20_Training_002" not in cases.ids and "BraTS20_Training_003" not in cases.ids
    assert cases.ids == ["BraTS20_Training_001", "BraTS20_Training_004", "sub-0001", "sub-0002"]


# --- the volume cache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "garbage"])
def test_a_damaged_cache_entry_is_recomputed_with_a_warning_not_blamed_on_the_flair(damage, tmp_path, caplog):
    root = _tree(tmp_path / "data")
    cases = load_cases(root, split=None)
    first = make_dataset(cases[:2], (4, 16, 16), tmp_path / "cache")
    expected = [first[i]["image"] for i in range(2)]
    entries = sorted(first.cache_dir.glob("*.pt"))
    assert len(entries) == 2
    entry = entries[0]
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "wrong shape":
        torch.save({"image": torch.zeros(1, 2, 2, 2)}, entry)
    else:
        entry.write_bytes(b"\x00" * 64)
    with caplog.at_level(logging.WARNING, logger="medvl.brain3d_report"):
        again = make_dataset(cases[:2], (4, 16, 16), tmp_path / "cache")
        got = [again[i]["image"] for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    warned = [r.getMessage() for r in caplog.records if "damaged volume-cache entry" in r.getMessage()]
    assert len(warned) == 1 and str(entry) in warned[0], warned
    damaged_case = next(i for i, c in enumerate(cases[:2]) if str(c.flair) in warned[0])
    assert torch.equal(torch.load(entry, weights_only=True)["image"], expected[damaged_case])  # rewritten
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medvl.brain3d_report"):
        assert torch.equal(make_dataset(cases[:2], (4, 16, 16), tmp_path / "cache")[0]["image"], expected[0])
    assert not [r for r in caplog.records if r.name.startswith("medvl")]  # repaired for good: read quietly


# --- brain3d_report.generate ---------------------------------------------------------------------------------------

def _input(make: Callable[[Path], None], words: str):
    def case(run: Path, tiny: dict, tmp: Path):
        path = tmp / "scan.nii.gz"
        make(path)
        return ["--input", str(path)], [str(path), words]
    return case


def _input_dir_two_flairs(run: Path, tiny: dict, tmp: Path):
    folder = tmp / "inputs" / "BraTS20_Training_777"
    _nifti(folder / "BraTS20_Training_777_flair.nii.gz", _brain())
    _nifti(folder / "BraTS20_Training_777-t2f.nii.gz", _brain(1))
    return ["--input-dir", str(tmp / "inputs")], [f"{folder}:", "2 FLAIR files",
                                                  "BraTS20_Training_777-t2f.nii.gz, BraTS20_Training_777_flair.nii.gz"]


def _input_dir_bad_volume(run: Path, tiny: dict, tmp: Path):
    _nifti(tmp / "inputs" / "a.nii.gz", _brain())
    bad = _nifti(tmp / "inputs" / "b.nii.gz", np.zeros(SHAPE, np.float32))
    return ["--input-dir", str(tmp / "inputs")], [str(bad), "is 0"]


def _split_row_twice(run: Path, tiny: dict, tmp: Path):
    split = run / "split.csv"
    lines = split.read_text().splitlines()
    test_row = next(line for line in lines if line.endswith(",test"))
    split.write_text("\n".join([*lines, test_row]) + "\n")
    return ["--split", "test"], [str(split), test_row.split(",")[0], f"(lines {lines.index(test_row) + 1} and "
                                                                     f"{len(lines) + 1})"]


def _data_copy(tiny: dict, tmp: Path) -> Path:
    return Path(shutil.copytree(tiny["data"], tmp / "data"))


def _split_case_nan(run: Path, tiny: dict, tmp: Path):
    root = _data_copy(tiny, tmp)
    test_id = next(line.split(",")[0] for line in (run / "split.csv").read_text().splitlines()
                   if line.endswith(",test") and line.startswith("BraTS"))
    path = root / test_id / f"{test_id}_flair.nii.gz"
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    volume[0, 0, 0] = np.nan
    _nifti(path, volume, nib.load(path).affine)
    return ["--split", "test", "--data-root", str(root)], [str(path), "1 NaN"]


def _split_shared_id(run: Path, tiny: dict, tmp: Path):
    root = _data_copy(tiny, tmp)
    healthy = sorted((root / "healthy").glob("sub-*.nii.gz"))[0]
    case_id = healthy.name.split(".")[0].split("_")[0]
    tumour = next(p for p in sorted(root.glob("BraTS*/*_flair.nii.gz")))
    (root / case_id).mkdir()
    shutil.copy(tumour, root / case_id / f"{case_id}_flair.nii.gz")
    report = tumour.parent / tumour.name.replace(".nii.gz", "_text.txt")
    shutil.copy(report, root / case_id / f"{case_id}_flair_text.txt")
    return ["--split", "test", "--data-root", str(root)], [str(healthy), f"the id of the tumour case {root / case_id}"]


GENERATE_CASES = {
    **{f"--input {name}": _input(make, words) for name, (make, words) in {**VOXEL_CASES, **HEADER_CASES}.items()},
    "--input-dir: a case folder with two FLAIR files": _input_dir_two_flairs,
    "--input-dir: one empty volume among good ones": _input_dir_bad_volume,
    "--split: the run's split.csv lists a test case twice": _split_row_twice,
    "--split: a test case's FLAIR holds NaN": _split_case_nan,
    "--split: a healthy control shares a tumour case's id": _split_shared_id,
}


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_generate_bad_input_is_one_line_naming_the_file(name, brain_tiny_runs, tmp_path, capsys):
    run = Path(shutil.copytree(brain_tiny_runs["r2"], tmp_path / "run"))
    predictions = run / "predictions"
    predictions.mkdir(exist_ok=True)
    (predictions / "earlier.jsonl").write_text('{"id": "x"}\n')
    extra, needles = GENERATE_CASES[name](run, brain_tiny_runs, tmp_path)
    before = {k: v for k, v in _snapshot(run).items() if k != "split.csv"}
    argv = ["--run-dir", str(run), "--device", "cpu", "--volume-cache", str(tmp_path / "cache"), "--max-new-tokens",
            "4", *extra]
    assert generate.main(argv) == 2
    _one_error_line(capsys, *needles)
    after = _snapshot(run)
    assert {k: after.get(k) for k in before} == before  # nothing already written lost
    assert not [k for k in after if k.endswith(".jsonl") and k not in before]  # and no report of a bad volume


# --- brain3d_report.evaluate ---------------------------------------------------------------------------------------

SETTINGS = {"model_sha256": "a" * 64, "stage": "warmup", "prompt": "p", "greedy": False, "max_new_tokens": 256,
            "decoding": {"do_sample": True, "temperature": 0.1}, "seed": 0, "batch_size": 4,
            "volume_size": [16, 32, 32], "shuffled": False}


def _predictions(run: Path, name: str, records: list[dict], settings: dict | None) -> Path:
    path = run / "predictions" / f"{name}.jsonl"
    generate.append_records(path, records)
    if settings is not None:
        generate.meta_path(path).write_text(json.dumps({"settings": settings, "fields": list(generate.FIELDS)}))
    return path


def _records(n: int = 4) -> list[dict]:
    return [{"id": f"c{k}", "reference": REPORTS["left"], "report": REPORTS["right"], "healthy": False, "side": "left",
             "seconds": 0.1} for k in range(n)]


def _control(change: dict | None = None, records: list[dict] | None = None, main_settings: bool = True,
             control_settings: bool = True):
    def case(run: Path):
        main = _predictions(run, "test", _records(), SETTINGS if main_settings else None)
        control = _predictions(run, "test_shuffled", records or _records(),
                               {**SETTINGS, "shuffled": True, **(change or {})} if control_settings else None)
        return main, control
    return case


def _other_model(run: Path):
    main, control = _control({"model_sha256": "b" * 64})(run)
    return [str(control), str(main), "model_sha256", '"bbbbbbbbbbb... vs "aaaaaaaaaaa...']


def _other_decoding(run: Path):
    main, control = _control({"greedy": True, "decoding": {"do_sample": False}})(run)
    return [str(control), str(main), "decoding", "greedy true vs false"]


def _other_volume_size(run: Path):
    main, control = _control({"volume_size": [8, 16, 16]})(run)
    return [str(control), str(main), "volume_size [8, 16, 16] vs [16, 32, 32]"]


def _not_shuffled(run: Path):
    main, control = _control({"shuffled": False})(run)
    return [str(control), f"is not the shuffled control of {main}"]


def _control_without_settings(run: Path):
    main, control = _control(control_settings=False)(run)
    return [str(generate.meta_path(control)), "missing", control.name, main.name]


def _other_cases(run: Path):
    main, control = _control(records=_records(3) + [{**_records(1)[0], "id": "z9"}])(run)
    return [str(control), str(main), "1 extra (e.g. z9), 1 missing (e.g. c3)"]


def _duplicate_record(run: Path):
    records = _records()
    main = _predictions(run, "test", [*records, records[1]], SETTINGS)
    return [str(main), "case c1 appears twice (records 2 and 5)"]


def _duplicate_in_control(run: Path):
    records = _records()
    _predictions(run, "test", records, SETTINGS)
    control = _predictions(run, "test_shuffled", [*records, records[0]], {**SETTINGS, "shuffled": True})
    return [str(control), "case c0 appears twice (records 1 and 5)"]


EVALUATE_CASES = {
    "shuffled control from another model": _other_model,
    "shuffled control with other decoding": _other_decoding,
    "shuffled control with other preprocessing": _other_volume_size,
    "a 'control' that is not shuffled": _not_shuffled,
    "a control without its settings file": _control_without_settings,
    "a control over other cases": _other_cases,
    "a case predicted twice": _duplicate_record,
    "a case twice in the control": _duplicate_in_control,
}


@pytest.mark.parametrize("name", list(EVALUATE_CASES))
def test_evaluate_bad_input_is_one_line_naming_both_files(name, tmp_path, capsys):
    run = tmp_path / "run"
    needles = EVALUATE_CASES[name](run)
    (run / "metrics_full.json").write_text("{}\n")
    before = _snapshot(run)
    assert evaluate.main(["--run-dir", str(run), "--bertscore", "none", "--no-meteor", "--n-boot", "10",
                          "--n-boot-corpus", "2"]) == 2
    _one_error_line(capsys, *needles)
    assert _snapshot(run) == before


def test_a_control_made_like_the_predictions_is_scored(tmp_path, capsys):
    run = tmp_path / "run"
    _control()(run)
    assert evaluate.main(["--run-dir", str(run), "--bertscore", "none", "--no-meteor", "--n-boot", "10",
                          "--n-boot-corpus", "2"]) == 0
    assert "shuffled volumes" in capsys.readouterr().out
    summary = json.loads((run / "metrics_full.json").read_text())
    assert summary["predictions_shuffled"] == "predictions/test_shuffled.jsonl"
