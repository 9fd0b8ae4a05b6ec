"""Language pre-training of a random tiny LM on report text, so the offline pipeline has an LM that knows words.

MedGemma arrives knowing radiology language; its offline twin (``tiny-gemma3-brain``) is random, and a frozen random
LM cannot write anything whatever the projector feeds it (its output layer gives every token nearly the same
probability: the caption loss of the warm-up stayed at ln(vocabulary) = 6.5). Before the warm-up stage of such a
run, this trains the whole tiny LM as a causal LM on text-only reports in the language of the run's data (a report
archive beside the cases, else the packaged TextBraTS training fold) and on the healthy templates, each after the
seed's prompt, as the stages present a report. Afterwards the LM is frozen again as the stages expect, and its
weights are saved with the run (they can no longer be rebuilt from the preset).

Example:
    python -m brain3d_report.train --stage warmup --init R1 --output-dir R2 --data-root D   # --lm-pretrain-steps auto
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from brain3d_report.data import HEALTHY_TEMPLATES, official_split, packaged_file
from common.errors import DataError

log = logging.getLogger("medvl.brain3d_report")

DEFAULT_STEPS = 800
"""Optimizer steps (batch 16) for a random tiny twin: about two minutes on two CPU cores for ``tiny-gemma3-brain``.
Copying the side named earlier in a report ("in the left ... lobe. Edema ... in the left") appears abruptly during
training: after 400 steps on the phantom's archive one seed of three had not learnt it (the next side right in 34
of 62 cases against 61 and 61 for the others); after 800 steps all three got 62 of 62."""
LR = 3e-3
ARCHIVE_FILE = "report_archive.json"
"""A text-only report archive beside the cases (a JSON list of strings; the brain phantom writes one)."""


def load_report_archive(path: Path) -> list[str]:
    """The reports of a JSON list of non-empty strings; a DataError naming ``path`` otherwise."""
    try:
        texts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"cannot read the report archive ({error})") from None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(path, "a report archive must be a non-empty JSON list of non-empty strings")
    return texts


def packaged_reports() -> list[str]:
    """The packaged TextBraTS reports of the official training fold (220), in case order."""
    reports = json.loads(packaged_file("reports.json").read_text())
    split = official_split()
    return [text for case, text in sorted(reports.items()) if split.get(case) == "train"]


def pretraining_corpus(archive: Sequence[str] | None = None, healthy_share: float = 0.0) -> list[str]:
    """The text a random tiny LM twin learns the report language from, before any volume is seen.

    ``archive``: reports in the language of the run's data that describe none of its cases (the phantom's
    ``report_archive.json``); without one, the packaged TextBraTS reports of the official training fold. The
    healthy-control templates follow, repeated to about ``healthy_share`` of the corpus (the share of controls in
    the run's training split), so that the LM's prior for opening a report with "No focal lesion" matches the
    data's; at least once each. Never the run's own reports: an LM pre-trained on them (101 phantom reports, 400
    steps) memorised them (training caption loss 0.08 against 0.55 on validation), and the projector then learned
    to name a training case rather than to read the volume.
    """
    reports = list(archive) if archive is not None else packaged_reports()
    if not 0.0 <= healthy_share < 1.0:
        raise ValueError(f"healthy_share must lie in [0, 1), got {healthy_share}")
    wanted = healthy_share / (1.0 - healthy_share) * len(reports)
    repeats = max(1, round(wanted / len(HEALTHY_TEMPLATES)))
    return [*reports, *(list(HEALTHY_TEMPLATES) * repeats)]


def pretrain_language_model(lm: torch.nn.Module, tokenizer, texts: list[str], *, steps: int = DEFAULT_STEPS,
                            batch_size: int = 16, max_len: int = 128, lr: float = LR, seed: int = 0,
                            prompt: torch.Tensor | None = None) -> list[float]:
    """Train every weight of ``lm`` on next-token prediction over ``texts``; returns the loss of each step.

    ``prompt``: (1, P) ids put before every text (BOS included), as the report stages put the seed's prompt before
    a report; the loss then counts the text's tokens only, so the LM learns how a report opens after that prompt
    without learning to write it. Without it, the texts follow BOS. Seeded (batches drawn from a generator of
    ``seed``), so the same call gives the same weights. The LM is left frozen in eval mode.
    """
    from brain3d_report.train import report_tokens

    ids, mask = report_tokens(tokenizer, texts, max_len)
    bos = tokenizer.bos_token_id
    if prompt is None:
        prompt = torch.tensor([[bos]] if bos is not None else [[]], dtype=ids.dtype)
    head = prompt.to(ids.dtype).expand(len(ids), -1)
    ids = torch.cat([head, ids], dim=1)
    mask = torch.cat([torch.ones_like(head, dtype=mask.dtype), mask], dim=1)
    counted = mask.clone()
    counted[:, : head.shape[1]] = 0
    device = lm.get_input_embeddings().weight.device
    lm.requires_grad_(True)
    lm.train()
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:  # linear warm-up over a tenth of the steps, then cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(ids), (batch_size,), generator=generator)
        batch, batch_mask = ids[rows].to(device), mask[rows].to(device)
        logits = lm(input_ids=batch, attention_mask=batch_mask).logits[:, :-1]
        labels = batch[:, 1:].masked_fill(counted[rows, 1:].to(device) == 0, -100)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    lm.requires_grad_(False)
    lm.eval()
    log.info("LM pre-training on %d reports: loss %.3f -> %.3f in %d steps", len(texts), losses[0], losses[-1], steps)
    return losses


__all__ = ["pretraining_corpus", "pretrain_language_model", "load_report_archive", "packaged_reports",
           "DEFAULT_STEPS", "ARCHIVE_FILE"]
