"""The offline twin of MedGemma's language model for this pipeline: ``tiny-gemma3-brain``, registered here.

MedGemma arrives knowing radiology language; a random tiny Gemma 3 does not, and a frozen random LM cannot write
anything whatever the projector feeds it (its output layer gives every token nearly the same probability: the
warm-up's caption loss stayed at ln(vocabulary) = 6.5). Building the preset therefore includes a language
pre-training: the random twin (``common.tiny.tiny_gemma3_brain``: 2 layers, 128 wide, a 1500-piece tokenizer learned
inside words of brain MRI reports) is trained as a causal LM through ``common.engine.fit`` on ``twin_corpus()``,
each text after the seed's prompt as the stages present a report. The result is cached (``<cache>/presets``, keyed
by everything that decides it), so only the first build of a seed pays for it (about two minutes on two CPU cores).

The corpus holds no data of any run: reports drawn from the brain phantom's grammar with their own seed
(``CORPUS_SEED``, a stream no phantom case is drawn from), and the pipeline's healthy-control templates at the share
of controls in the default phantom. Never TextBraTS text (a run on TextBraTS may put any of its reports in validation
or test), never a run's reports (a twin pre-trained on them memorised them, and the projector then learned to name a
training case instead of reading the volume). The grammar is narrow, so a draw can equal a case's report word for
word (0 to 4 of the default phantom's 120 across corpus seeds): a new run passes its validation and test reports as
``exclude``, and the build leaves them out (a corpus of its own, cached under its own key; none for the default
phantom). ``brain3d_report.train`` checks the corpus it got (``corpus_overlap``) before training.

    python -m brain3d_report.lm_twin            # build (or find) the preset for seed 0 and print its record
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from brain3d_report.data import HEALTHY_TEMPLATES, official_split, packaged_file
from common.presets import Preset, register_preset

log = logging.getLogger("medvl.brain3d_report")

TWIN = "tiny-gemma3-brain"
CORPUS_SIZE = 2000
CORPUS_SEED = 1021
"""Seed of the corpus's draws from the phantom grammar (``common.phantoms.brain.report_archive``), apart from the
seeds phantoms are written with (0 by default)."""
HEALTHY_SHARE = 1 / 6
"""Share of healthy-template texts in the corpus: the default phantom's controls (24 of 144 cases)."""
VAL_SHARE = 0.1
"""The last tenth of the drawn reports is the pre-training's validation set (the loop keeps the best epoch)."""
EPOCHS = 6
BATCH_SIZE = 16
LR = 3e-3
WARMUP_STEPS = 80
MAX_LEN = 128
BUILD_VERSION = 1
"""Raised whenever the build changes in a way that changes the weights (part of the cache key)."""
PRETRAINING_FILE = "pretraining.json"
WEIGHTS_FILE = "model.safetensors"


def tokenizer_corpus() -> list[str]:
    """The text the twin's tokenizer pieces were learned from (``common.tiny``, frozen in its assets): the packaged
    TextBraTS training fold and the healthy templates. Pieces only, no weights: this is not the LM's corpus."""
    reports = json.loads(packaged_file("reports.json").read_text())
    split = official_split()
    return [text for case, text in sorted(reports.items()) if split.get(case) == "train"] + list(HEALTHY_TEMPLATES)


def twin_tokenizer():
    """The twin's tokenizer alone (no weights, no pre-training)."""
    from common.tiny import BRAIN_GEMMA_VOCAB, tiny_gemma_tokenizer

    return tiny_gemma_tokenizer(BRAIN_GEMMA_VOCAB, corpus="brain")


def twin_corpus(size: int = CORPUS_SIZE, seed: int = CORPUS_SEED) -> list[str]:
    """The twin's language pre-training text: ``size`` phantom-grammar reports drawn with ``seed``, then the healthy
    templates repeated to ``HEALTHY_SHARE`` of the whole (each at least once). No run's data (``build_twin`` leaves
    out a run's held-out reports)."""
    from common.phantoms.brain import report_archive

    reports = report_archive(size, seed=seed)
    wanted = HEALTHY_SHARE / (1.0 - HEALTHY_SHARE) * len(reports)
    repeats = max(1, round(wanted / len(HEALTHY_TEMPLATES)))
    return [*reports, *(list(HEALTHY_TEMPLATES) * repeats)]


def corpus_overlap(reports: Sequence[str], corpus: Sequence[str]) -> list[str]:
    """The ``reports`` found word for word in ``corpus``, healthy templates left out (they are this pipeline's fixed
    wording for every healthy control, not a case's findings)."""
    known = set(corpus)
    return sorted({text for text in reports if text in known and text not in HEALTHY_TEMPLATES})


def corpus_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


class TextSet(Dataset):
    """Token ids after the prompt, their attention mask and which positions the loss counts (the text's)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, counted: torch.Tensor):
        self.ids, self.mask, self.counted = ids, mask, counted

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"ids": self.ids[i], "mask": self.mask[i], "counted": self.counted[i]}


def text_set(tokenizer, texts: Sequence[str], prompt: torch.Tensor, max_len: int = MAX_LEN) -> TextSet:
    """``texts`` tokenized as the stages present a report: (1, P) ``prompt`` ids (BOS included), then the text and
    EOS; the loss counts the text's tokens only, so the LM learns how a report opens after the prompt."""
    from brain3d_report.train import report_tokens

    ids, mask = report_tokens(tokenizer, list(texts), max_len)
    head = prompt.to(ids.dtype).expand(len(ids), -1)
    counted = torch.cat([torch.zeros_like(head, dtype=mask.dtype), mask], dim=1)
    return TextSet(torch.cat([head, ids], dim=1), torch.cat([torch.ones_like(head, dtype=mask.dtype), mask], dim=1),
                   counted)


def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["ids"], attention_mask=batch["mask"]).logits[:, :-1]
    labels = batch["ids"][:, 1:].masked_fill(batch["counted"][:, 1:] == 0, -100)
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return losses, (labels.flatten() != -100).to(losses.dtype)


class LanguageModelling:
    """Next-token loss on the counted tokens, for ``common.engine.fit``; the best epoch's weights are kept."""

    metric_names = ("loss",)

    def training_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, counted = _token_losses(model, batch)
        return (losses * counted).sum() / counted.sum().clamp_min(1)

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, loader, device) -> dict[str, float]:
        total, count = 0.0, 0.0
        for batch in loader:
            losses, counted = _token_losses(model, batch)
            total += float((losses * counted).sum())
            count += float(counted.sum())
        return {"loss": total / max(count, 1.0)}

    def save_best(self, model: torch.nn.Module, metrics: dict[str, float], directory: Path) -> None:
        from safetensors.torch import save_model

        save_model(model, str(Path(directory) / WEIGHTS_FILE))


def pretrain(vlm: torch.nn.Module, tokenizer, texts: Sequence[str], run_dir: Path, *, seed: int = 0,
             epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, warmup_steps: int = WARMUP_STEPS,
             max_len: int = MAX_LEN) -> dict[str, Any]:
    """Train every weight of ``vlm``'s language model on ``texts`` through ``common.engine.fit`` (run written to
    ``run_dir``; the last ``VAL_SHARE`` of the tumour reports validates), load the best epoch's weights, freeze the
    LM, and return the record of what was done."""
    from safetensors.torch import load_model

    from brain3d_report.model import causal_lm_from_vlm
    from brain3d_report.train import prompt_tokens
    from common.engine import TrainConfig, fit

    texts = list(texts)
    reports = [t for t in texts if t not in HEALTHY_TEMPLATES]
    healthy = [t for t in texts if t in HEALTHY_TEMPLATES]
    cut = len(reports) - max(1, round(VAL_SHARE * len(reports)))
    train_texts, val_texts = reports[:cut] + healthy, reports[cut:] + list(dict.fromkeys(healthy))
    prompt = prompt_tokens(tokenizer)
    lm = causal_lm_from_vlm(vlm)
    lm.requires_grad_(True)
    lm.train()
    config = TrainConfig(epochs=epochs, batch_size=batch_size, scheduler="cosine", warmup_steps=warmup_steps,
                         precision="fp32", device="cpu", monitor="val_loss", mode="min", seed=seed, overwrite=True,
                         progress=False, num_workers=0)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    result = fit(lm, optimizer, text_set(tokenizer, train_texts, prompt, max_len),
                 text_set(tokenizer, val_texts, prompt, max_len), LanguageModelling(), config, run_dir)
    load_model(lm, str(Path(run_dir) / "best" / WEIGHTS_FILE))
    vlm.requires_grad_(False)
    vlm.eval()
    first = result.history[0]
    return {"preset": TWIN, "texts": len(texts), "train_texts": len(train_texts), "val_texts": len(val_texts),
            "corpus_sha256": corpus_digest(texts), "epochs": epochs, "steps": result.global_step,
            "batch_size": batch_size, "lr": lr, "seed": seed, "max_len": max_len, "after_prompt": True,
            "train_loss_first_epoch": round(float(first["train_loss"]), 4),
            "val_loss_best": round(float(result.best_value), 4), "best_epoch": result.best_epoch}


def cache_key(seed: int, texts: Sequence[str], **settings: Any) -> str:
    blob = json.dumps({"version": BUILD_VERSION, "seed": seed, "corpus": corpus_digest(texts), **settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_twin(seed: int = 0, cache_dir: str | Path | None = None, *, exclude: Sequence[str] = (),
               pretrain_weights: bool = True, texts: Sequence[str] | None = None, epochs: int = EPOCHS
               ) -> tuple[torch.nn.Module, Any]:
    """``(Gemma3ForConditionalGeneration, Gemma3Processor)`` of the language-pre-trained twin, from the cache
    (``<cache_dir>/presets/tiny-gemma3-brain/<key>``, else ``~/.cache/medvl/presets/...``) or built and cached.

    ``exclude``: texts the corpus must not hold (a run's held-out reports). ``pretrain_weights=False`` gives the
    random twin, for a run that saved the pre-trained weights itself. ``texts`` and ``epochs`` exist for tests (a
    short build on a small corpus). The model's ``pretraining`` attribute is the record (``pretraining.json``).
    """
    from safetensors.torch import load_model

    from common.feature_cache import default_cache_root
    from common.run_guard import run_lock
    from common.tiny import tiny_gemma3_brain

    vlm, processor = tiny_gemma3_brain(seed=seed)
    if not pretrain_weights:
        vlm.requires_grad_(False)
        vlm.pretraining = None
        return vlm, processor
    base = twin_corpus() if texts is None else list(texts)
    left_out = set(exclude) - set(HEALTHY_TEMPLATES)  # the templates are every control's wording, not a case's
    texts = [text for text in base if text not in left_out]
    key = cache_key(seed, texts, epochs=epochs, batch_size=BATCH_SIZE, lr=LR, warmup=WARMUP_STEPS, max_len=MAX_LEN)
    folder = default_cache_root(Path(cache_dir) if cache_dir else None, "presets") / TWIN / key
    record_path, weights = folder / PRETRAINING_FILE, folder / WEIGHTS_FILE
    if not record_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with run_lock(folder, "--cache-dir", create=True, wait=True):
            if not record_path.is_file():  # another process may have built it while this one waited
                log.info("building %s (seed %d): language pre-training on %d texts, cached in %s", TWIN, seed,
                         len(texts), folder)
                shutil.rmtree(folder / "run", ignore_errors=True)  # what an interrupted build left
                record = pretrain(vlm, processor.tokenizer, texts, folder / "run", seed=seed, epochs=epochs)
                record["excluded"] = len(base) - len(texts)
                staged = weights.with_suffix(".tmp")
                from safetensors.torch import save_model

                save_model(vlm, str(staged))
                os.replace(staged, weights)
                record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
                vlm.pretraining = record
                return vlm, processor
    load_model(vlm, str(weights))
    vlm.requires_grad_(False)
    vlm.eval()
    vlm.pretraining = json.loads(record_path.read_text())
    return vlm, processor


register_preset(Preset(TWIN, "vlm", "tiny",
                       "tiny-gemma3 with a 1500-piece brain-report tokenizer, 128 wide, language-pre-trained on "
                       "phantom-grammar reports when built (brain3d_report.lm_twin, cached)",
                       options={"pretraining_corpus": twin_corpus, "tokenizer": twin_tokenizer}, build=build_twin,
                       offline=True))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m brain3d_report.lm_twin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the twin's seed (random weights and pre-training)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: ~/.cache/medvl)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    vlm, _ = build_twin(args.seed, args.cache_dir)
    print(json.dumps(vlm.pretraining, indent=2, sort_keys=True))
    return 0


__all__ = ["TWIN", "twin_corpus", "corpus_overlap", "build_twin", "pretrain", "tokenizer_corpus", "LanguageModelling"]


if __name__ == "__main__":
    raise SystemExit(main())
