"""Lanczos with full reorthogonalisation: extreme eigenpairs of a symmetric operator.

Takes an operator, never a model (DESIGN.md rule 1): a dense symmetric ``[n, n]``
tensor or any callable ``v [n] -> A v [n]`` (a Hessian-vector product, say).
The Krylov basis and the tridiagonal matrix are kept in float64 whatever the
operator's dtype, and the iteration stops as soon as every wanted Ritz pair's
residual is small (Paige 1971; Golub & Van Loan, *Matrix Computations*, §10.1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from .operator import Operator, as_matvec


@dataclass(frozen=True)
class Eigenpairs:
    """Ritz pairs returned by :func:`lanczos`.

    Attributes:
        values: ``[k]`` float64: the wanted eigenvalues, largest first, then the
            most negative ones (``top`` then ``bottom``).
        vectors: ``[n, k]`` float64 unit eigenvectors (sign arbitrary), one column
            per value.
        residuals: ``[k]`` ``||A y - θ y||`` of each pair (Lanczos' cheap exact
            formula ``β_m |s_{m,i}|``).
        matvecs: operator applications used.
        converged: whether every residual met the tolerance.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    matvecs: int
    converged: bool


def _start(
    dim: int, start: Tensor | None, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Unit float64 start vector: the given one(s) summed plus a little noise, or random."""
    noise = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    noise /= torch.linalg.vector_norm(noise)
    if start is None:
        return noise
    if start.shape[0] != dim or start.ndim not in (1, 2):
        raise ValueError(f"start must be [{dim}] or [{dim}, j], got {tuple(start.shape)}")
    guess = start.detach().to(device=device, dtype=torch.float64).reshape(dim, -1).sum(dim=1)
    norm = torch.linalg.vector_norm(guess)
    if not norm > 0:
        return noise
    # keep a small share of every direction, so an eigenvector new since then is found
    mixed = guess / norm + 1e-3 * noise  # [n]
    return mixed / torch.linalg.vector_norm(mixed)


def _ritz(alphas: list[float], betas: list[float], top: int, bottom: int):
    """Wanted Ritz values and their columns of the tridiagonal's eigenvectors."""
    theta, s = eigh_tridiagonal(np.array(alphas), np.array(betas[: len(alphas) - 1]))
    m = len(alphas)
    wanted = list(range(m - 1, m - 1 - min(top, m), -1))  # largest first
    wanted += [i for i in range(min(bottom, m)) if i not in wanted]
    return theta[wanted], s[:, wanted]


def lanczos(
    operator: Operator,
    dim: int,
    *,
    top: int = 1,
    bottom: int = 0,
    tol: float = 1e-8,
    max_iter: int | None = None,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Eigenpairs:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Builds the Krylov basis ``Q = [q_1 .. q_m]`` and tridiagonal ``T = Qᵀ A Q``
    (``α_j = q_jᵀ A q_j``, ``β_j = ||r_j||``), reorthogonalising every new vector
    against all previous ones twice ("twice is enough"). With ``T = S Θ Sᵀ`` the
    Ritz pairs are ``(θ_i, Q s_i)`` with residual ``||A y_i − θ_i y_i|| = β_m |s_{m,i}|``.
    Stops when every wanted pair has residual ``<= tol · max_i |θ_i|`` (relative
    to the spectral norm estimate), at an invariant subspace (``β_m ≈ 0``: exact),
    or after ``max_iter`` steps (then ``converged=False`` and a warning).

    Args:
        operator: ``[n, n]`` symmetric tensor or callable ``v [n] -> A v [n]``.
        dim: ``n``.
        top: how many of the largest (algebraic) eigenvalues.
        bottom: how many of the smallest (most negative) eigenvalues.
        tol: relative residual tolerance.
        max_iter: Krylov dimension cap (default ``min(n, max(100, 10 (top + bottom)))``).
        start: warm start: ``[n]`` or previous eigenvectors ``[n, j]`` (summed).
        generator: randomness for the start vector (a CPU generator).
        dtype: dtype the operator takes (default: a dense operator's, else float64).
        device: where the basis lives and the operator is called (default: a dense
            operator's device, else the CPU). The basis is float64 there; each step
            reads two scalars on the host (``α``, ``β``): one sync per operator call.

    Returns:
        :class:`Eigenpairs`.
    """
    matvec = as_matvec(operator, dim)
    if top < 0 or bottom < 0 or top + bottom < 1 or top + bottom > dim:
        raise ValueError(f"need 1 <= top + bottom <= {dim} (top, bottom >= 0), got {top}, {bottom}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    steps = min(dim, max(100, 10 * (top + bottom))) if max_iter is None else min(max_iter, dim)
    dense = operator if isinstance(operator, Tensor) else None
    if device is None:
        device = dense.device if dense is not None else "cpu"
    device = torch.device(device)
    in_dtype = dtype or (dense.dtype if dense is not None else torch.float64)
    basis = torch.zeros(steps, dim, dtype=torch.float64, device=device)  # [m, n] rows q_j
    basis[0] = _start(dim, start, generator, device)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        q = basis[j]
        w = matvec(q.to(in_dtype)).detach().to(torch.float64).reshape(-1)  # [n]
        alphas.append(float(q @ w))  # deliberate sync: T is built on the host
        for _ in range(2):  # full reorthogonalisation, twice
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        betas.append(float(torch.linalg.vector_norm(w)))
        theta, s = _ritz(alphas, betas, top, bottom)
        residuals = np.abs(betas[-1] * s[-1])
        scale = max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny)
        done = bool(np.all(residuals <= tol * scale)) and len(alphas) >= top + bottom
        if done or betas[-1] <= 1e-12 * scale or j + 1 == steps:
            break
        basis[j + 1] = w / betas[-1]
    m = len(alphas)
    converged = (done or betas[-1] <= 1e-12 * scale) and len(theta) == top + bottom
    if not converged:
        warnings.warn(
            f"lanczos: not converged after {m} steps (largest residual "
            f"{float(residuals.max()):.3g}, wanted <= {tol * scale:.3g}, {len(theta)} of "
            f"{top + bottom} pairs found); raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    ritz = torch.from_numpy(np.ascontiguousarray(s)).to(device)  # [m, k]
    vectors = basis[:m].T @ ritz  # [n, k]
    return Eigenpairs(
        values=torch.from_numpy(np.ascontiguousarray(theta)),
        vectors=vectors,
        residuals=torch.from_numpy(np.ascontiguousarray(residuals)),
        matvecs=m,
        converged=converged,
    )
