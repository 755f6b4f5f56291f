"""The empirical NTK by blocks within a memory budget, against per-example gradients by
autograd in float64, for subsets above the old 256-example cap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainprobe.functional import network
from trainprobe.gradients import DEFAULT_MAX_MEMORY
from trainprobe.gradients.ntk import kernel_blocks, tangent_kernel

F64 = torch.float64


def tiny(outputs: int = 2) -> nn.Module:
    """``P = 3·5 + 5 + 5·C + C`` parameters (32 for two outputs), float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, outputs)).double()


def points(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


def brute_force_kernel(model: nn.Module, x: torch.Tensor, projections: torch.Tensor):
    """``Σ_j J_j J_jᵀ`` from one ``autograd.grad`` per example and projection, ``[n, n]``."""
    params = list(model.parameters())
    kernel = torch.zeros(len(x), len(x), dtype=F64)
    for v in projections.T:  # [C]
        rows = []
        for i in range(len(x)):
            grads = torch.autograd.grad(model(x[i : i + 1])[0] @ v, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        jac = torch.stack(rows)  # [n, P]
        kernel += jac @ jac.T
    return kernel


def budget(n: int, held: int, streamed: int, params: int = 32) -> int:
    """The bytes :func:`kernel_blocks` counts for ``held`` and ``streamed`` float64 rows."""
    return 8 * n * n + held * params * 8 + streamed * params * 16 + held * streamed * 16


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("n", [300, 600])
def test_blocked_kernel_matches_per_example_autograd(n):
    model, x = tiny(), points(n)
    eye = torch.eye(2, dtype=F64)
    expected = brute_force_kernel(model, x, eye)
    whole, used = tangent_kernel(network(model), x, eye)  # default budget: J held whole
    assert kernel_blocks(n, 32, F64, None)[0] == n and used == "vmap"
    assert relative_error(whole, expected) < 1e-10
    tight = budget(n, held=n // 5, streamed=16)
    held, streamed = kernel_blocks(n, 32, F64, tight)
    assert 16 <= held < n and budget(n, held, streamed) <= tight
    blocked, _ = tangent_kernel(network(model), x, eye, max_memory=tight)
    assert relative_error(blocked, expected) < 1e-10
    v = torch.tensor([[1.0, 0.5], [-2.0, 1.5]], dtype=F64)  # [C, k]: two projected outputs
    got, _ = tangent_kernel(network(model), x, v, max_memory=tight, method="auto")
    assert relative_error(got, brute_force_kernel(model, x, v)) < 1e-10


def test_loop_method_by_blocks():
    model, x = tiny(), points(300, seed=2)
    eye = torch.eye(2, dtype=F64)
    got, used = tangent_kernel(network(model), x, eye, method="loop", max_memory=budget(300, 70, 8))
    assert used == "loop"
    assert relative_error(got, brute_force_kernel(model, x, eye)) < 1e-10


def test_a_thousand_examples_fit_the_default_budget_in_one_pass():
    """n = 1024 on a 1M-parameter float32 model: the 8 MiB kernel and blocks of rows
    within 256 MiB; on the tiny model, the Jacobian whole with the largest chunks."""
    held, streamed = kernel_blocks(1024, 2**20, torch.float32, None)
    used = 8 * 1024**2 + held * 2**22 + streamed * 2**23 + held * streamed * 12
    assert 1 <= held < 1024 and used <= DEFAULT_MAX_MEMORY
    assert kernel_blocks(1024, 32, torch.float32, None) == (1024, 1024)
    model, x = tiny(1), points(1024, seed=3)
    one = torch.ones(1, 1, dtype=F64)
    got, _ = tangent_kernel(network(model), x, one, max_memory=budget(1024, 200, 32, params=26))
    assert relative_error(got, brute_force_kernel(model, x, one)) < 1e-10


def test_a_budget_that_cannot_hold_the_kernel_and_two_rows_is_refused():
    model, x = tiny(), points(600)
    need = budget(600, 1, 1)
    assert kernel_blocks(600, 32, F64, need) == (1, 1)
    message = (
        rf"the NTK of n=600 examples needs at least {need} bytes \(the \[n, n\] float64 "
        rf"kernel: 2880000.*more than max_memory={need - 1}; pass max_memory={need} or more"
    )
    with pytest.raises(ValueError, match=message):
        tangent_kernel(network(model), x, torch.eye(2, dtype=F64), max_memory=need - 1)
    with pytest.raises(ValueError, match="max_memory must be a positive integer"):
        kernel_blocks(600, 32, F64, 0)
