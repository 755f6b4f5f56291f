"""Lanczos' precision contract: per-eigenvalue tolerances, the rounding floor and its
float64 refinement, basis storage dtypes, offloading, thick restarts and the memory
budget, against dense eigendecompositions."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trainprobe.curvature import criterion_loss, hessian_operator, lanczos
from trainprobe.curvature.lanczos import basis_bytes


def _symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = eigenvalues.shape[0]
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * eigenvalues) @ q.T


def _steep(n: int = 300, seed: int = 0) -> torch.Tensor:
    """``λ5 / λ1 = 0.004``, like the Hessian the issue measured: a tolerance relative
    to ``λ_max`` leaves the fifth eigenvalue far looser than asked."""
    gen = torch.Generator().manual_seed(seed + 1)
    head = torch.tensor([1.0, 0.6, 0.1, 0.01, 0.004, 0.0035], dtype=torch.float64)
    bulk = 0.003 * torch.rand(n - 6, generator=gen, dtype=torch.float64)
    return _symmetric(torch.cat([head, bulk]), seed)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_default_rule_holds_every_eigenvalue_to_1e6_of_itself():
    a = _steep()
    exact = torch.linalg.eigvalsh(a).flip(0)[:5]
    for seed in range(5):
        pairs = lanczos(a, 300, top=5, generator=_gen(seed))
        relative = ((pairs.values - exact).abs() / exact).max()
        assert pairs.converged and relative <= 1e-6
        assert not pairs.refined and pairs.floor < 1e-14  # float64 products: no floor
        # the error estimates bound the errors
        assert ((pairs.values - exact).abs() <= pairs.errors + 1e-14).all()  # eigvalsh rounds


def test_float32_products_under_their_floor_are_refined_in_float64():
    a32 = _steep().float()
    exact = torch.linalg.eigvalsh(a32.double()).flip(0)[:5]
    for seed in range(3):
        pairs = lanczos(lambda v: a32 @ v, 300, top=5, dtype=torch.float32, refine=a32.double())
        assert pairs.refined and pairs.converged and pairs.vectors.dtype == torch.float64
        assert pairs.floor > 1e-6 * float(exact[-1])  # the floor was in the way
        relative = (pairs.values - exact).abs() / exact
        assert relative.max() <= 1e-6, (seed, relative)
        assert ((pairs.values - exact).abs() <= pairs.errors).all()
    # a dense float32 tensor refines itself (its float64 copy)
    assert lanczos(a32, 300, top=5, generator=_gen(1)).refined


def test_without_a_float64_operator_the_floor_is_reported_not_hidden():
    a32 = _steep().float()
    exact = torch.linalg.eigvalsh(a32.double()).flip(0)[:5]
    with pytest.warns(RuntimeWarning, match=r"rounding floor .* above value_tol=1e-06"):
        pairs = lanczos(lambda v: a32 @ v, 300, top=5, dtype=torch.float32, generator=_gen(0))
    assert not pairs.refined and pairs.vectors.dtype == torch.float32
    assert ((pairs.values - exact).abs() <= pairs.errors).all()  # errors cover the floor
    assert (pairs.errors >= pairs.floor).all()


def test_a_refinement_that_fails_leaves_the_float32_values_and_says_why():
    a32 = _steep().float()

    def broken(v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("expected scalar type Double but found Float")

    with pytest.warns(RuntimeWarning, match=r"the float64 refinement failed: expected scalar"):
        pairs = lanczos(lambda v: a32 @ v, 300, top=5, dtype=torch.float32, refine=broken)
    assert not pairs.refined and pairs.values.shape == (5,)


def test_a_float32_hessian_refines_to_1e9_through_its_float64_twin():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loss = criterion_loss(torch.nn.CrossEntropyLoss())
    op = hessian_operator(model, loss, batch=(x, y))
    model64 = copy.deepcopy(model).double()

    def loss64(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model64, op.layout.unflatten(w), (x.double(),))
        return torch.nn.functional.cross_entropy(out, y)

    dense = torch.func.hessian(loss64)(op.point.double())
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3]
    pairs = lanczos(op, op.dim, top=3, value_tol=1e-9, generator=_gen(0))
    assert pairs.refined and pairs.converged
    assert ((pairs.values - exact).abs() / exact).max() <= 1e-9
    assert op.refinement() is op.refinement() and op.refinement().dtype == torch.float64


@pytest.mark.parametrize(
    ("options", "limit"),
    [
        ({"storage": torch.float32}, 1e-6),
        ({"storage": torch.float32, "offload": True}, 1e-6),
        ({"max_basis": 14}, 1e-10),  # thick restarts, float64
        ({"storage": torch.float32, "max_basis": 14}, 1e-6),
    ],
)
def test_storage_modes_and_restarts_find_the_same_eigenvalues(options, limit):
    a = _symmetric(torch.cat([torch.tensor([9.0, 7.0, 6.5, 5.0, 4.0]), torch.rand(195) * 3]))
    exact = torch.linalg.eigvalsh(a).flip(0)[:5]
    pairs = lanczos(a, 200, top=5, value_tol=1e-12, refine=False, generator=_gen(2), **options)
    assert ((pairs.values - exact).abs() / exact).max() <= limit
    assert pairs.storage == options.get("storage", torch.float64)
    assert (pairs.restarts > 0) == ("max_basis" in options)
    assert pairs.vectors.shape == (200, 5)
    residual = torch.linalg.vector_norm(a @ pairs.vectors.double() - pairs.vectors * pairs.values)
    assert residual <= 1e-4 * 9


def test_bfloat16_storage_moves_lambda_1_by_at_most_1e3():
    a = _symmetric(torch.cat([torch.tensor([9.0, 7.0, 6.5]), torch.rand(397) * 3]))
    exact = float(torch.linalg.eigvalsh(a)[-1])
    pairs = lanczos(a, 400, top=1, storage=torch.bfloat16, refine=False, generator=_gen(0))
    assert pairs.storage == torch.bfloat16 and pairs.vectors.dtype == torch.float32
    assert abs(float(pairs.values[0]) - exact) / exact <= 1e-3
    assert pairs.floor > 1e-6  # the storage's rounding shows in the floor


def test_a_restarted_run_keeps_only_its_budget_and_still_converges():
    a = _symmetric(torch.linspace(0, 1, 500, dtype=torch.float64) ** 4)  # slow: tight top gap
    exact = torch.linalg.eigvalsh(a).flip(0)[:3]
    full = lanczos(a, 500, top=3, generator=_gen(0), max_iter=400)
    lean = lanczos(a, 500, top=3, generator=_gen(0), max_iter=400, max_basis=10)
    assert full.converged and lean.converged and lean.restarts >= 2
    for pairs in (full, lean):
        assert ((pairs.values - exact).abs() / exact).max() <= 1e-6
    assert lean.matvecs >= full.matvecs  # restarts trade products for memory


def test_max_memory_chooses_the_storage_and_says_what_it_needs():
    a = _symmetric(torch.rand(400, dtype=torch.float64))
    run = lambda budget: lanczos(a, 400, top=2, max_memory=budget, generator=_gen(0))  # noqa: E731
    assert run(10**9).storage == torch.float64 and run(10**9).restarts == 0
    tight = run(basis_bytes(400, 9, torch.float64))  # room for 9 vectors: restarts
    assert tight.storage == torch.float64 and tight.restarts > 0
    assert run(basis_bytes(400, 9, torch.bfloat16)).storage == torch.bfloat16
    with pytest.raises(ValueError, match=r"max_memory=100 bytes cannot hold .* raise max_memory"):
        run(100)
    with pytest.raises(ValueError, match=r"storage must be one of"):
        lanczos(a, 400, storage=torch.float16)


def test_a_large_basis_is_kept_within_the_free_memory(monkeypatch):
    import sys

    module = sys.modules["trainprobe.curvature.lanczos"]
    monkeypatch.setattr(module, "AUTO_BUDGET_ABOVE", 10_000)  # bytes: "large" here
    monkeypatch.setattr(module, "_free_memory", lambda device: basis_bytes(400, 10, torch.float64))
    a = _symmetric(torch.linspace(0, 1, 400, dtype=torch.float64) ** 4)
    pairs = lanczos(a, 400, top=2, generator=_gen(0))
    assert pairs.converged and pairs.restarts > 0 and pairs.storage == torch.float64
    monkeypatch.setattr(module, "AUTO_BUDGET_ABOVE", 1 << 30)
    assert lanczos(a, 400, top=2, generator=_gen(0)).restarts == 0


def test_a_basis_too_small_to_grow_is_refused():
    a = _symmetric(torch.rand(50, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"a basis of 4 vectors cannot hold the 6 wanted"):
        lanczos(a, 50, top=5, max_basis=4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_at_10m_parameters_matches_the_formula():
    """Resident memory of a 10M-parameter run (a diagonal float32 operator), measured in
    a fresh process: the basis and working vectors are what the formula says."""
    script = textwrap.dedent(
        """
        import sys, torch
        from trainprobe.curvature import lanczos

        def high_water():  # this process's own peak (ru_maxrss carries the parent's over)
            with open("/proc/self/status") as status:
                line = next(x for x in status if x.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024

        n, storage = 10_000_000, getattr(torch, sys.argv[1])
        d = torch.linspace(0, 1, n) ** 8
        d[:3] = torch.tensor([3.0, 2.0, 1.5])
        lanczos(lambda v: d[:1000] * v, 1000, top=1, dtype=torch.float32, max_iter=3)  # warm-up
        before = high_water()
        pairs = lanczos(lambda v: d * v, n, top=2, tol=1e-3, dtype=torch.float32,
                        storage=storage, max_basis=12, generator=torch.Generator().manual_seed(0))
        print(high_water() - before, pairs.restarts, pairs.matvecs)
        """
    )
    for storage, b in (("float32", 4), ("bfloat16", 2)):
        out = subprocess.run(
            [sys.executable, "-c", script, storage], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        grown, restarts, matvecs = (int(x) for x in out.stdout.split())
        assert restarts > 0  # the basis filled up: all 12 vectors were written
        formula = 10_000_000 * (12 * b + 3 * 4)  # basis_bytes(n, 12, storage)
        formula += (1 << 22) * 4 if storage == "bfloat16" else 0  # one streamed slice
        assert basis_bytes(10_000_000, 12, getattr(torch, storage)) == 10_000_000 * (12 * b + 12)
        assert 0.8 * formula <= grown <= 1.15 * formula, (storage, grown / formula, matvecs)
        print(storage, f"resident growth / formula = {grown / formula:.3f}")


def test_eigenpairs_carry_residuals_errors_and_storage():
    a = _symmetric(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, -2.0], dtype=torch.float64))
    pairs = lanczos(a, 6, top=2, bottom=1, generator=_gen(0))
    assert pairs.values.shape == pairs.residuals.shape == pairs.errors.shape == (3,)
    assert pairs.storage == torch.float64 and pairs.restarts == 0 and not pairs.refined
    np.testing.assert_allclose(pairs.values.numpy(), [5.0, 3.0, -2.0], rtol=1e-6)
