"""Singular values of a matrix: exact when small, randomized (Halko et al. 2011) when large.

Large gradient or weight matrices (``min(rows, cols)`` in the thousands) make a full
SVD at every measurement expensive; their top singular values come far cheaper from a
randomized range finder. Randomness only from an explicit ``torch.Generator`` (a fresh
one seeded 0 when none is given): the global RNG is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .matrix import check_int, check_matrix, compute_dtype

EXACT_MAX = 256
"""Default size threshold: matrices with ``min(rows, cols) <= EXACT_MAX`` get an exact SVD."""


@dataclass(frozen=True)
class Spectrum:
    """Singular values of one matrix and its exact Frobenius norm.

    Attributes:
        sigma: ``[m]`` descending, float32 (float64 for float64 input): all
            ``min(rows, cols)`` singular values when ``complete``, else estimates of
            the top ``m`` (each a slight underestimate, see :func:`randomized_svdvals`).
        frobenius: 0-d ``||A||_F`` computed from the entries, exact whatever
            ``sigma`` holds (``||A||_F² = Σ_i σ_i²`` over the *whole* spectrum).
        complete: whether ``sigma`` is the whole spectrum (exact SVD).
    """

    sigma: Tensor
    frobenius: Tensor
    complete: bool


def spectrum(
    matrix: Tensor,
    *,
    top: int = 1,
    exact_max: int = EXACT_MAX,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> Spectrum:
    """The spectrum of ``matrix``: exact when small, the top ``top`` values when large.

    Exact (``torch.linalg.svdvals``, all ``min(rows, cols)`` values) when
    ``min(rows, cols) <= exact_max`` or when the sketch would not be smaller than
    the matrix (``top + oversample >= min(rows, cols)``); otherwise
    :func:`randomized_svdvals` for the top ``top``. On a CUDA device both end in a
    LAPACK-style solver that synchronises the device with the host once (torch
    documents this for ``svdvals``).

    Args:
        matrix: ``[rows, cols]`` floating tensor (see :func:`~.matrix.as_matrix`).
        top: how many of the largest singular values the randomized path returns.
        exact_max: size threshold for the exact path.
        oversample: extra sketch columns ``p`` of the randomized path.
        power_iters: power iterations ``q`` of the randomized path.
        generator: randomness of the randomized path.

    Returns:
        :class:`Spectrum` (computed in float32, or float64 for float64 input).

    Raises:
        TypeError: ``matrix`` is not a floating tensor, or an option is not an int.
        ValueError: ``matrix`` is not 2-D, or an option is out of range.
    """
    check_matrix(matrix, "spectrum")
    check_int("spectrum(top=...)", top, 1)
    check_int("spectrum(exact_max=...)", exact_max, 1)
    check_int("spectrum(oversample=...)", oversample, 0)
    check_int("spectrum(power_iters=...)", power_iters, 0)
    a = matrix.detach().to(compute_dtype(matrix))  # [rows, cols]
    frobenius = torch.linalg.matrix_norm(a)  # exact, from the entries
    small = min(a.shape)
    if small <= exact_max or top + oversample >= small:
        return Spectrum(torch.linalg.svdvals(a), frobenius, complete=True)
    sigma = randomized_svdvals(
        a, top, oversample=oversample, power_iters=power_iters, generator=generator
    )
    return Spectrum(sigma, frobenius, complete=False)


def randomized_svdvals(
    matrix: Tensor,
    k: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Top-``k`` singular values by randomized subspace iteration (Halko, Martinsson &
    Tropp 2011, "Finding structure with randomness", SIAM Review 53(2), Alg. 4.4 and 5.1).

    With ``l = k + p`` Gaussian test vectors ``Ω [cols, l]``:
    ``Q = qr(A Ω)``, then ``q`` times ``Q = qr(A · qr(Aᵀ Q))`` (re-orthonormalised
    at every half step, HMT Alg. 4.4, so rounding does not collapse the basis onto
    the top singular vector), and ``σ̂ = svdvals(Qᵀ A)[:k]``.

    Error: ``σ̂_i = σ_i(Q Qᵀ A)``, so ``0 <= σ_i − σ̂_i <= ||(I − Q Qᵀ) A||``
    (projection, then Weyl's inequality): every estimate is low, by at most the
    range finder's error, whose mean for ``p >= 2`` is at most (HMT Cor. 10.10)
    ``[C_1 σ_{k+1}^{2q+1} + C_2 (Σ_{j>k} σ_j^{2(2q+1)})^{1/2}]^{1/(2q+1)}`` with
    ``C_1 = 1 + sqrt(k/(p−1))``, ``C_2 = e sqrt(k+p) / p``: a small multiple of
    ``σ_{k+1}`` that the power iterations push towards it. On decaying spectra the
    top values are accurate to many digits; on flat spectra (``σ_{k+1} ≈ σ_1``) they
    can be low by tens of percent.

    Args:
        matrix: ``[rows, cols]`` floating tensor.
        k: how many singular values, ``1 <= k <= min(rows, cols)``.
        oversample: ``p``, extra test vectors (HMT recommend 5-10); ``l`` is capped at
            ``min(rows, cols)``, where the result is exact up to rounding.
        power_iters: ``q``; each costs two more products with ``A`` and sharpens the
            decay seen by the sketch from ``σ_j`` to ``σ_j^{2q+1}``.
        generator: draws ``Ω`` on its own device (then moved to ``matrix``'s);
            default ``torch.Generator(device=matrix.device).manual_seed(0)``.

    Returns:
        ``[k]`` descending, float32 (float64 for float64 input).

    Raises:
        TypeError: ``matrix`` is not a floating tensor, an option is not an int, or
            ``generator`` is not a ``torch.Generator``.
        ValueError: ``matrix`` is not 2-D, ``k`` is out of range, ``oversample`` or
            ``power_iters`` negative.
    """
    check_matrix(matrix, "randomized_svdvals")
    small = min(matrix.shape)
    check_int("randomized_svdvals: k", k, 1)
    if k > small:
        raise ValueError(
            f"randomized_svdvals: k={k} exceeds min(rows, cols)={small} of a "
            f"{tuple(matrix.shape)} matrix; ask for at most {small} values"
        )
    check_int("randomized_svdvals(oversample=...)", oversample, 0)
    check_int("randomized_svdvals(power_iters=...)", power_iters, 0)
    a = matrix.detach().to(compute_dtype(matrix))  # [rows, cols]
    omega = gaussian_matrix(a.shape[1], min(k + oversample, small), a, generator)  # [cols, l]
    q = torch.linalg.qr(a @ omega).Q  # [rows, l]
    for _ in range(power_iters):
        z = torch.linalg.qr(a.T @ q).Q  # [cols, l]
        q = torch.linalg.qr(a @ z).Q  # [rows, l]
    return torch.linalg.svdvals(q.T @ a)[:k]  # [l, cols] -> [k]


def gaussian_matrix(
    rows: int, cols: int, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``[rows, cols]`` standard normal test matrix in ``like``'s dtype and device."""
    if generator is None:
        generator = torch.Generator(device=like.device).manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator, e.g. torch.Generator().manual_seed(0), "
            f"got {type(generator).__name__}"
        )
    draw = torch.randn(rows, cols, generator=generator, device=generator.device, dtype=like.dtype)
    return draw.to(like.device)  # [rows, cols]
