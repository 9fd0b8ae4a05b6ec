"""brain3d_report.lm_twin: the offline LM twin's corpus holds no held-out report; its pre-training goes through the
engine, is cached, and counts the report tokens after the prompt only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from brain3d_report import lm_twin, train
from brain3d_report.data import HEALTHY_TEMPLATES, Case, Cases, packaged_file
from common.errors import DataError
from common.phantoms.brain import write_brain
from common.presets import get_preset


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return lm_twin.twin_corpus()


def test_the_twin_is_registered_by_the_pipeline_and_declares_its_corpus():
    preset = get_preset(lm_twin.TWIN, "vlm", "--lm")
    assert preset.build is lm_twin.build_twin and preset.options["pretraining_corpus"] is lm_twin.twin_corpus
    assert "brain3d_report" not in Path(__import__("common.presets").presets.__file__).read_text()


def test_the_corpus_holds_no_packaged_textbrats_report(corpus):
    """TextBraTS runs may put any report in validation or test: none may be in the corpus."""
    reports = set(json.loads(packaged_file("reports.json").read_text()).values())
    assert len(reports) > 300 and not reports & set(corpus)
    assert len(corpus) == 2000 + 7 * 57  # the healthy templates at a sixth of the corpus
    assert sum(t in HEALTHY_TEMPLATES for t in corpus) / len(corpus) == pytest.approx(1 / 6, abs=0.01)


def test_the_corpus_holds_no_real_textbrats_report(corpus, shared_data):
    reports = json.loads((shared_data / "textbrats" / "reports.json").read_text())
    assert len(reports) == 369
    texts = set(reports.values()) | {" ".join(t.split()) for t in reports.values()}  # as written, as loaded
    assert not texts & set(corpus)


def test_the_corpus_holds_no_report_of_the_default_phantom(corpus, tmp_path):
    """The default phantom's 120 case reports (its volumes at a small size: the reports do not depend on it)."""
    write_brain(tmp_path / "phantom", seed=0, size=(16, 16, 16))
    root = tmp_path / "phantom"
    reports = [path.read_text().strip() for path in sorted(root.rglob("*_flair_text.txt"))]
    assert len(reports) == 120 and not set(reports) & set(corpus)


def test_a_run_whose_lm_read_a_held_out_report_is_refused(corpus):
    def case(i: int, split: str, report: str) -> Case:
        return Case(id=f"c{i}", flair=Path(f"c{i}.nii.gz"), report=report, side="left", healthy=False, split=split)

    # A training report may be in the corpus, a healthy template must be; a validation or test report may not.
    cases = Cases([case(0, "train", corpus[0]), case(1, "val", HEALTHY_TEMPLATES[0]), case(2, "test", corpus[5])],
                  Path("data"))
    assert train.held_out_reports(cases) == [HEALTHY_TEMPLATES[0], corpus[5]]
    without = [text for text in corpus if text != corpus[5]]
    assert lm_twin.corpus_overlap(train.held_out_reports(cases), without) == []
    config = {"lm": lm_twin.TWIN, "lm_pretrain": {"corpus_sha256": lm_twin.corpus_digest(without)}}
    train.check_pretraining_corpus(config, cases)
    config["lm_pretrain"]["corpus_sha256"] = lm_twin.corpus_digest(corpus)  # trained on the test report too
    with pytest.raises(DataError, match="--lm"):
        train.check_pretraining_corpus(config, cases)
    train.check_pretraining_corpus({"lm": "tiny-gemma3", "lm_pretrain": None}, cases)  # no corpus: nothing to check


def test_the_twin_is_pretrained_through_the_engine_cached_and_frozen(corpus, tmp_path, monkeypatch):
    texts = corpus[:25] + list(HEALTHY_TEMPLATES)  # two batches of 16 a epoch
    held_out = [texts[3], HEALTHY_TEMPLATES[0]]  # a run's validation or test reports: the template stays
    key = lm_twin.cache_key(0, [t for t in texts if t != texts[3]], epochs=3, batch_size=lm_twin.BATCH_SIZE,
                            lr=lm_twin.LR, warmup=lm_twin.WARMUP_STEPS, max_len=lm_twin.MAX_LEN)
    interrupted = tmp_path / "presets" / lm_twin.TWIN / key / "run"
    interrupted.mkdir(parents=True)
    (interrupted / "train.log").write_text("a build killed before its first epoch\n")
    vlm, processor = lm_twin.build_twin(seed=0, cache_dir=tmp_path, texts=texts, epochs=3, exclude=held_out)
    record = vlm.pretraining
    assert record["excluded"] == 1 and record["texts"] == len(texts) - 1
    folders = list((tmp_path / "presets" / lm_twin.TWIN).iterdir())
    assert folders == [interrupted.parent]  # the interrupted build's folder, built over
    folder = folders[0]
    history = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3 and record["steps"] == history[-1]["step"]  # the engine's loop and its record
    assert record["val_loss_best"] < math.log(len(processor.tokenizer)) - 1.0  # well below a random LM's ln(V)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_loss"] < history[0]["val_loss"]
    assert record["corpus_sha256"] == lm_twin.corpus_digest([t for t in texts if t != texts[3]])
    assert not any(p.requires_grad for p in vlm.parameters()) and not vlm.training

    def no_training(*args, **kwargs):
        raise AssertionError("a cached twin is loaded, not trained again")

    monkeypatch.setattr(lm_twin, "pretrain", no_training)
    again, _ = lm_twin.build_twin(seed=0, cache_dir=tmp_path, texts=texts, epochs=3, exclude=held_out)
    assert again.pretraining == record
    assert all(torch.equal(a, b) for a, b in zip(vlm.state_dict().values(), again.state_dict().values()))


def test_the_pretraining_loss_counts_the_report_tokens_after_the_prompt_only():
    from common.tiny import tiny_gemma3_brain

    vlm, processor = tiny_gemma3_brain(seed=0)
    from brain3d_report.model import causal_lm_from_vlm

    lm, tokenizer = causal_lm_from_vlm(vlm), processor.tokenizer
    texts = ["A mass lesion is seen in the left frontal lobe.", "No focal lesion is seen."]
    prompt = train.prompt_tokens(tokenizer)
    data = lm_twin.text_set(tokenizer, texts, prompt, 32)
    ids, mask = train.report_tokens(tokenizer, texts, 32)
    with torch.no_grad():
        logits = lm(input_ids=data.ids, attention_mask=data.mask).logits
        loss = lm_twin.LanguageModelling().training_loss(lm, {"ids": data.ids, "mask": data.mask,
                                                              "counted": data.counted})
    start = prompt.shape[1] - 1  # the last prompt token predicts the first report token
    labels = ids.masked_fill(mask == 0, -100)
    manual = torch.nn.functional.cross_entropy(logits[:, start:-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
