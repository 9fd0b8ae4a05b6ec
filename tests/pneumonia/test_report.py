"""VLM reports beside the CNN: prompts, verdict parsing, scoring, the JSONL format and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import hf
from common.errors import ConfigError, DataError
from common.runs import load_run
from common.tables import json_safe
from pneumonia import report
from pneumonia.data import load_medmnist
from pneumonia.model import build_from_record, predict_proba

VERDICT_CASES = [
    ("No evidence of pneumonia.", "normal"),
    ("Findings are consistent with pneumonia.", "pneumonia"),
    ("The lungs are clear. No acute cardiopulmonary process.", "normal"),
    ("Right lower lobe consolidation.", "pneumonia"),
    ("No focal consolidation, pleural effusion or pneumothorax.", "normal"),
    ("Pneumonia is not seen.", "normal"),
    ("Negative for pneumonia.", "normal"),
    ("Pneumonia is unlikely.", "normal"),
    ("Possible early pneumonia in the left base.", "unclear"),
    ("Pneumonia cannot be excluded.", "unclear"),
    ("Impression: findings may represent pneumonia or atelectasis.", "unclear"),
    ("The lungs are clear, but there is consolidation in the right lower lobe.", "unclear"),
    ("The image quality is poor.", "unclear"),
    ("", "unclear"),
    ("There is no pleural effusion. Left lower lobe pneumonia.", "pneumonia"),
    ("Findings: patchy opacity at the right base. Impression: No pneumonia.", "normal"),
    ("Findings: no effusion. Impression: Pneumonia.", "pneumonia"),
    ("**Impression:** Normal chest radiograph.", "normal"),
    ("Answer: normal. The lungs appear clear.", "normal"),
    ("Pneumonia. There is an opacity in the right lower lobe.", "pneumonia"),
    ("Normal. No focal opacity.", "normal"),
    ("Answer: positive, with right basal opacity.", "pneumonia"),
    ("Heart size is normal. Patchy airspace opacities in both lower lobes, compatible with pneumonia.", "pneumonia"),
]


@pytest.mark.parametrize(("text", "expected"), VERDICT_CASES)
def test_parse_verdict(text, expected):
    assert report.parse_verdict(text) == expected


def test_context_aware_prompt_carries_the_cnn_output_and_others_do_not():
    system, user = report.prompt_text("context-aware", 0.8712, threshold=0.4, image_size=28)
    assert "P(pneumonia) = 0.87" in user and "pneumonia at its decision threshold of 0.40" in user
    assert "28x28" in user and system
    _, below = report.prompt_text("context-aware", 0.12, threshold=0.4, image_size=28)
    assert "0.12, i.e. normal" in below
    for name in ("zero-shot", "clinical-role"):
        system, user = report.prompt_text(name, 0.8712, threshold=0.4, image_size=28)
        assert "0.87" not in user and "CNN" not in user
    assert report.prompt_text("zero-shot", 0.5, 0.5, 28)[0] is None
    messages = report.build_messages(report.to_rgb(np.zeros((28, 28), np.uint8), (64, 64)), "sys", "question")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert [c["type"] for c in messages[1]["content"]] == ["image", "text"]


def test_to_rgb_upsamples_grey_to_the_processor_size():
    image = np.zeros((28, 28), np.uint8)
    image[:, 14:] = 200
    rgb = np.asarray(report.to_rgb(image, (896, 640)))
    assert rgb.shape == (896, 640, 3)
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[:, :300].max() == 0 and rgb[:, 340:].min() == 200


def test_select_ids_alternates_classes():
    labels = np.array([1, 1, 1, 0, 1, 0, 0])
    assert report.select_ids(labels, 4).tolist() == [0, 1, 3, 5]
    assert report.select_ids(labels, None).tolist() == list(range(7))


def test_score_against_labels_and_cnn():
    rows = [("pneumonia", 0.9, "pneumonia"), ("pneumonia", 0.2, "normal"), ("normal", 0.1, "normal"),
            ("normal", 0.7, "unclear")]
    records = [{"label": lab, "cnn_prob": p, "parsed_verdict": v} for lab, p, v in rows]
    scores = report.score(records, threshold=0.5)
    assert scores["n"] == 4 and scores["n_decided"] == 3 and scores["unclear_share"] == 0.25
    assert scores["acc_decided"] == pytest.approx(2 / 3) and scores["acc_overall"] == 0.5
    assert scores["cnn_agreement_decided"] == 1.0 and scores["cnn_agreement_overall"] == 0.75


def test_jsonl_round_trip(tmp_path):
    records = [{"id": 3, "label": "normal", "cnn_prob": 0.25, "prompt": "p\n\nq", "report": "Lungs clear.\nOK",
                "parsed_verdict": "normal"}]
    path = report.write_jsonl(tmp_path / "zero-shot.jsonl", records)
    assert report.read_jsonl(path) == records
    path.write_text(json.dumps({"id": 1}) + "\n")
    with pytest.raises(DataError, match="lacks label"):
        report.read_jsonl(path)


@pytest.mark.parametrize(("flag", "value", "names"), [("--vlm", "medgemma-9b", "medgemma-4b, tiny-gemma3"),
                                                      ("--prompt", "few-shot", "zero-shot, clinical-role")])
def test_unknown_names_exit_2_listing_valid_ones(tmp_path, capsys, flag, value, names):
    args = ["--run-dir", str(tmp_path), "--vlm", "tiny-gemma3", "--prompt", "all", flag, value]
    assert report.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag}: unknown") and names in err and len(err.splitlines()) == 1


def test_run_dir_without_model_exits_2(tmp_path, capsys):
    assert report.main(["--run-dir", str(tmp_path), "--vlm", "tiny-gemma3"]) == 2
    err = capsys.readouterr().err
    assert "no trained model here" in err and len(err.strip().splitlines()) == 1


def test_end_to_end_tiny_gemma3(trained_pneumonia_run, tmp_path, capsys):
    run_dir, npz = trained_pneumonia_run
    out = tmp_path / "reports"
    code = report.main(["--run-dir", str(run_dir), "--vlm", "tiny-gemma3", "--prompt", "all", "--limit", "5",
                        "--batch-size", "3", "--max-new-tokens", "6", "--device", "cpu", "--output-dir", str(out),
                        "--data-root", str(npz.parent)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MB of weights (none)" in printed and "| zero-shot |" in printed

    data = load_medmnist(npz.parent, 28, splits=("test",))
    ids = report.select_ids(data.labels["test"], 5)
    loaded = load_run(run_dir, "pneumonia", build_from_record)
    model, meta = loaded.model, loaded.meta
    probs = predict_proba(model, data.images["test"][ids])
    summary = json.loads((out / "comparison.json").read_text())
    assert set(summary["prompts"]) == set(report.PROMPTS) and summary["n"] == 5
    for name in report.PROMPTS:
        records = report.read_jsonl(out / f"{name}.jsonl")
        assert [r["id"] for r in records] == ids.tolist()
        assert [r["label"] for r in records] == [("normal", "pneumonia")[y] for y in data.labels["test"][ids]]
        assert np.allclose([r["cnn_prob"] for r in records], probs, atol=1e-6)
        assert all(r["parsed_verdict"] == report.parse_verdict(r["report"]) for r in records)
        assert ("P(pneumonia) = " in records[0]["prompt"]) == (name == "context-aware")
        assert summary["prompts"][name] == json_safe(report.score(records, meta["thresholds"]["decision"]))
    assert (out / "comparison.md").read_text().startswith("# VLM reports vs CNN")


def test_run_section_says_weights_are_random(trained_pneumonia_run, tmp_path):
    run_dir, _ = trained_pneumonia_run
    section = report.run_section(run_dir, tmp_path, limit=2)
    assert "random weights" in section and section.startswith("## Pneumonia: VLM reports")
    assert len(report.read_jsonl(tmp_path / "pneumonia_reports" / "context-aware.jsonl")) == 2


def test_vlm_presets_resolve_through_common_hf(tmp_path):
    with pytest.raises(ConfigError) as info:
        report.load_vlm("medgemma-4b", cache_dir=tmp_path)
    assert info.value.source == "google/medgemma-4b-it" and info.value.message == hf.OFFLINE_MESSAGE


@pytest.mark.bitsandbytes
def test_tiny_gemma3_4bit_loads_through_a_saved_copy():
    import bitsandbytes as bnb

    vlm = report.load_vlm("tiny-gemma3", quantization="4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in vlm.model.modules())
    assert report.processor_image_size(vlm.processor) == (64, 64)
    picture = report.to_rgb(np.zeros((28, 28), np.uint8), (64, 64))
    replies = report.generate_reports(vlm, [report.build_messages(picture, None, "Is there pneumonia?")] * 2, 4)
    assert len(replies) == 2 and replies[0] == replies[1]
