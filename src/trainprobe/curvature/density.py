"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

Several Lanczos processes with full reorthogonalisation run in lockstep, one batched
operator call (``matmat``) per step for all probes; each gives Gauss quadrature nodes
(Ritz values) and weights, smoothed with a Gaussian kernel onto a grid (Lin, Saad & Yang
2016; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from .operator import Operator
from .trace import TraceEstimate, _apply, _check_int, _draw, _estimate, _setup

_BREAKDOWN = 1e-10  # β_j <= this · max(|α|, β) ends a Lanczos process: its quadrature is exact


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature of the spectrum, returned by :func:`spectral_density`.

    Attributes:
        grid: ``[G]`` float64 points λ.
        density: ``[G]`` float64 ``φ(λ) = mean_p Σ_i τ_pi N(λ; θ_pi, σ²)``; integrates to 1.
        nodes: ``[probes, m]`` float64 Ritz values θ per probe (``nan`` past a probe's end).
        weights: ``[probes, m]`` float64 quadrature weights τ (0 past a probe's end; each row
            sums to 1).
        sigma: width σ of the Gaussian kernel.
        dim: ``n``.
        matvecs: operator applications used (columns, summed over all calls).

    All tensors are on the CPU.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    dim: int
    matvecs: int

    def moments(self, power: int) -> Tensor:
        """``[probes]`` per-probe ``n Σ_i τ_i θ_i^j`` ≈ ``tr(A^j)``.

        Gauss quadrature with ``m`` nodes is exact for degree ``<= 2m - 1``, so for those
        powers each entry is ``n qᵀ A^j q`` for the unit start vector ``q``: an unbiased
        estimate of ``tr(A^j)`` (Ubaru, Chen & Saad 2017).
        """
        if isinstance(power, bool) or not isinstance(power, int) or power < 0:
            raise ValueError(f"power must be an int >= 0, got {power!r}")
        theta = torch.nan_to_num(self.nodes)  # padding has weight 0
        return self.dim * (self.weights * theta**power).sum(dim=1)

    def trace_estimate(self) -> TraceEstimate:
        """``tr(A) ≈ n mean_p Σ_i τ_pi θ_pi``, with the standard error across probes."""
        per_probe = self.moments(1)  # [probes]
        return _estimate(per_probe, self.matvecs, "slq")


def _lockstep_lanczos(matmat, starts: Tensor, steps: int, in_dtype):
    """``probes`` Lanczos processes with full reorthogonalisation, one matmat per step.

    Args:
        starts: ``[n, p]`` float64 start vectors (normalised here), one per process.

    Returns:
        ``alphas [p, m]``, ``betas [p, m]`` (numpy), ``lengths [p]`` and the matvec count.
    """
    dim, p = starts.shape
    basis = torch.zeros(p, steps, dim, dtype=torch.float64, device=starts.device)  # [p, m, n]
    basis[:, 0] = (starts / torch.linalg.vector_norm(starts, dim=0)).T
    alphas, betas = np.zeros((p, steps)), np.zeros((p, steps))
    lengths, scale = np.zeros(p, dtype=np.int64), np.zeros(p)
    active, matvecs = np.ones(p, dtype=bool), 0
    for j in range(steps):
        live = torch.from_numpy(np.flatnonzero(active)).to(starts.device)
        w = torch.zeros(p, dim, dtype=torch.float64, device=starts.device)  # [p, n]
        w[live] = _apply(matmat, basis[live, j].T, in_dtype).T  # one call, all live probes
        matvecs += len(live)
        alpha = (basis[:, j] * w).sum(dim=1)  # [p]
        past = basis[:, : j + 1]  # [p, j+1, n]
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w -= torch.einsum("pjn,pj->pn", past, torch.einsum("pjn,pn->pj", past, w))
        beta = torch.linalg.vector_norm(w, dim=1)  # [p]
        host = torch.stack([alpha, beta]).cpu().numpy()  # deliberate sync: T lives on the host
        alphas[active, j], betas[active, j] = host[0, active], host[1, active]
        lengths[active] = j + 1
        scale = np.maximum(scale, np.maximum(np.abs(host[0]), host[1]))
        active &= host[1] > _BREAKDOWN * scale  # breakdown: an invariant subspace, exact
        if not active.any() or j + 1 == steps:
            break
        go_on = torch.from_numpy(np.flatnonzero(active)).to(starts.device)
        basis[go_on, j + 1] = w[go_on] / beta[go_on, None]
    return alphas, betas, lengths, matvecs


def _gauss_quadrature(alphas: np.ndarray, betas: np.ndarray, lengths: np.ndarray):
    """``nodes, weights [p, max length]``: eigenvalues of each ``T`` and ``(first row)²``."""
    p, m = len(lengths), int(lengths.max())
    nodes, weights = np.full((p, m), np.nan), np.zeros((p, m))
    for i, k in enumerate(lengths):  # a tiny k × k tridiagonal per probe
        theta, s = eigh_tridiagonal(alphas[i, :k], betas[i, : k - 1])
        nodes[i, :k], weights[i, :k] = theta, s[0] ** 2
    return nodes, weights


def _check_kernel(grid, sigma) -> None:
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0 (a kernel width), got {sigma!r}")
    if isinstance(grid, Tensor):
        if grid.ndim != 1 or grid.numel() < 2:
            raise ValueError(f"grid must be a 1-D tensor of >= 2 points, got {tuple(grid.shape)}")
    elif grid is not None:
        _check_int("grid", grid, 2, " points")


def _grid(nodes: np.ndarray, grid, sigma) -> tuple[np.ndarray, float]:
    """The evaluation points ``[G]`` and σ (defaults as in :func:`spectral_density`)."""
    lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    if sigma is None:
        sigma = 0.01 * (max(hi - lo, abs(lo), abs(hi)) or 1.0)
    if isinstance(grid, Tensor):
        return grid.detach().cpu().double().numpy(), float(sigma)
    points = 1000 if grid is None else grid
    return np.linspace(lo - 5 * sigma, hi + 5 * sigma, points), float(sigma)


def spectral_density(
    operator: Operator,
    dim: int,
    *,
    probes: int = 8,
    steps: int = 60,
    grid: Tensor | int | None = None,
    sigma: float | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (SLQ).

    For a unit start vector ``q``, ``m`` Lanczos steps give ``T = S Θ Sᵀ`` and the Gauss
    quadrature ``qᵀ f(A) q ≈ Σ_i τ_i f(θ_i)`` with ``τ_i = s_{1i}²`` (Golub & Meurant; Lin,
    Saad & Yang 2016; Ubaru, Chen & Saad 2017). Averaging over random ``q`` and smoothing each
    node with a Gaussian kernel gives the density ``φ(λ) = mean_p Σ_i τ_pi N(λ; θ_pi, σ²)``
    (Ghorbani, Krishnan & Xiao 2019). The ``probes`` processes run in lockstep (one
    ``matmat`` of all live probes per step), each fully reorthogonalised in float64; a
    process whose ``β`` vanishes has found an invariant subspace and stops (exact).

    Args:
        operator: as :func:`hutchinson`.
        dim: ``n``.
        probes: number of random start vectors.
        steps: Lanczos steps per probe (capped at ``n``); moments up to ``2·steps − 1``
            are exact per probe.
        grid: ``[G]`` points, or how many points (default 1000) spanning the nodes ± 5σ.
        sigma: kernel width (default 1% of ``max(θ_max − θ_min, |θ_min|, |θ_max|)``: it
            separates outliers from the bulk; pass a smaller one to resolve the bulk, but
            not below the node spacing, or the density breaks into spikes).
        distribution, generator, dtype, device: as :func:`hutchinson`.

    Returns:
        :class:`SpectralDensity`. Memory: the bases take ``probes · steps · n`` float64.

    Examples:
        A Rademacher probe puts ``1/n`` of its mass on each coordinate, so the spectrum of
        ``diag(1, 1, 1, 1, 1, 3, 3, 3, 3, 3)`` is exactly half at 1 and half at 3.

        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0] * 5 + [3.0] * 5, dtype=torch.float64))
        >>> d = spectral_density(A, 10, probes=4, generator=torch.Generator().manual_seed(0))
        >>> d.nodes.round(decimals=6).unique().tolist()  # the Ritz values: the eigenvalues
        [1.0, 3.0]
        >>> d.weights.round(decimals=6).unique().tolist()  # the mass at each
        [0.5]
        >>> spacing = float(d.grid[1] - d.grid[0])
        >>> round(float(d.density[d.grid < 2].sum()) * spacing, 3)  # the smoothed mass below 2
        0.5
        >>> round(d.trace_estimate().value, 6)  # tr(A)
        20.0
    """
    matmat, in_dtype, device, gen = _setup(operator, dim, generator, dtype, device, distribution)
    _check_int("probes", probes, 1)
    _check_int("steps", steps, 1)
    _check_kernel(grid, sigma)
    starts = _draw(dim, probes, distribution, gen, device)  # [n, p]
    alphas, betas, lengths, matvecs = _lockstep_lanczos(matmat, starts, min(steps, dim), in_dtype)
    nodes, weights = _gauss_quadrature(alphas, betas, lengths)  # [p, m]
    points, sigma = _grid(nodes, grid, sigma)  # [G]
    theta = np.nan_to_num(nodes)[..., None]  # [p, m, 1]
    kernel = np.exp(-0.5 * ((points - theta) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = np.einsum("pm,pmg->g", weights, kernel) / probes  # [G]
    return SpectralDensity(
        grid=torch.from_numpy(points),
        density=torch.from_numpy(density),
        nodes=torch.from_numpy(nodes),
        weights=torch.from_numpy(weights),
        sigma=sigma,
        dim=dim,
        matvecs=matvecs,
    )
