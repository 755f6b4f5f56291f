"""Trace, diagonal and SLQ spectral density against exact dense references (float64).

Stochastic estimators are checked with bounds over many fixed generators (unbiasedness,
error shrinking with the budget, stderr matching the spread), never by equality for one
seed; the deterministic parts (low rank, Gauss quadrature moments, full Krylov, breakdown,
matvec counts) are checked exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainprobe.curvature import (
    SpectralDensity,
    TraceEstimate,
    diagonal,
    hutch_plus_plus,
    hutchinson,
    spectral_density,
    trace,
)
from trainprobe.curvature.density import _gauss_quadrature, _lockstep_lanczos
from trainprobe.curvature.trace import _draw


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _bulk(count: int, lo: float, hi: float, seed: int = 1) -> list[float]:
    return (lo + (hi - lo) * torch.rand(count, generator=_gen(seed), dtype=torch.float64)).tolist()


N = 200
HESSIAN = _symmetric([60.0, 25.0, 24.5, 10.0, *_bulk(N - 4, -0.5, 1.5)])  # outliers + bulk
INDEFINITE = _symmetric([-30.0, -12.0, 20.0, 8.0, *_bulk(N - 4, -1.0, 1.0)], seed=2)
DECAYING = _symmetric([100.0 / (i + 1) ** 2 for i in range(N)], seed=3)
LOW_RANK = _symmetric([9.0, -7.0, 5.0, 3.0, 2.0, 1.0, -0.5, 0.25] + [0.0] * (N - 8), seed=4)
ESTIMATORS = {"hutchinson": hutchinson, "hutch++": hutch_plus_plus}


class Counter:
    """An operator with matvec and matmat that records every call's block size and dtype."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a, self.blocks, self.dtypes, self.matvec_calls = a, [], set(), 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.matvec_calls += 1
        return self.a @ v

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        self.blocks.append(vs.shape[1])
        self.dtypes.add(vs.dtype)
        return self.a.to(vs.dtype) @ vs


def _values(method: str, a: torch.Tensor, seeds: range, **kwargs) -> np.ndarray:
    return np.array([ESTIMATORS[method](a, N, generator=_gen(s), **kwargs).value for s in seeds])


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("a", [HESSIAN, INDEFINITE], ids=["hessian", "indefinite"])
def test_estimates_are_unbiased_within_four_standard_errors(method, distribution, a):
    values = _values(method, a, range(50), matvecs=30, distribution=distribution)
    sem = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - float(a.trace())) < 4 * sem


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_reported_stderr_matches_the_spread_across_seeds(method):
    runs = [ESTIMATORS[method](HESSIAN, N, matvecs=60, generator=_gen(s)) for s in range(60)]
    spread = np.std([r.value for r in runs], ddof=1)
    reported = np.median([r.stderr for r in runs])
    assert 0.5 < reported / spread < 2.0
    assert all(r.matvecs == 60 and r.method == method for r in runs)


def test_hutch_plus_plus_has_far_less_spread_on_a_decaying_spectrum():
    plain = _values("hutchinson", DECAYING, range(40), matvecs=60).std()
    plus = _values("hutch++", DECAYING, range(40), matvecs=60).std()
    assert plus < 0.1 * plain


def test_hutch_plus_plus_is_exact_when_the_rank_is_below_a_third_of_the_budget():
    for seed in range(5):  # rank 8 < 30 / 3
        estimate = hutch_plus_plus(LOW_RANK, N, matvecs=30, generator=_gen(seed))
        assert abs(estimate.value - float(LOW_RANK.trace())) < 1e-10
        assert estimate.stderr < 1e-10


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_the_error_shrinks_as_the_budget_grows(method):
    exact = float(HESSIAN.trace())
    small = np.median(np.abs(_values(method, HESSIAN, range(30), matvecs=30) - exact))
    large = np.median(np.abs(_values(method, HESSIAN, range(30, 60), matvecs=300) - exact))
    assert large < 0.6 * small  # expected sqrt(30 / 300) = 0.32 for Hutchinson, less for Hutch++


def test_trace_dispatches_and_defaults_to_hutch_plus_plus():
    assert trace(HESSIAN, N, matvecs=30, generator=_gen(3)) == hutch_plus_plus(
        HESSIAN, N, matvecs=30, generator=_gen(3)
    )
    plain = trace(HESSIAN, N, matvecs=30, method="hutchinson", generator=_gen(3))
    assert plain == hutchinson(HESSIAN, N, matvecs=30, generator=_gen(3))
    assert isinstance(plain, TraceEstimate)


def test_diagonal_is_exact_for_a_diagonal_matrix_and_converges_otherwise():
    d = torch.linspace(-3, 5, N, dtype=torch.float64)
    torch.testing.assert_close(diagonal(torch.diag(d), N, matvecs=3, generator=_gen(0)), d)
    estimate = diagonal(HESSIAN, N, matvecs=400, generator=_gen(1))
    off = HESSIAN - torch.diag(HESSIAN.diagonal())
    stderr = torch.sqrt((off**2).sum(dim=1) / 400)  # Rademacher: Var = Σ_{l≠j} a_jl²
    assert float(((estimate - HESSIAN.diagonal()).abs() / stderr).max()) < 5
    gaussian = diagonal(HESSIAN, N, matvecs=400, distribution="gaussian", generator=_gen(2))
    assert float((gaussian - HESSIAN.diagonal()).abs().mean()) < 2 * float(stderr.mean())


def test_operator_calls_are_blocks_and_matvecs_are_counted_exactly():
    op = Counter(HESSIAN)
    assert hutchinson(op, N, matvecs=30, generator=_gen(0)).matvecs == 30 and op.blocks == [30]
    op = Counter(HESSIAN)
    hutchinson(op, N, matvecs=30, batch_size=8, generator=_gen(0))
    assert op.blocks == [8, 8, 8, 6]
    op = Counter(HESSIAN)
    assert hutch_plus_plus(op, N, matvecs=31, generator=_gen(0)).matvecs == 31
    assert op.blocks == [10, 10, 11]
    op = Counter(HESSIAN)
    assert hutch_plus_plus(op, N, matvecs=31, batch_size=4, generator=_gen(0)).matvecs == 31
    assert max(op.blocks) <= 4 and sum(op.blocks) == 31
    op = Counter(HESSIAN)
    diagonal(op, N, matvecs=10, batch_size=3, generator=_gen(0))
    assert op.blocks == [3, 3, 3, 1]
    op = Counter(HESSIAN)
    assert spectral_density(op, N, probes=4, steps=10, generator=_gen(0)).matvecs == 40
    assert op.blocks == [4] * 10 and op.matvec_calls == 0


def test_batching_and_operator_form_do_not_change_the_estimate():
    dense = hutchinson(HESSIAN, N, matvecs=20, generator=_gen(5))
    called = hutchinson(lambda v: HESSIAN @ v, N, matvecs=20, generator=_gen(5))
    assert abs(dense.value - called.value) < 1e-10 and called.matvecs == 20
    plus = hutch_plus_plus(HESSIAN, N, matvecs=30, generator=_gen(5))
    split = hutch_plus_plus(HESSIAN, N, matvecs=30, batch_size=10, generator=_gen(5))
    assert abs(plus.value - split.value) < 1e-10  # the residual probes are one block of 10


def test_a_float32_operator_is_called_in_float32():
    op = Counter(HESSIAN.float())
    single = hutch_plus_plus(op, N, matvecs=30, dtype=torch.float32, generator=_gen(0))
    double = hutch_plus_plus(HESSIAN, N, matvecs=30, generator=_gen(0))
    assert op.dtypes == {torch.float32}
    assert abs(single.value - double.value) < 1e-4 * abs(double.value)
    density = spectral_density(HESSIAN.float(), N, probes=2, steps=20, generator=_gen(0))
    assert density.nodes.dtype == torch.float64 and abs(float(density.nodes[0, -1]) - 60) < 1e-3


def test_a_single_probe_has_no_stderr():
    estimate = hutchinson(HESSIAN, N, matvecs=1, generator=_gen(0))
    assert estimate.matvecs == 1 and math.isnan(estimate.stderr) and math.isfinite(estimate.value)


@pytest.mark.parametrize("generator", [None, 7])
def test_the_global_rng_is_untouched(generator):
    calls = [
        lambda g: hutchinson(HESSIAN, N, matvecs=5, generator=g),
        lambda g: hutch_plus_plus(HESSIAN, N, matvecs=6, distribution="gaussian", generator=g),
        lambda g: trace(HESSIAN, N, matvecs=6, generator=g),
        lambda g: diagonal(HESSIAN, N, matvecs=5, generator=g),
        lambda g: spectral_density(HESSIAN, N, probes=2, steps=5, generator=g),
    ]
    for call in calls:
        before = torch.get_rng_state()
        call(None if generator is None else _gen(generator))
        assert torch.equal(torch.get_rng_state(), before)


# --- stochastic Lanczos quadrature ----------------------------------------------------


def test_slq_moments_are_exact_quadratic_forms_of_the_start_vectors():
    density = spectral_density(INDEFINITE, N, probes=6, steps=12, generator=_gen(0))
    z = _draw(N, 6, "rademacher", _gen(0), "cpu")  # the same start vectors, [n, 6]
    power = z
    for j in range(1, 2 * 12):  # Gauss quadrature: exact up to degree 2m − 1
        power = INDEFINITE @ power  # [n, 6] A^j z
        exact = (z * power).sum(dim=0)  # zᵀ A^j z, with n = ||z||²
        torch.testing.assert_close(density.moments(j), exact, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(density.moments(0), torch.full((6,), float(N), dtype=torch.float64))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_slq_moments_are_unbiased_for_the_trace_and_the_squared_norm(distribution):
    runs = [
        spectral_density(
            HESSIAN, N, probes=8, steps=10, distribution=distribution, generator=_gen(s)
        )
        for s in range(12)
    ]
    for j, exact in ((1, HESSIAN.trace()), (2, (HESSIAN**2).sum())):
        samples = torch.cat([r.moments(j) for r in runs])  # [96]
        sem = float(samples.std()) / math.sqrt(samples.numel())
        assert abs(float(samples.mean()) - float(exact)) < 4 * sem
    estimate = runs[0].trace_estimate()
    assert estimate.method == "slq" and estimate.matvecs == 80
    assert estimate.value == pytest.approx(float(runs[0].moments(1).mean()), rel=1e-12)


def test_with_full_krylov_the_density_puts_count_over_n_on_each_cluster():
    n, probes = 100, 40
    spectrum = [40.2, 40.0, 39.8, 15.4, 15.2, 15.0, 14.8, 14.6, *_bulk(n - 8, -1.0, 2.0)]
    a = _symmetric(spectrum, seed=5)
    density = spectral_density(a, n, probes=probes, steps=n, generator=_gen(0))
    for k in range(3):  # full Krylov: every probe's nodes are the eigenvalues
        torch.testing.assert_close(density.nodes[k], torch.linalg.eigvalsh(a), atol=1e-8, rtol=0)
    for (lo, hi), count in (((35, 45), 3), ((10, 20), 5), ((-4, 5), n - 8)):
        inside = (density.grid >= lo) & (density.grid <= hi)
        mass = float(torch.trapezoid(density.density[inside], density.grid[inside]))
        assert abs(mass - count / n) < 4 * math.sqrt(2 * count / probes) / n  # χ² spread


@pytest.mark.parametrize("a", [HESSIAN, INDEFINITE], ids=["hessian", "indefinite"])
def test_the_density_integrates_to_one(a):
    density = spectral_density(a, N, probes=4, steps=30, generator=_gen(1))
    assert isinstance(density, SpectralDensity) and density.grid.shape == (1000,)
    assert abs(float(torch.trapezoid(density.density, density.grid)) - 1) < 1e-3
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(4, dtype=torch.float64))
    coarse = spectral_density(a, N, probes=4, steps=30, grid=300, generator=_gen(1))
    assert coarse.grid.shape == (300,) and coarse.sigma == density.sigma
    assert abs(float(torch.trapezoid(coarse.density, coarse.grid)) - 1) < 1e-3


def test_a_given_grid_and_sigma_are_used():
    grid = torch.linspace(-5, 70, 500, dtype=torch.float64)
    density = spectral_density(
        HESSIAN, N, probes=2, steps=20, grid=grid, sigma=0.5, generator=_gen(0)
    )
    assert torch.equal(density.grid, grid) and density.sigma == 0.5
    assert abs(float(torch.trapezoid(density.density, density.grid)) - 1) < 1e-3


def test_lockstep_runs_give_the_nodes_of_one_probe_at_a_time():
    starts = _draw(N, 4, "rademacher", _gen(0), "cpu")  # [n, 4]
    matmat = HESSIAN.__matmul__
    together = _gauss_quadrature(*_lockstep_lanczos(matmat, starts, 25, torch.float64)[:3])
    for k in range(4):
        alone = _gauss_quadrature(
            *_lockstep_lanczos(matmat, starts[:, k : k + 1], 25, torch.float64)[:3]
        )
        np.testing.assert_allclose(together[0][k], alone[0][0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(together[1][k], alone[1][0], rtol=0, atol=1e-10)


def test_breakdown_ends_a_probe_with_an_exact_quadrature():
    a = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0, -2.0], dtype=torch.float64))
    op = Counter(a)
    density = spectral_density(op, 5, probes=4, steps=10, generator=_gen(0))
    assert density.nodes.shape == (4, 3) and density.matvecs == 12 and op.blocks == [4] * 3
    torch.testing.assert_close(density.nodes, torch.tensor([[-2.0, 1.0, 3.0]] * 4).double())
    assert density.trace_estimate().value == pytest.approx(6.0, abs=1e-12)
    assert float(density.moments(2).max() - 24.0) < 1e-10


def test_a_stopped_probe_is_no_longer_applied():
    a = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    starts = torch.stack([torch.eye(6, dtype=torch.float64)[0], torch.ones(6).double()], dim=1)
    op = Counter(a)  # probe 0 starts on an eigenvector: invariant after one step
    alphas, betas, lengths, matvecs = _lockstep_lanczos(op.matmat, starts, 6, torch.float64)
    assert lengths.tolist() == [1, 6] and op.blocks == [2, 1, 1, 1, 1, 1] and matvecs == 7
    nodes, weights = _gauss_quadrature(alphas, betas, lengths)
    assert nodes[0, 0] == pytest.approx(1.0) and np.isnan(nodes[0, 1:]).all()
    assert weights[0].tolist() == [1.0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(nodes[1], np.arange(1.0, 7.0), atol=1e-10)


# --- validation -------------------------------------------------------------------------

EYE = torch.eye(3, dtype=torch.float64)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: hutch_plus_plus(EYE, 3, matvecs=2),
            ValueError,
            r"matvecs must be >= 3, got 2 \(Hutch\+\+ splits them in three\); "
            r"use method='hutchinson'",
        ),
        (lambda: trace(EYE, 3, matvecs=2), ValueError, r"matvecs must be >= 3, got 2"),
        (lambda: hutchinson(EYE, 3, matvecs=0), ValueError, r"matvecs must be >= 1, got 0"),
        (lambda: diagonal(EYE, 3, matvecs=0), ValueError, r"matvecs must be >= 1, got 0"),
        (lambda: hutchinson(EYE, 3, matvecs=10.0), TypeError, r"matvecs must be an int, got float"),
        (lambda: hutchinson(EYE, 3, batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
        (
            lambda: trace(EYE, 3, method="exact"),
            ValueError,
            r"method must be one of \('hutchinson', 'hutch\+\+'\), got 'exact'",
        ),
        (
            lambda: hutchinson(EYE, 3, distribution="normal"),
            ValueError,
            r"distribution must be one of \('rademacher', 'gaussian'\), got 'normal'",
        ),
        (lambda: hutchinson(EYE, 0), ValueError, r"dim must be >= 1, got 0"),
        (lambda: hutchinson(EYE, 4), ValueError, r"dense operator must have shape \[4, 4\]"),
        (
            lambda: hutchinson(lambda v: v[:2], 3),
            ValueError,
            r"the operator returned shape \(2, 100\) for a block of shape \(3, 100\).*dim=3",
        ),
        (
            lambda: hutchinson(torch.full((3, 3), math.nan), 3),
            ValueError,
            r"the operator returned NaN/inf: check the loss is finite",
        ),
        (lambda: spectral_density(EYE * math.inf, 3), ValueError, r"the operator returned NaN/inf"),
        (
            lambda: hutchinson(EYE, 3, generator=0),
            TypeError,
            r"generator must be a CPU torch.Generator, e.g. torch.Generator\(\).manual_seed\(0\)",
        ),
        (lambda: spectral_density(EYE, 3, probes=0), ValueError, r"probes must be >= 1, got 0"),
        (lambda: spectral_density(EYE, 3, steps=0), ValueError, r"steps must be >= 1, got 0"),
        (lambda: spectral_density(EYE, 3, sigma=0.0), ValueError, r"sigma must be > 0"),
        (lambda: spectral_density(EYE, 3, grid=1), ValueError, r"grid must be >= 2, got 1 points"),
        (lambda: spectral_density(EYE, 3, grid="fine"), TypeError, r"grid must be an int, got str"),
        (
            lambda: spectral_density(EYE, 3, grid=torch.zeros(2, 2)),
            ValueError,
            r"grid must be a 1-D tensor of >= 2 points, got \(2, 2\)",
        ),
        (
            lambda: spectral_density(EYE, 3, steps=2).moments(-1),
            ValueError,
            r"power must be an int >= 0, got -1",
        ),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
