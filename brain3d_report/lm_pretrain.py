"""Language pre-training of a random tiny LM on report text, so the offline pipeline has an LM that knows words.

MedGemma arrives knowing radiology language; its offline twin ``tiny-gemma3`` is random, and a frozen random LM
cannot write anything whatever the projector feeds it (its output layer gives every token nearly the same
probability: the caption loss of the warm-up stayed at ln(vocabulary) = 6.5). Before the warm-up stage of such a
run, this trains the whole tiny LM as a causal LM on report text that ships with the package, the training split of
the real TextBraTS reports plus the healthy-control templates, never the run's own reports. Afterwards the LM is
frozen again as the stages expect, and its weights are saved with the run (they can no longer be rebuilt from the
preset).

Example:
    python -m brain3d_report.train --stage warmup --init R1 --output-dir R2 --data-root D   # --lm-pretrain-steps auto
"""

from __future__ import annotations

import json
import logging
import math

import torch
import torch.nn.functional as F

from brain3d_report.data import HEALTHY_TEMPLATES, official_split, packaged_file

log = logging.getLogger("medvl.brain3d_report")

DEFAULT_STEPS = 200
"""Optimizer steps (batch 16): 12 s on two CPU cores for ``tiny-gemma3``; its loss on phantom reports (never seen)
falls from 6.55 (random) to 3.53, and is higher after 400 steps (3.63: it starts to memorise the 227 texts)."""
LR = 3e-3


def pretraining_corpus() -> list[str]:
    """The packaged TextBraTS reports of the official training fold (220) and the healthy templates, in order."""
    reports = json.loads(packaged_file("reports.json").read_text())
    split = official_split()
    return [*(text for case, text in sorted(reports.items()) if split.get(case) == "train"), *HEALTHY_TEMPLATES]


def pretrain_language_model(lm: torch.nn.Module, tokenizer, texts: list[str], *, steps: int = DEFAULT_STEPS,
                            batch_size: int = 16, max_len: int = 128, lr: float = LR, seed: int = 0) -> list[float]:
    """Train every weight of ``lm`` on next-token prediction over ``texts``; returns the loss of each step.

    Seeded (batches drawn from a generator of ``seed``), so the same call gives the same weights. The LM is left
    frozen in eval mode.
    """
    from brain3d_report.train import report_tokens

    ids, mask = report_tokens(tokenizer, texts, max_len)
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = torch.cat([torch.full((len(ids), 1), bos, dtype=ids.dtype), ids], dim=1)
        mask = torch.cat([torch.ones((len(mask), 1), dtype=mask.dtype), mask], dim=1)
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
        labels = batch[:, 1:].masked_fill(batch_mask[:, 1:] == 0, -100)
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


__all__ = ["pretraining_corpus", "pretrain_language_model", "DEFAULT_STEPS"]
