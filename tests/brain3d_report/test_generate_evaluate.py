"""Report generation, evaluation and baselines on a small brain phantom with a tiny trained run.

What these tests prove: generation resumes after a kill exactly as an uninterrupted run (same sampled reports, done
cases not generated again) and equals a direct ``lm.generate`` call on the same preprocessed volume; the shuffled
control pairs every reference with another case's volume; every number of ``metrics_full.json`` equals the metric
library called directly (corpus intervals included); the nearest-neighbour baseline is the most similar training
volume by cosine of the pooled embedding; bad inputs end in one line and exit 2.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brain3d_report import baselines, evaluate, generate, train
from brain3d_report.data import HEALTHY_TEMPLATES, load_cases, load_volume, make_dataset, packaged_file
from common.metrics.clinical import clinical_f1, clinical_per_case, lesion_detection
from common.metrics.text import TextScorer, corpus_scores
from common.phantoms.brain import write_brain
from common.runs import load_run

SCORING = ["--bertscore", "none", "--no-meteor"]


def tiny_run_dirs(tmp_path_factory) -> dict[str, Path]:
    """A phantom (12 tumour cases, 2 controls), a one-epoch contrastive run (r1) and a warmup run from it (r2).

    Built once per session under the base temporary folder, so the LIME tests reuse it.
    """
    base = tmp_path_factory.getbasetemp() / "brain3d_reporting"
    dirs = {"data": base / "data", "r1": base / "r1", "r2": base / "r2", "cache": base / "cache"}
    if (base / "DONE").is_file():
        return dirs
    shutil.rmtree(base, ignore_errors=True)
    write_brain(dirs["data"], n=12, seed=2, size=(32, 32, 32))
    common = ["--data-root", str(dirs["data"]), "--volume-size", "16", "32", "32", "--volume-cache",
              str(dirs["cache"]), "--no-progress", "--device", "cpu", "--precision", "fp32", "--epochs", "1"]
    assert train.main(["--stage", "contrastive", "--output-dir", str(dirs["r1"]), "--vision", "siglip-tiny", "--lm",
                       "tiny-gemma3", "--text-embedding", "lm", *common]) == 0
    assert train.main(["--stage", "warmup", "--output-dir", str(dirs["r2"]), "--init", str(dirs["r1"]),
                       "--max-text-len", "48", "--batch-size", "4", "--grad-accum", "1", "--lr", "2e-4", *common]) == 0
    (base / "DONE").touch()
    return dirs


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    return tiny_run_dirs(tmp_path_factory)


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the warmup run that a test may write predictions into."""
    return Path(shutil.copytree(tiny_run["r2"], tmp_path / "run"))


def _gen(run: Path, tiny_run: dict, *extra: str) -> list[str]:
    return ["--run-dir", str(run), "--device", "cpu", "--volume-cache", str(tiny_run["cache"]), "--max-new-tokens",
            "8", *extra]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_derangement_moves_every_item_and_is_fixed_by_the_seed():
    for n in range(2, 30):
        perm = generate.derangement(n, seed=3)
        assert sorted(perm.tolist()) == list(range(n))
        assert (perm != np.arange(n)).all()
        assert perm.tolist() == generate.derangement(n, seed=3).tolist()
    assert generate.derangement(12, 0).tolist() != generate.derangement(12, 1).tolist()


def test_generation_resumes_after_a_kill_as_if_uninterrupted(run, tiny_run, monkeypatch, capsys):
    argv = _gen(run, tiny_run, "--split", "test", "--batch-size", "1")
    assert generate.main(argv) == 0
    path = run / "predictions" / "test.jsonl"
    whole = path.read_text().splitlines()
    cases = load_cases(tiny_run["data"], split=run / "split.csv").split("test")
    assert [(r["id"], r["reference"], r["healthy"], r["side"]) for r in map(json.loads, whole)] == [
        (c.id, c.report, c.healthy, c.side) for c in cases]
    assert all(json.loads(line)["seconds"] > 0 for line in whole)

    path.write_text(whole[0] + "\n" + whole[1][: len(whole[1]) // 2])  # killed while writing the second line
    calls = []
    real = generate.generate_reports
    monkeypatch.setattr(generate, "generate_reports", lambda model, volumes, *a: calls.append(len(volumes))
                        or real(model, volumes, *a))
    assert generate.main(argv) == 0
    assert calls == [1] * (len(whole) - 1)  # the first case is not generated again
    resumed = _records(path)
    assert [r["report"] for r in resumed] == [json.loads(line)["report"] for line in whole]  # the same draws
    assert generate.main(argv) == 0 and len(calls) == len(whole) - 1

    decoding = json.loads((run / "predictions" / "test.meta.json").read_text())["settings"]["decoding"]
    assert decoding == {"do_sample": True, "temperature": 0.1, "top_p": 0.9, "repetition_penalty": 1.2,
                        "no_repeat_ngram_size": generate.NO_REPEAT_NGRAM_SIZE, "max_new_tokens": 8}  # one default
    # for every LM: the run's LM (tiny-gemma3 here) changes no decoding setting
    capsys.readouterr()
    assert generate.main([*argv, "--greedy"]) == 2  # other settings than the file was made with
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "greedy" in err[0]
    assert _records(path) == resumed


@pytest.mark.filterwarnings("ignore:Passing `(repetition_penalty|no_repeat_ngram_size)`")
def test_greedy_reports_equal_direct_generation_and_the_shuffled_control_uses_another_volume(run, tiny_run):
    assert generate.main(_gen(run, tiny_run, "--split", "test", "--greedy", "--batch-size", "1")) == 0
    assert generate.main(_gen(run, tiny_run, "--split", "test", "--greedy", "--batch-size", "1",
                              "--shuffle-volumes")) == 0
    plain = {r["id"]: r for r in _records(run / "predictions" / "test.jsonl")}
    shuffled = _records(run / "predictions" / "test_shuffled.jsonl")
    assert sorted(r["volume_id"] for r in shuffled) == sorted(plain)
    for record in shuffled:
        assert record["volume_id"] != record["id"]
        assert record["reference"] == plain[record["id"]]["reference"]
        assert record["report"] == plain[record["volume_id"]]["report"]

    loaded = load_run(run, train.PIPELINE, train.model_builder())
    model = loaded.model
    case = load_cases(tiny_run["data"], split=run / "split.csv").split("test")[0]
    volume = load_volume(case.flair, loaded.meta["preprocessing"]["volume_size"])[None]
    with torch.no_grad():
        embeds, mask = model.inputs_embeds(volume, train.prompt_tokens(model.tokenizer))
        ids = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                repetition_penalty=1.2, pad_token_id=model.tokenizer.pad_token_id)
    direct = " ".join(model.tokenizer.decode(ids[0], skip_special_tokens=True).split())
    assert plain[case.id]["report"] == direct
    # The seed's 3-gram ban asked for, without its repetition penalty.
    out = run / "predictions" / "test_ban.jsonl"
    assert generate.main(_gen(run, tiny_run, "--split", "test", "--greedy", "--batch-size", "1", "--out", str(out),
                              "--repetition-penalty", "1", "--no-repeat-ngram-size", "3")) == 0
    settings = json.loads(out.with_suffix(".meta.json").read_text())["settings"]["decoding"]
    assert settings["repetition_penalty"] == 1.0 and settings["no_repeat_ngram_size"] == 3
    with torch.no_grad():
        ids = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                no_repeat_ngram_size=3, pad_token_id=model.tokenizer.pad_token_id)
    assert {r["id"]: r for r in _records(out)}[case.id]["report"] == " ".join(
        model.tokenizer.decode(ids[0], skip_special_tokens=True).split())


def test_generation_on_a_nifti_file_and_a_quick_smoke_run(run, tiny_run, capsys):
    flair = tiny_run["data"] / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz"
    assert generate.main(_gen(run, tiny_run, "--input", str(flair), "--greedy")) == 0
    (record,) = _records(run / "predictions" / "inputs.jsonl")
    assert record["id"] == "BraTS20_Training_001_flair" and record["reference"] == "" and record["healthy"] is None
    assert record["report"] in capsys.readouterr().out

    assert generate.quick_subset(9) == [0, 3, 5, 8] and generate.quick_subset(3) == [0, 1, 2]
    assert generate.main(_gen(run, tiny_run, "--split", "train", "--quick", "--max-new-tokens", "3")) == 0
    train_ids = [c.id for c in load_cases(tiny_run["data"], split=run / "split.csv").split("train")]
    assert [r["id"] for r in _records(run / "predictions" / "train_quick.jsonl")] == [
        train_ids[i] for i in generate.quick_subset(len(train_ids))]
    assert not (run / "predictions" / "train.jsonl").exists()  # a smoke run leaves the real predictions alone


def test_generation_on_the_real_brats_case(run, tiny_run, shared_data):
    folder = shared_data / "brats"
    if not folder.is_dir():
        pytest.skip("no BraTS case in ../shared/data")
    assert generate.main(_gen(run, tiny_run, "--input-dir", str(folder), "--greedy", "--max-new-tokens", "8")) == 0
    records = _records(run / "predictions" / "inputs.jsonl")
    assert [r["id"] for r in records] == sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert all(isinstance(r["report"], str) and r["seconds"] > 0 for r in records)


# --- evaluation --------------------------------------------------------------------------------------------------

def _swap_sides(text: str) -> str:
    return text.replace("left", "\0").replace("right", "left").replace("\0", "right")


def _write_predictions(run: Path) -> tuple[list[dict], list[dict]]:
    """Hand-made predictions: real TextBraTS references, candidates that are right, side-swapped or another case's,
    and healthy controls answered with a template (correct) or a tumour report (a false lesion)."""
    reports = json.loads(packaged_file("reports.json").read_text())
    ids = sorted(reports)[:8]
    refs = [reports[i] for i in ids] + [HEALTHY_TEMPLATES[0], HEALTHY_TEMPLATES[3], HEALTHY_TEMPLATES[5]]
    healthy = [False] * 8 + [True] * 3
    cands = [refs[0], _swap_sides(refs[1]), refs[3], refs[2], refs[4][:120], _swap_sides(refs[5]), refs[7], refs[6],
             HEALTHY_TEMPLATES[1], refs[0], HEALTHY_TEMPLATES[3]]
    records = [{"id": f"c{k}", "reference": r, "report": c, "healthy": h, "side": None, "seconds": 0.1}
               for k, (r, c, h) in enumerate(zip(refs, cands, healthy))]
    shuffled = [{**record, "report": records[(k + 1) % len(records)]["report"]} for k, record in enumerate(records)]
    for name, rows in (("test", records), ("test_shuffled", shuffled)):
        generate.append_records(run / "predictions" / f"{name}.jsonl", rows)
    return records, shuffled


def test_evaluation_equals_the_metric_functions_called_directly(tmp_path, capsys):
    run = tmp_path / "run"
    records, shuffled = _write_predictions(run)
    assert evaluate.main(["--run-dir", str(run), *SCORING, "--n-boot", "100", "--n-boot-corpus", "8"]) == 0
    table = capsys.readouterr().out
    assert "| all (shuffled volumes) |" in table and "| lat_f1 |" in table
    result = json.loads((run / "metrics_full.json").read_text())

    scorer = TextScorer(bertscore=None, meteor=False)  # what text_metrics(..., bertscore=None, meteor=False) runs

    def check(rows: list[dict], got: dict) -> None:
        cands, refs = [r["report"] for r in rows], [r["reference"] for r in rows]
        expected = {**scorer.evaluate(cands, refs).scores, **clinical_f1(cands, refs),
                    **clinical_f1(cands, refs, mode="seed"),
                    **lesion_detection(cands, [r["healthy"] for r in rows])}
        for key, value in expected.items():
            if isinstance(value, float) and math.isnan(value):
                assert got[key] is None, key
            else:
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    check(records, result)
    check([r for r in records if not r["healthy"]], result["groups"]["tumour"])
    check([r for r in records if r["healthy"]], result["groups"]["healthy"])
    check(shuffled, result["groups_shuffled"]["all"])
    assert result["lat_f1_shuffled"] == result["groups_shuffled"]["all"]["lat_f1"]
    assert result["healthy_specificity"] == pytest.approx(2 / 3)
    headline = json.loads((run / "results.json").read_text())  # the headline numbers, as in metrics_full.json
    assert headline["split"] == "test" and headline["n"] == len(records)
    for key in ("lat_f1", "lat_f1_shuffled", "healthy_specificity"):
        assert headline[key] == result[key]
        assert headline[f"{key}_ci"] == [result[f"{key}_ci_low"], result[f"{key}_ci_high"]]

    # Corpus BLEU intervals: corpus_scores on the resamples of the same seeded sequence.
    cands, refs = [r["report"] for r in records], [r["reference"] for r in records]
    pairs = scorer.tokenize(cands, refs)
    rng = np.random.default_rng(0)
    draws = [corpus_scores(pairs, rng.integers(0, len(records), len(records)))["bleu1"] for _ in range(8)]
    assert result["bleu1_ci_low"] == pytest.approx(np.percentile(draws, 2.5))
    assert result["bleu1_ci_high"] == pytest.approx(np.percentile(draws, 97.5))
    assert result["lat_f1_ci_low"] <= result["lat_f1"] <= result["lat_f1_ci_high"]
    assert result["lat_f1_ci_low"] < result["lat_f1_ci_high"]

    import pandas as pd

    frame = pd.read_csv(run / "predictions" / "test_per_case.csv")
    assert frame["id"].tolist() == [r["id"] for r in records]
    np.testing.assert_allclose(frame["lat_f1"], clinical_per_case(cands, refs)["lat_f1"], equal_nan=True)
    np.testing.assert_allclose(frame["path_f1_seed"], clinical_per_case(cands, refs, "seed")["path_f1_seed"])


# --- baselines ---------------------------------------------------------------------------------------------------

def test_nearest_neighbour_is_by_cosine_and_the_most_frequent_report_is_stable():
    train_vectors = np.array([[1.0, 0.0], [10.0, 1.0]])
    reports, positions, similarity = baselines.nearest_neighbour_reports(train_vectors, ["a", "b"],
                                                                         np.array([[1.0, 0.2]]))
    assert reports == ["b"] and positions.tolist() == [1]  # nearer by angle, farther by distance
    assert similarity[0] == pytest.approx(float(np.dot([1, 0.2], [10, 1]) / np.hypot(1, 0.2) / np.hypot(10, 1)),
                                          rel=1e-6)
    assert baselines.most_frequent_report(["b", "a", "b", "a", "c"]) == "a"
    assert baselines.most_frequent_report(["x", "y", "y"]) == "y"


def test_axial_slices_show_anterior_up_and_the_patients_left_on_the_right():
    volume = torch.zeros(1, 4, 8, 8)
    volume[0, 2, :2, 6:] = 1.0  # slice 2: the patient's left (H small), anterior (W large)
    images = baselines.axial_slices(volume, n=4, size=8)
    assert len(images) == 4
    image = np.asarray(images[2])[..., 0]
    assert image[:2, 6:].min() == 255 and image.sum() == 255 * 4


def test_baselines_table_beside_the_model(run, tiny_run, capsys):
    records, _ = _write_predictions(run)
    (run / "predictions" / "test_shuffled.jsonl").unlink()
    argv = ["--run-dir", str(run), "--device", "cpu", "--volume-cache", str(tiny_run["cache"]), *SCORING,
            "--n-boot", "10"]
    assert baselines.main(argv) == 0
    assert "| metric | model | nearest_neighbour | most_frequent |" in capsys.readouterr().out
    summary = json.loads((run / "baselines.json").read_text())
    methods = summary["methods"]
    assert methods["slices_2d"]["status"] == "skipped" and "--vlm" in methods["slices_2d"]["reason"]
    cands, refs = [r["report"] for r in records], [r["reference"] for r in records]
    assert methods["model"]["results"]["lat_f1"] == pytest.approx(clinical_f1(cands, refs)["lat_f1"])

    cases = load_cases(tiny_run["data"], split=run / "split.csv")
    train_cases, test_cases = cases.split("train"), cases.split("test")
    loaded = load_run(run, train.PIPELINE, train.model_builder())
    size = loaded.meta["preprocessing"]["volume_size"]
    centre = getattr(loaded.model, "image_center", torch.zeros(()))
    with torch.no_grad():
        pooled = {name: torch.nn.functional.normalize(loaded.model.pooled(torch.stack(
            [item["image"] for item in make_dataset(part, size, tiny_run["cache"])])) - centre, dim=-1)
                  for name, part in (("train", train_cases), ("test", test_cases))}
    cosine = pooled["test"] @ pooled["train"].T
    neighbours = _records(run / "predictions" / "test_nearest_neighbour.jsonl")
    for row, record in zip(cosine, neighbours):
        best = int(row.argmax())
        assert record["neighbour"] == train_cases[best].id and record["report"] == train_cases[best].report
        assert record["similarity"] == pytest.approx(float(row[best]), abs=1e-5)
    frequent = _records(run / "predictions" / "test_most_frequent.jsonl")
    assert {r["report"] for r in frequent} == {baselines.most_frequent_report([c.report for c in train_cases])}
    assert methods["nearest_neighbour"]["n"] == len(test_cases)


    # The 2D-slice baseline with the tiny VLM: three slices a case, resumable like generation.
    args = baselines.get_args_parser().parse_args(["--vlm", "tiny-gemma3", "--slices", "3", "--slice-size", "16",
                                                    "--max-new-tokens", "4", "--device", "cpu"])
    items = [{"id": c.id, "reference": c.report, "healthy": c.healthy, "side": c.side} for c in test_cases]
    out = run / "predictions" / "test_slices_2d.jsonl"
    slices = baselines.slice_reports(items, make_dataset(test_cases, size, tiny_run["cache"]), out, args)
    assert [r["id"] for r in slices] == [c.id for c in test_cases] and all(isinstance(r["report"], str)
                                                                           for r in slices)
    before = out.read_bytes()
    assert baselines.slice_reports(items, None, out, args) == slices and out.read_bytes() == before  # all done


# --- bad inputs --------------------------------------------------------------------------------------------------

def _four_d(tmp_path: Path) -> Path:
    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), dtype=np.float32), np.eye(4)), path)
    return path


def _malformed(run: Path) -> Path:
    _write_predictions(run)
    path = run / "predictions" / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_INPUTS = {
    "generate: a run without a model": (generate, lambda run, tiny, tmp: ["--run-dir", str(tmp / "empty"), "--split",
                                                                          "test"], "empty"),
    "generate: a contrastive run": (generate, lambda run, tiny, tmp: ["--run-dir", str(tiny["r1"]), "--split",
                                                                      "test"], "model.json"),
    "generate: a 4-D input": (generate, lambda run, tiny, tmp: ["--run-dir", str(run), "--input", str(_four_d(tmp))],
                              "four_d.nii.gz"),
    "generate: no input": (generate, lambda run, tiny, tmp: ["--run-dir", str(run)], "--split"),
    "generate: a negative n-gram size": (generate, lambda run, tiny, tmp: ["--run-dir", str(run), "--split", "test",
                                                                           "--no-repeat-ngram-size", "-1"],
                                         "--no-repeat-ngram-size"),
    "evaluate: no predictions": (evaluate, lambda run, tiny, tmp: ["--run-dir", str(run)], "test.jsonl"),
    "evaluate: a malformed middle line": (evaluate, lambda run, tiny, tmp: ["--run-dir", str(run), "--split", "test",
                                                                            *SCORING] if _malformed(run) else [],
                                          "test.jsonl: line 2"),
    "baselines: a run without a model": (baselines, lambda run, tiny, tmp: ["--run-dir", str(tmp / "empty")],
                                         "empty"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_end_in_one_line_and_exit_2(name, run, tiny_run, tmp_path, capsys):
    module, argv, expected = BAD_INPUTS[name]
    (tmp_path / "empty").mkdir()
    (run / "metrics_full.json").write_text("{}\n")
    assert module.main(argv(run, tiny_run, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert (run / "metrics_full.json").read_text() == "{}\n"  # no result lost
