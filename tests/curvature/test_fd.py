"""Finite-difference Hessian-vector products: every product's own error estimate, the step
rule along concentrated directions, refusal across kinks, and one collective per try."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainprobe.curvature import FiniteDifferenceError, hessian_operator, lanczos
from trainprobe.curvature.fd import CentralDifferences
from trainprobe.functional import criterion_loss

CE = criterion_loss(nn.CrossEntropyLoss())


class _TinyLM(nn.Module):
    """Embedding, LayerNorm, a GELU MLP and a head over 8 tokens: smooth, ~30k weights,
    whose top Hessian eigenvectors sit on few weights (LayerNorm gains, the head)."""

    def __init__(self, vocab: int = 64, d: int = 48) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.02 * torch.randn(8, d))
        self.ln, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos
        h = h + self.out(F.gelu(self.fc(self.ln(h))))
        return self.head(self.norm(h)).mean(dim=1)


def _lm_case():
    torch.manual_seed(0)
    model = _TinyLM()
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randint(0, 64, (32, 8), generator=gen), torch.randint(0, 64, (32,)))


def test_products_along_eigenvectors_and_their_estimates_are_honest():
    """float32 products on a smooth ~30k-weight model, along random directions and along
    the exact top eigenvectors (where truncation is largest): within 1e-3 of λ1 of the
    float64 exact products, and never above the operator's own estimate."""
    model, batch = _lm_case()
    exact = hessian_operator(model.double(), CE, batch=batch, engine="graph")
    top = lanczos(exact, exact.dim, top=2, tol=1e-10)
    fd = hessian_operator(model.float(), CE, batch=batch, engine="fd")
    gen = torch.Generator().manual_seed(2)
    vs = torch.cat([torch.randn(exact.dim, 2, generator=gen, dtype=torch.float64), top.vectors], 1)
    errors = (fd.matmat(vs.float()).double() - exact.matmat(vs)).norm(dim=0) / (
        top.values[0] * vs.norm(dim=0)
    )
    assert float(errors.max()) < 1e-3
    assert float(errors.max()) <= fd.fd_error <= 1e-2  # conservative, and under fd_tol
    values = lanczos(fd, fd.dim, top=2, tol=1e-6).values
    torch.testing.assert_close(values, top.values, rtol=1e-4, atol=0)


def test_step_moves_the_weights_a_direction_moves_by_their_own_size():
    """h‖v‖ = ε^(1/3) (rms(w) + ‖w ⊙ v/‖v‖‖): a one-hot direction on w_i moves it by
    ε^(1/3)(rms + |w_i|), not by ε^(1/3)(1 + ‖w‖) (thousands of times |w_i| at P = 10⁷)."""
    point = torch.tensor([3.0, -0.5, 0.0, 4.0], dtype=torch.float64)  # ‖w‖ = 5.02, rms 2.51
    cd = CentralDifferences(lambda w: w, point)
    eps3 = torch.finfo(torch.float64).eps ** (1 / 3)
    rms = float(point.norm()) / 2
    onehot = torch.eye(4, dtype=torch.float64)
    steps = cd.step(2 * onehot)  # ‖v‖ = 2
    torch.testing.assert_close(steps, eps3 * (rms + point.abs()) / 2)
    zero = CentralDifferences(lambda w: w, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(
        zero.step(torch.eye(3, dtype=torch.float64)), torch.full((3,), eps3, dtype=torch.float64)
    )


def _relu_cnn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    gen = torch.Generator().manual_seed(2)
    return model, (torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 10, (64,)))


def test_kinks_within_the_step_are_refused_with_the_way_out():
    """A ReLU network in float32: the step (ε^(1/3) ≈ 5e-3 of the weights) carries units
    across their kinks and the central difference is off by O(1); every product is
    refused, naming the cause and float64, where the step is ~800 times smaller and the
    same products agree with the exact engine."""
    model, batch = _relu_cnn()
    exact = hessian_operator(model, CE, batch=batch, engine="graph", dtype=torch.float64)
    vs = torch.randn(exact.dim, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with pytest.raises(FiniteDifferenceError, match=r"not smooth.*ReLU.*dtype=torch.float64"):
        hessian_operator(model, CE, batch=batch, engine="fd").matmat(vs.float())
    fd = hessian_operator(model, CE, batch=batch, engine="fd", dtype=torch.float64)
    error = (fd.matmat(vs) - exact.matmat(vs)).norm(dim=0) / exact.matmat(vs).norm(dim=0)
    assert float(error.max()) < 1e-6 and fd.fd_error < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_units_sitting_on_their_kink_are_refused_at_any_step(dtype):
    """Zero inputs through a bias-free-at-zero ReLU layer: every pre-activation of those
    examples is exactly 0, so any step crosses the kink, in float64 too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)).to(dtype)
    nn.init.zeros_(model[0].bias)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x[::2] = 0
    with pytest.raises(FiniteDifferenceError, match="ReLU"):
        fd = hessian_operator(model, CE, batch=(x, torch.arange(16) % 3), engine="fd")
        fd.matmat(torch.randn(fd.dim, 2, dtype=dtype))


def test_a_product_over_tolerance_is_retried_at_smaller_steps_then_refused():
    """A gradient with a jump at 0 (|w|): crossed by h and 2h, the product's estimate is
    O(1); the retries at h/4 and h/16 cross it too, then the product is refused. A
    tolerance the jump fits in accepts it."""
    calls = []

    def gradient_at(w: torch.Tensor) -> torch.Tensor:
        calls.append(w.clone())
        return torch.sign(w) + w  # ∇(|w| + w²/2): H = I away from 0

    cd = CentralDifferences(gradient_at, torch.zeros(2, dtype=torch.float64))
    v = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    with pytest.raises(FiniteDifferenceError, match="estimated relative error"):
        cd.products(v)
    assert len(calls) == 4 * 3  # four gradients per try, three tries
    loose = CentralDifferences(gradient_at, torch.zeros(2, dtype=torch.float64), tol=10.0)
    assert float(loose.products(v)[0, 0]) > 1e3  # the jump over 2h: accepted, and flagged
    assert loose.error > 0.4


def test_zero_columns_cost_nothing_and_reduce_is_called_once_per_try():
    """A reduce that records its calls (and returns its input, as a mean over identical
    ranks would): one collective for both differences of every try, [P, 2k] for the k
    non-zero columns, and the same products as without it."""
    model, batch = _lm_case()
    reduced = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        reduced.append(tuple(t.shape))
        return t

    fd = hessian_operator(model, CE, batch=batch, engine="fd", reduce=reduce)
    plain = hessian_operator(model, CE, batch=batch, engine="fd")
    calibration = len(reduced)
    vs = torch.randn(fd.dim, 3, generator=torch.Generator().manual_seed(4))
    vs[:, 1] = 0
    out = fd.matmat(vs)
    assert reduced[calibration:] == [(fd.dim, 4)]  # [P, 2k] for the two non-zero columns
    assert not out[:, 1].any()
    torch.testing.assert_close(out, plain.matmat(vs))


def test_non_finite_gradients_are_refused():
    cd = CentralDifferences(lambda w: w / (w - w), torch.ones(3, dtype=torch.float64))
    with pytest.raises(FiniteDifferenceError, match="nan"):
        cd.products(torch.ones(3, 1, dtype=torch.float64))


def test_fd_tol_must_be_positive():
    with pytest.raises(ValueError, match="fd_tol"):
        CentralDifferences(lambda w: w, torch.ones(2), tol=0.0)


def test_sharded_curvature_refuses_placements_other_than_dim_0_over_every_rank():
    """HSDP's 2-D mesh or a Shard(1) placement would put the shards' rows in another
    order than the flat layout assumes: refused, naming the parameter and placement."""
    pytest.importorskip("torch.distributed.tensor")
    from torch.distributed.tensor import Replicate, Shard

    from trainprobe.curvature.sharded import _check_placement

    class _Mesh:
        def __init__(self, shape):
            self.shape, self.ndim = shape, len(shape)

        def size(self):
            return int(torch.tensor(self.shape).prod())

    class _Param:
        def __init__(self, shape, placements):
            self.device_mesh, self.placements = _Mesh(shape), placements

    _check_placement("w", _Param((2,), (Shard(0),)), 2)  # fully_shard's default: fine
    for param in (_Param((2, 2), (Replicate(), Shard(0))), _Param((2,), (Shard(1),))):
        with pytest.raises(ValueError, match=r"dim 0.*'w' has placements"):
            _check_placement("w", param, 4 if len(param.device_mesh.shape) == 2 else 2)
