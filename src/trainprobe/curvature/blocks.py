"""Lanczos variants that spend batched operator calls (``matmat``) instead of single ones.

- :func:`block_lanczos`: one block Krylov space, ``block_size`` vectors per call
  (Golub & Underwood 1977; Golub & Van Loan §10.3), Rayleigh–Ritz on the full basis.
  More products than single-vector Lanczos for the same accuracy, far fewer calls:
  it pays where one ``k``-column product costs about one product (a GPU).
- :func:`diagonal_block_eigenpairs`: the spectra of the diagonal blocks ``A_bb`` of
  ``A`` (per-layer Hessian spectra): one Lanczos process per block, run in lockstep,
  each step one ``matmat`` whose column ``b`` is block ``b``'s vector padded with zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .lanczos import Eigenpairs, _check_wanted, _Krylov, _start, _steps
from .operator import Operator, as_matmat, operator_placement


def block_lanczos(
    operator: Operator,
    dim: int,
    *,
    top: int = 1,
    bottom: int = 0,
    block_size: int = 4,
    tol: float = 1e-8,
    max_iter: int | None = None,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Eigenpairs:
    """Extreme eigenpairs from a block Krylov space ``span{Q_0, A Q_0, A² Q_0, …}``.

    Each step applies ``A`` to ``block_size`` orthonormal vectors in one ``matmat``,
    orthogonalises the result against the whole float64 basis (twice) and takes the
    Ritz pairs of ``T = Qᵀ A Q`` (assembled from the stored products ``A Q``). The
    residuals ``||A y − θ y||`` are computed from the stored products, exactly.

    Args:
        operator, dim, top, bottom, tol, generator, dtype, device: as :func:`.lanczos`.
        block_size: vectors per operator call (``k``).
        max_iter: cap on the basis size (default as :func:`.lanczos`, rounded up to a
            whole block).
        start: warm start ``[n]`` or ``[n, j]``: its columns seed the first block.

    Returns:
        :class:`~.lanczos.Eigenpairs`; ``matvecs`` counts columns (``k`` per call).
    """
    matmat = as_matmat(operator, dim)
    _check_wanted(top, bottom, tol, dim)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device, in_dtype = operator_placement(operator, device, dtype)
    limit = _steps(dim, top + bottom, max_iter)
    basis = _first_block(dim, block_size, start, generator, device)  # [n, k]
    products = torch.empty(dim, 0, dtype=torch.float64, device=device)  # [n, m]
    while True:
        fresh = basis[:, products.shape[1] :]  # [n, k]
        applied = matmat(fresh.to(in_dtype)).detach().to(torch.float64)  # [n, k]
        products = torch.cat([products, applied], dim=1)
        pairs = _rayleigh_ritz(basis, products, top, bottom)
        values, vectors, residuals = pairs
        scale = max(float(values.abs().max()), np.finfo(np.float64).tiny)
        converged = len(values) == top + bottom and bool((residuals <= tol * scale).all())
        nxt = _orthonormal_extension(basis, applied)  # [n, <=k]
        if converged or nxt.shape[1] == 0 or basis.shape[1] >= limit:
            break
        basis = torch.cat([basis, nxt[:, : max(0, limit - basis.shape[1])]], dim=1)
    return Eigenpairs(values.cpu(), vectors, residuals.cpu(), products.shape[1], converged)


def _first_block(
    dim: int, k: int, start: Tensor | None, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    columns = [_start(dim, None, generator, device) for _ in range(k)]
    if start is not None:
        guess = start.detach().to(device=device, dtype=torch.float64).reshape(dim, -1)
        columns = [*guess.T[:k], *columns][:k]
    q, _ = torch.linalg.qr(torch.stack(columns, dim=1))  # [n, k]
    return q


def _orthonormal_extension(basis: Tensor, applied: Tensor) -> Tensor:
    """Columns of ``applied`` orthogonalised against ``basis`` (twice), orthonormal; the
    directions that vanish (an invariant subspace) are dropped."""
    w = applied
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    q, r = torch.linalg.qr(w)  # [n, k]
    keep = r.diagonal().abs() > 1e-10 * max(float(applied.abs().max()), 1e-300)
    return q[:, keep]


def _rayleigh_ritz(
    basis: Tensor, products: Tensor, top: int, bottom: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Wanted Ritz values ``[w]``, vectors ``[n, w]`` and exact residual norms ``[w]``."""
    m = products.shape[1]
    q = basis[:, :m]
    t = q.T @ products  # [m, m]
    theta, s = torch.linalg.eigh((t + t.T) / 2)  # ascending
    wanted = list(range(m - 1, m - 1 - min(top, m), -1))
    wanted += [i for i in range(min(bottom, m)) if i not in wanted]
    theta, s = theta[wanted], s[:, wanted]
    vectors = q @ s  # [n, w]
    residuals = torch.linalg.vector_norm(products @ s - vectors * theta, dim=0)  # [w]
    return theta, vectors, residuals


def diagonal_block_eigenpairs(
    operator: Operator,
    dim: int,
    blocks: Sequence[slice],
    *,
    top: int = 1,
    bottom: int = 0,
    tol: float = 1e-8,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[Eigenpairs]:
    """Extreme eigenpairs of each diagonal block ``A[b, b]`` (e.g. per-layer Hessians).

    One Lanczos process per block (see :func:`.lanczos`), in lockstep: every step
    applies ``A`` once, as a ``matmat`` over the still-running blocks, column ``b``
    being block ``b``'s Lanczos vector in rows ``b`` and zero elsewhere; rows ``b``
    of the result are ``A[b, b] q_b``. A block smaller than ``top + bottom`` gets
    all its eigenvalues.

    Args:
        blocks: disjoint row ranges (``slice(start, stop)``) of ``[0, dim)``.
        others: as :func:`.lanczos`.

    Returns:
        one :class:`~.lanczos.Eigenpairs` per block (vectors ``[n_b, k]``); each
        ``matvecs`` counts the products spent on that block.
    """
    matmat = as_matmat(operator, dim)
    device, in_dtype = operator_placement(operator, device, dtype)
    spans = [range(dim)[b] for b in blocks]
    if any(len(r) == 0 or r.step != 1 for r in spans):
        raise ValueError("blocks must be non-empty slices with step 1 inside [0, dim)")
    processes = []
    for r in spans:
        wanted = min(top, len(r)), min(bottom, max(0, len(r) - min(top, len(r))))
        _check_wanted(*wanted, tol, len(r))
        first = _start(len(r), None, generator, device)
        steps = _steps(len(r), sum(wanted), max_iter)
        processes.append(_Krylov(len(r), steps, first, top=wanted[0], bottom=wanted[1], tol=tol))
    while running := [i for i, p in enumerate(processes) if not p.finished]:
        padded = torch.zeros(dim, len(running), dtype=torch.float64, device=device)  # [n, L]
        for col, i in enumerate(running):
            padded[spans[i].start : spans[i].stop, col] = processes[i].vector
        applied = matmat(padded.to(in_dtype)).detach().to(torch.float64)  # [n, L]
        for col, i in enumerate(running):
            processes[i].absorb(applied[spans[i].start : spans[i].stop, col])
    return [p.result("diagonal_block_eigenpairs") for p in processes]
