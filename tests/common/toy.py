"""The one toy problem of the floor's loop tests: a linearly separable tensor dataset, a small MLP with dropout (so
RNG state matters for exact resume) and its ``TrainTask``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from common.rundir import save_model


def toy_data(n: int = 96, dim: int = 6, seed: int = 0) -> TensorDataset:
    """``n`` points in ``dim`` dimensions labelled by the side of a fixed plane."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    return TensorDataset(x, (x[:, 0] - 0.5 * x[:, 1] > 0).float())


def toy_model(dim: int = 6, hidden: int = 16, dropout: float = 0.3, seed: int = 1,
              lr: float = 5e-3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh, seeded MLP and its AdamW."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


class ToyTask:
    """Logistic regression on ``toy_data``; ``scripted_metric`` adds a ``score`` that takes the given values in
    turn (to drive best-epoch and early-stopping decisions)."""

    def __init__(self, scripted_metric=None):
        self.scripted_metric, self.evals = scripted_metric, 0
        self.metric_names = ("loss",) if scripted_metric is None else ("loss", "score")

    def training_loss(self, model, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)

    def validate(self, model, loader, device):
        self.evals += 1
        losses = []
        for x, y in loader:
            assert x.device == next(model.parameters()).device  # the loop hands batches on the model's device
            losses.append(F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="sum"))
        metrics = {"loss": float(sum(losses)) / len(loader.dataset)}
        if self.scripted_metric is not None:
            metrics["score"] = self.scripted_metric[self.evals - 1]
        return metrics

    def save_best(self, model, metrics, directory):
        save_model(directory, model, {"metrics": metrics})
