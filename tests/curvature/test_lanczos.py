"""Lanczos against dense eigendecompositions (float64, exact up to rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainprobe.curvature import lanczos, power_iteration


def _symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64)
    )
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _spectrum(n: int = 80) -> list[float]:
    """Outliers on both sides of a bulk, like a network Hessian, plus a near-tie."""
    gen = torch.Generator().manual_seed(1)
    bulk = (torch.rand(n - 7, generator=gen, dtype=torch.float64) - 0.3).tolist()
    return [50.0, 20.0, 19.9, 8.0, 5.0, -4.0, -2.5, *bulk]


def test_top5_and_bottom2_match_the_dense_eigendecomposition():
    a = _symmetric(_spectrum())
    exact = torch.linalg.eigvalsh(a)  # ascending
    pairs = lanczos(a, 80, top=5, bottom=2, tol=1e-10, generator=torch.Generator().manual_seed(0))
    expected = torch.cat([exact.flip(0)[:5], exact[:2]])
    torch.testing.assert_close(pairs.values, expected, rtol=1e-8, atol=0)
    assert pairs.converged and pairs.matvecs < 80
    for i in range(7):  # eigenvectors up to sign, and their residuals
        y = pairs.vectors[:, i]
        assert torch.linalg.vector_norm(a @ y - pairs.values[i] * y) <= 1e-8 * 50
        assert abs(float(y @ y) - 1) < 1e-10
    assert (pairs.residuals <= 1e-10 * 50 * 1.0001).all()


def test_a_float32_callable_operator():
    a = _symmetric(_spectrum()).float()
    pairs = lanczos(
        lambda v: a @ v,
        80,
        top=3,
        tol=1e-6,
        dtype=torch.float32,
        generator=torch.Generator().manual_seed(0),
    )
    exact = torch.linalg.eigvalsh(a.double()).flip(0)[:3]
    torch.testing.assert_close(pairs.values, exact, rtol=1e-5, atol=0)


def test_a_warm_start_needs_fewer_operator_calls():
    a = _symmetric(_spectrum())
    gen = torch.Generator().manual_seed(0)
    cold = lanczos(a, 80, top=3, tol=1e-8, guard=0, generator=gen)
    drift = 1e-3 * _symmetric([1.0] * 40 + [-1.0] * 40, seed=5)
    warm = lanczos(a + drift, 80, top=3, tol=1e-8, guard=0, start=cold.vectors, generator=gen)
    fresh = lanczos(a + drift, 80, top=3, tol=1e-8, guard=0, generator=gen)
    torch.testing.assert_close(warm.values, fresh.values, rtol=1e-8, atol=0)
    assert warm.matvecs < fresh.matvecs


def test_an_invariant_subspace_ends_the_iteration_exactly():
    a = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0, -2.0], dtype=torch.float64))
    pairs = lanczos(a, 5, top=1, bottom=1, generator=torch.Generator().manual_seed(0))
    assert pairs.converged and pairs.matvecs == 3  # only 3 distinct eigenvalues
    torch.testing.assert_close(pairs.values, torch.tensor([3.0, -2.0], dtype=torch.float64))


def test_unconverged_runs_warn_and_say_so():
    a = _symmetric(_spectrum())
    with pytest.warns(RuntimeWarning, match=r"lanczos: not converged after 4 steps"):
        pairs = lanczos(a, 80, top=2, max_iter=4, generator=torch.Generator().manual_seed(0))
    assert not pairs.converged


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"operator": torch.zeros(3, 4)}, ValueError, r"dense operator must have shape \[3, 3\]"),
        ({"operator": "A"}, TypeError, r"operator must be a \[n, n\] tensor, a callable"),
        ({"top": 0}, ValueError, r"need 1 <= top \+ bottom <= 3"),
        ({"top": 2, "bottom": 2}, ValueError, r"need 1 <= top \+ bottom <= 3"),
        ({"tol": 0.0}, ValueError, r"tol must be > 0"),
        ({"value_tol": -1.0}, ValueError, r"value_tol must be > 0 or None, got -1.0"),
        ({"start": torch.ones(4)}, ValueError, r"start must be \[3\] or \[3, j\], got \(4,\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"operator": torch.eye(3, dtype=torch.float64)} | kwargs
    with pytest.raises(error, match=match):
        lanczos(kwargs.pop("operator"), 3, **kwargs)


def test_power_iteration_fallback_finds_the_dominant_eigenpair():
    a = _symmetric([10.0, 3.0, 1.0, -2.0, 0.5])
    gen = torch.Generator().manual_seed(0)
    pairs = power_iteration(a, 5, tol=1e-10, max_iter=500, generator=gen)
    assert pairs.converged and pairs.values[0] == pytest.approx(10.0, rel=1e-9)
    assert torch.linalg.vector_norm(a @ pairs.vectors[:, 0] - 10 * pairs.vectors[:, 0]) < 1e-8
    with pytest.warns(RuntimeWarning, match="power_iteration: not converged"):
        assert not power_iteration(a, 5, tol=1e-12, max_iter=3).converged
    with pytest.raises(ValueError, match="need tol > 0 and max_iter >= 1"):
        power_iteration(a, 5, max_iter=0)


def test_a_guard_pair_stops_a_start_blind_to_the_top_eigenvalue_from_passing():
    """A start vector almost orthogonal to the top eigenvector: the second eigenvalue
    converges first and, unguarded, passes the residual test as if it were the top."""
    a = _symmetric(_spectrum())
    vectors = torch.linalg.eigh(a).eigenvectors  # ascending: [:, -1] is the top
    blind = vectors[:, -2]  # the start mixes in only 1e-3 noise of everything else
    gen = torch.Generator().manual_seed(0)
    fooled = lanczos(a, 80, top=1, tol=1e-2, guard=0, start=blind, generator=gen)
    assert fooled.converged and fooled.values[0] == pytest.approx(20.0, rel=1e-2)
    guarded = lanczos(a, 80, top=1, tol=1e-2, start=blind, generator=gen)
    assert guarded.values[0] == pytest.approx(50.0, rel=1e-3)  # residual 1e-2: error ~r²/gap


def test_value_tol_stops_on_the_eigenvalue_error_estimate():
    """``r² / δ`` bounds the eigenvalue error (Kato–Temple) once the gap is resolved: the
    values reach ``value_tol`` in fewer products than the residual test needs for it."""
    a = _symmetric(_spectrum())
    exact = torch.linalg.eigvalsh(a).flip(0)  # descending
    for top in (1, 3):
        for seed in range(5):
            gen = torch.Generator().manual_seed(seed)
            by_value = lanczos(a, 80, top=top, tol=1e-14, value_tol=1e-9, generator=gen)
            error = (by_value.values - exact[:top]).abs().max() / exact[0]
            assert by_value.converged and error <= 1e-9
            gen = torch.Generator().manual_seed(seed)
            by_residual = lanczos(a, 80, top=top, tol=1e-9, generator=gen)
            assert by_value.matvecs < by_residual.matvecs


def test_gap_bounds_shrink_the_gap_by_the_neighbours_residuals():
    from trainprobe.curvature.lanczos import gap_bounds

    theta = np.array([1.0, 2.0, 5.0])
    residuals = np.array([0.5, 0.1, 0.2])
    # θ=5: nearest 2 with r 0.1 -> δ = 2.9; θ=2: min(1 - 0.5, 3 - 0.2) = 0.5
    np.testing.assert_allclose(gap_bounds(theta, residuals, [2, 1]), [0.04 / 2.9, 0.01 / 0.5])
    assert gap_bounds(np.array([1.0, 1.1]), np.array([0.0, 0.2]), [0])[0] == np.inf  # δ < 0
    assert gap_bounds(np.array([3.0]), np.array([0.1]), [0])[0] == np.inf


def test_guard_vectors_make_a_warm_start_certify_the_gap_sooner():
    """The guard pair's Ritz vector comes back apart from the values; a warm start that
    holds it (as the probes keep it) needs fewer products than one from the top vector
    alone, which must find the neighbour again before the gap is known."""
    bulk = torch.linspace(-1, 3, 78, dtype=torch.float64).tolist()
    a = _symmetric([10.0, 9.0, *bulk])  # a close neighbour: the gap needs λ₂ resolved
    gen = torch.Generator().manual_seed(0)
    before = lanczos(a, 80, top=1, tol=1e-12, value_tol=1e-10, generator=gen)
    assert before.guard_vectors is not None and before.guard_vectors.shape == (80, 1)
    both = torch.cat([before.vectors, before.guard_vectors], 1)  # [n, 2]
    torch.testing.assert_close(both.T @ both, torch.eye(2, dtype=torch.float64), atol=1e-9, rtol=0)
    drifted = a + 1e-4 * _symmetric(torch.linspace(-1, 1, 80).tolist(), seed=5)
    exact = float(torch.linalg.eigvalsh(drifted)[-1])
    runs = {}
    for name, start in (("top only", before.vectors), ("with guard", both)):
        gen = torch.Generator().manual_seed(1)
        runs[name] = lanczos(
            drifted, 80, top=1, tol=1e-12, value_tol=1e-6, start=start, generator=gen
        )
        assert runs[name].values[0] == pytest.approx(exact, rel=1e-6)
    assert runs["with guard"].matvecs < runs["top only"].matvecs
    assert lanczos(a, 80, top=1, guard=0, generator=gen).guard_vectors is None
