"""LRF terms on matrices with known singular values: the tail (LRFL) and the seed's top-r term."""

from __future__ import annotations

import pytest
import torch

from mavl_chexpert.model import feature_basis, seed_term, tail_term

SINGULAR = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)


def _known_matrix(n: int = 48, seed: int = 0) -> torch.Tensor:
    """An (n, 12) matrix U diag(SINGULAR) V^T with random orthonormal U and V."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(SINGULAR), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(SINGULAR), len(SINGULAR), generator=gen, dtype=torch.float64))
    return ((u * SINGULAR) @ v.T).float()


@pytest.mark.parametrize("rank", [0, 3, 7, 11, 12])
def test_both_terms_give_the_known_sums(rank):
    features = _known_matrix()
    u, s, v = feature_basis(features)
    assert torch.allclose(s.double(), SINGULAR, atol=1e-4)
    assert tail_term(u, features, v, rank).item() == pytest.approx(SINGULAR[rank:].sum().item(), abs=1e-4)
    if rank:
        assert seed_term(features, rank).item() == pytest.approx(SINGULAR[:rank].sum().item(), abs=1e-4)


def test_per_batch_tail_terms_add_up_to_the_full_tail():
    features = _known_matrix(n=50)
    u, _, v = feature_basis(features)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    total = sum(tail_term(u[idx], features[idx], v, 4) for idx in order.split(16))  # 16, 16, 16, 2
    assert total.item() == pytest.approx(SINGULAR[4:].sum().item(), abs=1e-4)
    # A single batch's share is not the tail of that batch: the whole split's basis is what LRFL penalises.
    batch = order[:16]
    _, batch_s, _ = feature_basis(features[batch])
    assert abs(tail_term(u[batch], features[batch], v, 4).item() - batch_s[4:].sum().item()) > 1e-3


def test_transposed_basis_would_not_give_the_singular_values():
    """diag(U^T F V) = S needs V with the right singular vectors as columns (LRFL's code multiplies by Vh)."""
    features = _known_matrix()
    u, _, v = feature_basis(features)
    wrong = tail_term(u, features, v.T.contiguous(), 4).item()
    assert wrong != pytest.approx(SINGULAR[4:].sum().item(), abs=1e-2)


def test_optimising_the_tail_lowers_the_tail_and_keeps_the_leading_values():
    features = _known_matrix().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([features], lr=0.1)
    for _ in range(5):
        u, _, v = feature_basis(features.detach())  # recomputed per "epoch", as in training
        optimizer.zero_grad()
        tail_term(u, features, v, 4).backward()
        optimizer.step()
    after = torch.linalg.svdvals(features.detach().double())
    # The gradient of the tail term is U_tail V_tail^T: each step lowers every tail value by lr, nothing else.
    assert torch.allclose(after[4:9], SINGULAR[4:9] - 0.5, atol=1e-3)
    assert torch.allclose(after[:4], SINGULAR[:4], atol=1e-3)


def test_seed_term_pushes_the_leading_values_down():
    features = _known_matrix().clone().requires_grad_(True)
    seed_term(features, 4).backward()
    with torch.no_grad():
        after = torch.linalg.svdvals((features - 0.5 * features.grad).double())
    assert after[0] < SINGULAR[0] - 0.4 and torch.allclose(after[6:], SINGULAR[6:], atol=1e-3)
