"""Bad input to the mavl_chexpert CLIs: exit 2, one line naming the file or flag, nothing already written lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.phantoms import __main__ as phantoms
from mavl_chexpert import evaluate, train_fusion, train_image

TINY = ("--backbone", "vit-tiny", "--epochs", "1", "--no-progress", "--device", "cpu")


def _snapshot(folder: Path | None) -> dict[str, bytes]:
    if folder is None or not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_csv(edit, *extra):
    def case(tmp, data, image_run):
        frame = pd.read_csv(data / "train.csv")
        needle = edit(frame)
        frame.to_csv(data / "train.csv", index=False)
        return train_image, ["--data-root", str(data), "--output-dir", str(tmp / "out"), *TINY, *extra], \
            [str(data / "train.csv"), needle], None
    return case


def _no_consolidation(frame):
    frame["Consolidation"] = 0.0
    return "held-out class Consolidation (--holdout-classes) has 0 positive"


def _mixed_study(frame, data):
    """Two patients' images under one Study: the maximum over its views would mix two people."""
    frame["Study"] = frame["Path"].str.extract(r"(patient\d+/study\d+)")[0]
    patients = frame["Path"].str.extract(r"(patient\d+)")[0]
    other = frame.index[(patients != patients[0]) & (frame["Frontal/Lateral"] == "Frontal")][0]
    frame.loc[other, "Study"] = frame.loc[0, "Study"]
    return ["mixes patients", f"study {frame.loc[0, 'Study']}", f"line {other + 2} is {patients[other]}"]


def _evaluate_holdout_without_positives(tmp, data, image_run):
    """A fusion run whose held-out disease has no positive in the test set: nothing to score, nothing written."""
    run = Path(shutil.copytree(image_run, tmp / "run"))
    meta_path = run / "best" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["holdout_classes"] = ["Edema"]
    meta_path.write_text(json.dumps(meta))
    frame = pd.read_csv(data / "valid.csv")
    frame["Edema"] = 0.0
    frame.to_csv(data / "valid.csv", index=False)
    return evaluate, ["--run-dir", str(run), "--data-root", str(data), "--n-boot", "5"], \
        [str(data / "valid.csv"), "held-out class Edema", "0 positive"], run


def _drop_path(frame):
    frame.drop(columns=["Path"], inplace=True)
    return "no 'Path' column"


def _drop_label(frame):
    frame.drop(columns=["Edema"], inplace=True)
    return "missing label column(s) Edema"


def _bad_value(frame):
    frame.loc[2, "Cardiomegaly"] = 2.0
    return "line 4: Cardiomegaly is 2.0"


def _outside(frame):
    frame.loc[0, "Path"] = "CheXpert-v1.0-small/../../secret.jpg"
    return "lies outside --data-root"


def _missing_image(frame):
    frontal = frame.index[frame["Frontal/Lateral"] == "Frontal"][1]
    frame.loc[frontal, "Path"] = "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg"
    return f"line {frontal + 2}: "


def _no_positive(frame):
    frame["Edema"] = 0.0
    return "Edema has 0 positive"


def _no_negative(frame):
    frame["Cardiomegaly"] = 1.0
    return " 0 negative"


def _twice(frame):
    frame.loc[len(frame)] = frame.loc[3]
    return f"lines 5 and {len(frame) + 1} list the same image {frame.loc[3, 'Path']} twice"


def _two_labels(frame):
    row = frame.loc[3].copy()
    edema = row["Edema"]
    row["Edema"] = 0.0 if edema == 1 else 1.0
    frame.loc[len(frame)] = row
    return f"lines 5 and {len(frame) + 1} list the same image {frame.loc[3, 'Path']} with conflicting labels (Edema"


def _blank_image(data, csv):
    frame = pd.read_csv(data / csv)
    frontal = frame.index[frame["Frontal/Lateral"] == "Frontal"][0]
    Image.fromarray(np.full((64, 64), 0, np.uint8)).save(data / frame.loc[frontal, "Path"].split("/", 1)[1])
    return f"line {frontal + 2}: "


def _blank_train_image(tmp, data, image_run):
    line = _blank_image(data, "train.csv")
    return train_image, ["--data-root", str(data), "--output-dir", str(tmp / "out"), *TINY], \
        [str(data / "train.csv"), line, "image is blank (every pixel is 0)"], None


def _evaluate_edit(edit):
    def case(tmp, data, image_run):
        run = Path(shutil.copytree(image_run, tmp / "run"))
        frame = pd.read_csv(data / "valid.csv")
        needles = edit(frame, data)
        frame.to_csv(data / "valid.csv", index=False)
        return evaluate, ["--run-dir", str(run), "--data-root", str(data), "--n-boot", "5"], \
            [str(data / "valid.csv"), *([needles] if isinstance(needles, str) else needles)], run
    return case


def _unknown_stage(tmp, data, image_run):
    run = Path(shutil.copytree(image_run, tmp / "run"))
    meta_path = run / "best" / "model.json"
    meta_path.write_text(meta_path.read_text().replace('"stage": "image"', '"stage": "text"'))
    return evaluate, ["--run-dir", str(run), "--data-root", str(data), "--n-boot", "5"], \
        [str(meta_path), "stage 'text' is not one of image, fusion"], run


def _seen_patient(frame, data):
    train = pd.read_csv(data / "train.csv")
    frame.loc[len(frame)] = train.loc[0, frame.columns]
    return f"line {len(frame) + 1}: patient patient00001 is in the run's "


def _image_flag(flag, value, needle=None):
    def case(tmp, data, image_run):
        return train_image, ["--data-root", str(data), "--output-dir", str(tmp / "out"), *TINY, flag, value], \
            [flag] + ([needle] if needle else []), None
    return case


def _real_backbone_offline(tmp, data, image_run):
    """vit-b16 asks timm for ImageNet weights; offline and uncached that is one line naming the way out."""
    return train_image, ["--data-root", str(data), "--output-dir", str(tmp / "out"), *TINY, "--backbone", "vit-b16"], \
        ["--pretrained", "not cached", "--no-pretrained"], None


def _backbone_folder(files: dict[str, str | bytes], needle: str):
    """--backbone names a folder that is not a timm weights folder (another library's layout, pickles only)."""
    def case(tmp, data, image_run):
        folder = tmp / "weights"
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return train_image, ["--data-root", str(data), "--output-dir", str(tmp / "out"), *TINY, "--backbone",
                             str(folder)], [str(folder), needle], None
    return case


def _text_folder_without_config(tmp, data, image_run):
    folder = tmp / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    return _fusion("--text-encoder", str(folder), needles=[str(folder), "config.json"])(tmp, data, image_run)


def _init_from(flag, value, needle):
    def case(tmp, data, image_run):
        return train_image, ["--data-root", str(data), "--output-dir", str(tmp / "out"), *TINY, "--init-from",
                             str(image_run), flag, value], [flag, needle], image_run
    return case


def _fusion(*extra, needles, edit_descriptions=None, raw=None):
    def case(tmp, data, image_run):
        run = Path(shutil.copytree(image_run, tmp / "image_run"))
        argv = ["--data-root", str(data), "--image-run", str(run), "--output-dir", str(tmp / "out"),
                "--text-encoder", "tiny-bert", "--epochs", "1", "--no-progress", *extra]
        named = list(needles)
        if edit_descriptions:
            path = tmp / "descriptions.json"
            descriptions = json.loads((Path(train_fusion.__file__).with_name("descriptions.json")).read_text())
            edit_descriptions(descriptions)
            path.write_text(raw(json.dumps(descriptions)) if raw else json.dumps(descriptions))
            argv += ["--descriptions", str(path)]
            named.insert(0, str(path))
        return train_fusion, argv, named, run
    return case


def _evaluate_undecodable(tmp, data, image_run):
    run = Path(shutil.copytree(image_run, tmp / "run"))
    frame = pd.read_csv(data / "valid.csv")
    (data / frame.loc[0, "Path"].split("/", 1)[1]).write_bytes(b"\xff\xd8 truncated")
    return evaluate, ["--run-dir", str(run), "--data-root", str(data), "--n-boot", "5"], \
        [str(data / "valid.csv"), "line 2", "does not decode"], run


CASES = {
    "no Path column": _edit_csv(_drop_path),
    "missing label column": _edit_csv(_drop_label),
    "label value outside 1/0/-1/blank": _edit_csv(_bad_value),
    "path outside data root": _edit_csv(_outside),
    "missing image": _edit_csv(_missing_image),
    "unknown label name": _image_flag("--labels", "Atelectasis,Effusion", "unknown label 'Effusion'"),
    "unknown backbone": _image_flag("--backbone", "vit-huge"),
    "real backbone weights offline": _real_backbone_offline,
    "backbone folder without a timm config": _backbone_folder({"model.safetensors": b"x"}, "no config.json"),
    "backbone folder of another library": _backbone_folder(
        {"config.json": '{"model_type": "bert"}', "model.safetensors": b"x"}, "no 'architecture'"),
    "backbone folder with pickled weights only": _backbone_folder(
        {"config.json": '{"architecture": "vit_base_patch16_224"}', "pytorch_model.bin": b"x"}, "model.safetensors"),
    "text encoder folder without a config": _text_folder_without_config,
    "second stage of another rank": _init_from("--rank", "32", "differs from --init-from"),
    "lrf rank beyond the features": _image_flag("--lrf-rank", "96", "leaves no tail"),
    "negative lrf weight": _image_flag("--lrf-weight", "-1"),
    "bad uncertainty policy": _image_flag("--uncertain", "maybe"),
    "descriptions without a trained disease": _fusion(needles=["no description of 'Edema'"],
                                                      edit_descriptions=lambda d: d.pop("Edema")),
    "holdout of every class": _fusion("--holdout-classes", "competition", needles=["--holdout-classes",
                                                                                   "every class"]),
    "holdout of an unknown class": _fusion("--holdout-classes", "Fracture", needles=["--holdout-classes",
                                                                                     "not among the labels"]),
    "fusion holdout that phase 1 trained on": _fusion("--holdout-classes", "Edema",
                                                      needles=["--holdout-classes", "Edema trained phase 1"]),
    "phase-1 holdout outside the labels": _image_flag("--holdout-classes", "Fracture", "not among the labels"),
    "phase-1 holdout without positives": _edit_csv(_no_consolidation, "--holdout-classes", "Consolidation"),
    "test study that mixes patients": _evaluate_edit(_mixed_study),
    "held-out class without test positives": _evaluate_holdout_without_positives,
    "unknown text encoder": _fusion("--text-encoder", "gpt-9", needles=["--text-encoder"]),
    "aspect combination without the mavl fusion": _fusion("--aspect-combine", "all",
                                                          needles=["--aspect-combine", "--fusion mavl"]),
    "undecodable test image": _evaluate_undecodable,
    "run of an unknown stage": _unknown_stage,
    "class without positives": _edit_csv(_no_positive),
    "class without negatives": _edit_csv(_no_negative),
    "image listed twice": _edit_csv(_twice),
    "image under two labels": _edit_csv(_two_labels),
    "blank training image": _blank_train_image,
    "blank test image": _evaluate_edit(lambda frame, data: [_blank_image(data, "valid.csv"), "image is blank"]),
    "test image listed twice": _evaluate_edit(lambda frame, data: _twice(frame)),
    "test patient seen in training": _evaluate_edit(_seen_patient),
    "descriptions give a disease twice": _fusion(needles=["'Edema' is given twice"], edit_descriptions=lambda d: None,
                                                 raw=lambda text: text[:-1] + ', "Edema": {"definition": "x", '
                                                                              '"aspects": {}}}'),
    "descriptions with an empty definition": _fusion(
        needles=["'Edema': expected"], edit_descriptions=lambda d: d["Edema"].update(definition=" ")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, chexpert_phantom, image_run, tmp_path, capsys):
    data = Path(shutil.copytree(chexpert_phantom, tmp_path / "CheXpert-v1.0-small"))
    module, argv, needles, keep = CASES[case](tmp_path, data, image_run)
    before = _snapshot(keep)
    capsys.readouterr()
    assert module.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _snapshot(keep) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needle", [
    (["cxr", "--format", "chexpert", "--size", "32"], "--size"),
    (["cxr", "--format", "chexpert", "--n", "3"], "--n"),
])
def test_phantom_bad_sizes(argv, needle, tmp_path, capsys):
    assert phantoms.main([*argv, "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {needle}")
