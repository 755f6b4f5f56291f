"""Scalar summaries of a spectrum: stable rank, effective rank, energy in the top ``r``.

All take singular values ``σ`` (descending, ``σ_i >= 0``) and, where the whole
spectrum's mass is needed, the exact Frobenius norm ``||A||_F = sqrt(Σ_i σ_i²)``,
cheap to compute from the entries and exact even when only the top ``σ`` are known.
They batch over leading dimensions and never read values on the host (no sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .matrix import check_int


def stable_rank(frobenius: Tensor, spectral: Tensor) -> Tensor:
    """``srank(A) = ||A||_F² / ||A||_2² = Σ_i σ_i² / σ_1²``.

    The numerical (stable) rank of Rudelson & Vershynin 2007 ("Sampling from large
    matrices", J. ACM 54(4)): in ``[1, rank(A)]``, insensitive to tiny singular
    values, unlike the rank. NaN for a zero matrix (``0/0``). With ``spectral`` a
    lower bound of ``||A||_2`` (power iteration, randomized SVD) the result is an
    upper bound of the stable rank.

    Args:
        frobenius: ``[...]`` exact ``||A||_F`` (from the entries, not from truncated σ).
        spectral: ``[...]`` ``||A||_2 = σ_1``.

    Returns:
        ``[...]``.
    """
    return (frobenius / spectral) ** 2


def effective_rank(sigma: Tensor) -> Tensor:
    """``erank = exp(H(p))``, ``p_i = σ_i / Σ_j σ_j``, ``H(p) = −Σ_i p_i log p_i``.

    Roy & Vetterli 2007 ("The effective rank: a measure of effective
    dimensionality", EUSIPCO): the singular values normalised by their *sum* (the
    nuclear norm, ``ℓ1``), not the energies ``σ_i² / Σ σ_j²``, which weight the top
    directions more and give smaller values. ``0 log 0 = 0``; in ``[1, m]`` for
    ``m`` values: 1 for rank one, ``m`` for a flat spectrum. NaN when every ``σ`` is 0.

    Given only the top ``m`` of a longer spectrum, this is the effective rank of the
    renormalised top part and a *lower bound* of the whole matrix's: the
    renormalised truncation majorizes the full distribution (its partial sums
    ``Σ_{i<=j} p_i / Σ_{i<=m} p_i`` are larger) and entropy is Schur-concave.

    Args:
        sigma: ``[..., m]`` singular values, ``m >= 1``.

    Returns:
        ``[...]``.

    Raises:
        ValueError: ``sigma`` is 0-D or has no values.
    """
    if sigma.ndim == 0 or sigma.shape[-1] == 0:
        raise ValueError(
            f"effective_rank takes [..., m] singular values with m >= 1, got shape "
            f"{tuple(sigma.shape)}"
        )
    p = sigma / sigma.sum(dim=-1, keepdim=True)  # [..., m]
    return torch.exp(-torch.special.xlogy(p, p).sum(dim=-1))


def energy_fraction(sigma: Tensor, frobenius: Tensor, r: int) -> Tensor:
    """Share of the squared Frobenius norm in the top ``r`` directions:
    ``Σ_{i<r} σ_i² / ||A||_F²`` (the squared relative accuracy of the best rank-``r``
    approximation is ``1 −`` this, Eckart & Young 1936).

    ``r`` larger than the number of values given uses all of them: 1 for a whole
    spectrum, a lower bound for a truncated one. NaN for a zero matrix.

    Args:
        sigma: ``[..., m]`` singular values, descending.
        frobenius: ``[...]`` exact ``||A||_F``.
        r: how many top directions, ``>= 1``.

    Returns:
        ``[...]`` in ``[0, 1]`` (up to rounding).

    Raises:
        TypeError: ``r`` is not an int.
        ValueError: ``r < 1``.
    """
    check_int("energy_fraction: r", r, 1)
    top = sigma[..., :r]  # [..., min(r, m)]
    return (top * top).sum(dim=-1) / (frobenius * frobenius)
