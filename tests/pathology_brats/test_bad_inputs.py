"""BraTS-Path bad inputs: one ``error: <file>: <problem>`` line, exit 2, and nothing already written changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.feature_cache import FeatureCache
from pathology_brats import submit, train
from pathology_brats.encoder import cache_for, load_tile_encoder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _labels(text: str):
    def case(root: Path, tmp: Path) -> tuple[list[str], str]:
        (tmp / "labels.csv").write_text(text)
        return ["--labels-csv", str(tmp / "labels.csv")], "labels.csv"
    return case


def _bad_image(root: Path, tmp: Path) -> tuple[list[str], str]:
    victim = sorted((root / "PN").glob("*.jpg"))[2]
    victim.write_bytes(b"\xff\xd8\xff not a jpeg")
    return [], victim.name


def _captions(mutate):
    def case(root: Path, tmp: Path) -> tuple[list[str], str]:
        lines = (root / "captions.jsonl").read_text().splitlines()
        (tmp / "captions.jsonl").write_text("\n".join(mutate(lines)) + "\n")
        return ["--captions", str(tmp / "captions.jsonl")], "captions.jsonl"
    return case


def _other_feature_size(root: Path, tmp: Path) -> tuple[list[str], str]:
    cache = cache_for(load_tile_encoder("gigapath-tiny", 5), tmp / "cache", "config")  # train's default
    meta = {**cache.meta, "dim": "1536"}  # a cache written by an encoder with other features under the same name
    FeatureCache(tmp / "cache", cache.directory.name, meta).add({"0" * 64: __import__("torch").zeros(5, 1536)})
    return [], "dim"


CASES = {
    "csv without the two columns": _labels("path,label\nCT/a.jpg,CT\n"),
    "class outside the schema": _labels("Input Path,Ground-Truth\nCT/BraTSPath_CT_0000001.jpg,XX\n"),
    "image that does not decode": _bad_image,
    "malformed captions line in the middle": _captions(lambda lines: [*lines[:5], "{not json", *lines[5:]]),
    "captions for unknown images": _captions(lambda lines: [*lines, json.dumps({"image": "BraTSPath_CT_9999999.jpg",
                                                                                "caption": "x"})]),
    "cache of another feature size": _other_feature_size,
}


@pytest.mark.parametrize("name", list(CASES))
def test_train_bad_input(name, histology_phantom, tmp_path, capsys):
    root = Path(shutil.copytree(histology_phantom, tmp_path / "data"))
    extra, needle = CASES[name](root, tmp_path)
    (tmp_path / "cache").mkdir(exist_ok=True)
    before = _snapshot(tmp_path / "cache")
    argv = ["--data-root", str(root), "--output-dir", str(tmp_path / "run"), "--encoder", "gigapath-tiny",
            "--text-encoder", "minilm", "--feature-cache", str(tmp_path / "cache"), "--epochs", "1",
            "--no-progress", "--device", "cpu", *extra]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    after = _snapshot(tmp_path / "cache")
    assert {k: v for k, v in after.items() if k in before} == before  # cached features are never lost


def test_submit_refuses_an_empty_folder_and_a_missing_run(histology_phantom, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert submit.main(["--run-dir", str(tmp_path / "no_run"), "--images", str(histology_phantom / "val"), "--out",
                        str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_run" in err[0]
    assert not (tmp_path / "s.csv").exists()
