"""LRF terms against known singular values and against LRFL's and the seed's literal expressions; the basis's
device and the bytes a step moves."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.errors import ConfigError
from mavl_chexpert.model import feature_basis, tail_term
from mavl_chexpert.train_image import BasisLRFTask, ImageTask

SINGULAR = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)


def _known_matrix(n: int = 48, seed: int = 0) -> torch.Tensor:
    """An (n, 12) matrix U diag(SINGULAR) V^T with random orthonormal U and V."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(SINGULAR), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(SINGULAR), len(SINGULAR), generator=gen, dtype=torch.float64))
    return ((u * SINGULAR) @ v.T).float()


@pytest.mark.parametrize("rank", [0, 3, 7, 11, 12])
def test_tail_term_gives_the_known_sums(rank):
    features = _known_matrix()
    u, s, v = feature_basis(features)
    assert torch.allclose(s.double(), SINGULAR, atol=1e-4)
    assert tail_term(u, features, v, rank).item() == pytest.approx(SINGULAR[rank:].sum().item(), abs=1e-4)


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


def _seed_literal(features: torch.Tensor, rank: int, eta: float = 1e-3) -> torch.Tensor:
    """The seed notebook's ``compute_uv`` + the regulariser of ``lrfl_loss_fn``, as written there."""
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(features, full_matrices=False)
        u, v = u[:, :rank], vh[:rank, :]
    reg = torch.sum((u.T @ features) @ v.T)
    return eta * reg / features.size(0)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_seed_variant_equals_the_seeds_formula_in_value_and_gradient(rank):
    base = torch.randn(16, 24, generator=torch.Generator().manual_seed(rank))
    ours_in, theirs_in = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    task = ImageTask(meta={}, labels=("a",), val_targets=None, val_mask=None, variant="seed", rank=rank,
                     weight=1e-3, threshold_rule="f1")
    ours = 1e-3 * task.lrf_term(ours_in, torch.arange(16))
    theirs = _seed_literal(theirs_in, rank)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert torch.allclose(ours_in.grad, theirs_in.grad, atol=1e-7)
    # Its gradient is the rank-1 (U_r 1)(V_r^T 1)^T, not the gradient of the top-r singular values (U_r V_r^T).
    u, _, vh = torch.linalg.svd(base, full_matrices=False)
    trace_grad = 1e-3 / 16 * u[:, :rank] @ vh[:rank]
    grad_values = torch.linalg.svdvals(ours_in.grad.double())
    assert grad_values[1] < 1e-5 * grad_values[0]
    if rank > 1:
        assert not torch.allclose(ours_in.grad, trace_grad, atol=1e-7)
    # Its value is the sum of the top singular values (the off-diagonal entries of U_r^T F V_r^T are zero).
    assert theirs.item() == pytest.approx(1e-3 / 16 * torch.linalg.svdvals(base)[:rank].sum().item(), rel=1e-4)


def _lrfl_literal(u: torch.Tensor, vh: torch.Tensor, features: torch.Tensor, index: torch.Tensor, rank: int):
    """LRFL's ``trucated_nuclear_loss(F, U, V, softRank, id_F)`` with scipy's (U, Vh), as its code writes it."""
    s = u[index].T @ features
    s = s @ vh
    return torch.norm(torch.diag(s)[rank:], p=1)


def test_lrfl_variant_equals_lrfls_code_with_its_basis():
    features = torch.randn(64, 12, generator=torch.Generator().manual_seed(3)).double()
    u, _, v = feature_basis(features)
    vh = v.T.double()
    task = BasisLRFTask(meta={}, labels=("a",), val_targets=None, val_mask=None, variant="lrfl", rank=5, weight=1.0,
                        threshold_rule="f1", basis_images=None, eval_batch_size=8)
    task.set_basis(u, v, len(features), torch.device("cpu"))
    index = torch.tensor([3, 17, 40, 41, 63, 0, 9, 22])
    batch = features[index].float().clone().requires_grad_(True)
    literal_in = batch.detach().double().clone().requires_grad_(True)
    ours = task.lrf_term(batch, index)
    theirs = _lrfl_literal(u.double(), vh, literal_in, index, 5)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)
    assert torch.allclose(batch.grad.double(), literal_in.grad, atol=1e-5)
    # LRFL multiplies by Vh where diag(U^T F V) = S needs V = Vh^T: on the whole split it is not the tail sum.
    full = _lrfl_literal(u.double(), vh, features, torch.arange(64), 5).item()
    assert full != pytest.approx(feature_basis(features)[1][5:].sum().item(), rel=1e-2)


def test_lrfl_variant_needs_a_square_vh():
    task = BasisLRFTask(meta={}, labels=("a",), val_targets=None, val_mask=None, variant="lrfl", rank=2, weight=1.0,
                        threshold_rule="f1", basis_images=None, eval_batch_size=8)
    u, _, v = feature_basis(torch.randn(6, 12))
    with pytest.raises(ConfigError, match="at least 12 training images"):
        task.set_basis(u, v, 6, torch.device("cpu"))


@pytest.mark.parametrize("batch_size", [4, 12, 48])
def test_tail_weight_means_the_same_at_any_batch_size(batch_size):
    """Averaged over an epoch's batches, ``tail``'s per-step term is the tail of F / sqrt(N) at every batch size."""
    features = _known_matrix(n=48)
    u, _, v = feature_basis(features)
    task = BasisLRFTask(meta={}, labels=("a",), val_targets=None, val_mask=None, variant="tail", rank=4, weight=1.0,
                        threshold_rule="f1", basis_images=None, eval_batch_size=8)
    task.set_basis(u, v, 48, torch.device("cpu"))
    batches = torch.arange(48).split(batch_size)
    mean_term = sum(task.lrf_term(features[idx], idx).item() for idx in batches) / len(batches)
    assert mean_term == pytest.approx(SINGULAR[4:].sum().item() / 48 ** 0.5, rel=1e-4)
    # Per image, the gradient is of BCE's order (1 / B), as a mean over the batch would give.
    batch = features[:batch_size].clone().requires_grad_(True)
    task.lrf_term(batch, torch.arange(batch_size)).backward()
    expected = 48 ** 0.5 / batch_size * (u[:batch_size, 4:] @ v[:, 4:].T)
    assert torch.allclose(batch.grad, expected, atol=1e-5)


class _CountBytes(TorchDispatchMode):
    """Bytes each aten op writes while active, and those of copies (device transfers included)."""

    def __init__(self):
        super().__init__()
        self.written, self.copied = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        size = sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(out)
                   if isinstance(t, torch.Tensor))
        self.written += size
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            self.copied += size
        return out


def _step_bytes(n: int, device: torch.device, restored: bool = False) -> tuple[list[int], list[int]]:
    """(written, copied) bytes of three LRF steps of batch 8, with a basis of ``n`` training features."""
    task = BasisLRFTask(meta={}, labels=("a",), val_targets=None, val_mask=None, variant="tail", rank=4, weight=1.0,
                        threshold_rule="f1", basis_images=None, eval_batch_size=8)
    u, _, v = feature_basis(torch.randn(n, 32, generator=torch.Generator().manual_seed(n)))
    if restored:  # a resumed run: the basis comes back from the checkpoint on the host
        task.load_task_tensors({"u_tail": u[:, 4:].contiguous(), "v_tail": v[:, 4:].contiguous(),
                                "count": torch.tensor(float(n))})
    else:
        task.set_basis(u, v, n, device)
        assert task.u_tail.device.type == device.type and task.v_tail.device.type == device.type
    written, copied = [], []
    for step in range(3):
        features = torch.randn(8, 32, device=device, requires_grad=True)
        index = torch.arange(step, step + 8, device=device)
        with _CountBytes() as counter:
            task.lrf_term(features, index)
        written.append(counter.written)
        copied.append(counter.copied)
    return written, copied


def test_a_step_moves_nothing_that_grows_with_the_training_split():
    """The basis is put on the training device once per epoch; a step only indexes it there. ``meta`` stands in for
    an accelerator: a per-step ``U.to(device)`` would show as a copy of N x k values."""
    meta = torch.device("meta")
    small, big = _step_bytes(64, meta), _step_bytes(4096, meta)
    assert small == big and sum(small[1]) == 0
    # Restored on the host after a resume, the basis is moved on the first step only.
    written, copied = _step_bytes(4096, meta, restored=True)
    assert copied[0] >= 4096 * 28 * 4 and copied[1:] == [0, 0] and written[1:] == big[0][1:]
