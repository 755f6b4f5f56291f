"""The spectral norm ``||A||_2 = σ_1`` by warm-started power iteration on ``AᵀA``.

Meant to be called again and again on a slowly changing matrix (a weight during
training): each call runs a few iterations from the vector the previous call
returned, so the work of converging is spread over calls (as spectral
normalisation does, Miyato et al. 2018). A fixed number of iterations and no
stopping test: nothing is read on the host (no sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .matrix import check_int, check_matrix, compute_dtype
from .svd import gaussian_matrix


@dataclass(frozen=True)
class SpectralNorm:
    """One :func:`spectral_norm` estimate.

    Attributes:
        value: 0-d ``σ̂ = ||A v||``, ``v`` the last unit iterate: never above ``||A||_2``.
        vector: ``[cols]`` unit: the next power iterate ``AᵀA v / ||AᵀA v||``, to pass
            as ``start`` to the next call.
        residual: 0-d ``||AᵀA v − σ̂² v||``: some eigenvalue ``λ = σ_j²`` of ``AᵀA``
            lies within it of ``σ̂²`` (see :func:`spectral_norm`).
        iters: power iterations run (each two matrix-vector products).
    """

    value: Tensor
    vector: Tensor
    residual: Tensor
    iters: int


def spectral_norm(
    matrix: Tensor,
    *,
    start: Tensor | None = None,
    iters: int = 4,
    generator: torch.Generator | None = None,
) -> SpectralNorm:
    """``σ_1(A)`` by ``iters`` steps of power iteration on ``AᵀA``.

    ``v ← AᵀA v / ||AᵀA v||``; the estimate is ``σ̂ = ||A v|| = sqrt(vᵀ AᵀA v)``.

    Bounds (Golub & Van Loan, *Matrix Computations*, 4th ed., §8.2.1; Parlett, *The
    Symmetric Eigenvalue Problem*, §4.5):

    - ``σ̂ <= ||A||_2`` always (a Rayleigh quotient of ``AᵀA``), and with ``φ`` the
      angle between ``v`` and the top right singular vector,
      ``σ̂ >= σ_1 cos φ``, so ``1 − σ̂/σ_1 <= sin² φ``; ``tan φ`` shrinks by
      ``(σ_2/σ_1)²`` per iteration.
    - the residual ``r = ||AᵀA v − σ̂² v||`` certifies that some ``σ_j`` has
      ``|σ_j² − σ̂²| <= r``; it is ``σ_1`` once ``v`` leans towards the top vector,
      which a warm start from the previous call's vector keeps true.

    Args:
        matrix: ``[rows, cols]`` floating tensor.
        start: ``[cols]`` nonzero warm start (normalised here), usually the previous
            call's ``vector``; default a Gaussian vector from ``generator``.
        iters: power iterations, ``>= 1``.
        generator: randomness for the default start; default
            ``torch.Generator(device=matrix.device).manual_seed(0)`` (never the global RNG).

    Returns:
        :class:`SpectralNorm` (float32, or float64 for float64 input).

    Raises:
        TypeError: ``matrix`` is not a floating tensor or ``iters`` not an int.
        ValueError: ``matrix`` is not 2-D, ``start`` is not ``[cols]``, ``iters < 1``.
    """
    check_matrix(matrix, "spectral_norm")
    check_int("spectral_norm(iters=...)", iters, 1)
    a = matrix.detach().to(compute_dtype(matrix))  # [rows, cols]
    v = _start(a, start, generator)  # [cols]
    for i in range(iters):
        w = a @ v  # [rows]
        z = a.T @ w  # [cols]  AᵀA v
        if i < iters - 1:
            v = _unit(z, v)
    theta = w @ w  # σ̂² = vᵀ AᵀA v
    residual = torch.linalg.vector_norm(z - theta * v)
    return SpectralNorm(theta.sqrt(), _unit(z, v), residual, iters)


def _start(a: Tensor, start: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """Unit ``[cols]`` start vector on ``a``'s device and dtype."""
    cols = a.shape[1]
    if start is None:
        start = gaussian_matrix(cols, 1, a, generator).reshape(cols)  # [cols]
    elif not isinstance(start, Tensor) or tuple(start.shape) != (cols,):
        shape = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(
            f"spectral_norm: start must be a [{cols}] vector (the previous call's "
            f".vector for a {tuple(a.shape)} matrix), got {shape}"
        )
    v = start.detach().to(device=a.device, dtype=a.dtype)
    return v / torch.linalg.vector_norm(v)


def _unit(z: Tensor, fallback: Tensor) -> Tensor:
    """``z / ||z||``, or ``fallback`` where ``z = 0`` (a zero matrix), without a sync."""
    norm = torch.linalg.vector_norm(z)
    return torch.where(norm > 0, z / norm, fallback)
