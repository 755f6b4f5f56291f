"""Pairwise geometry of group gradients, all from their Gram matrices ``K = g gᵀ``.

Every quantity here depends on the ``[G, P]`` gradients only through inner products, so
each is computed from ``K [G, G]`` (or the per-layer ``[L, G, G]``) in float64: nothing
of size ``P`` beyond the one Gram product, whatever ``G``.

- cosine ``cos φ_ij = K_ij / (‖g_i‖ ‖g_j‖)``; two gradients *conflict* when
  ``cos φ_ij < 0`` (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Def. 1);
- gradient magnitude similarity ``2 ‖g_i‖ ‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` in ``[0, 1]``
  (ibid., Def. 2; 1 for equal norms, near 0 when one dominates);
- the PCGrad shift: how far PCGrad's surgery (ibid., Alg. 1) would move the combined
  update, ``‖Σ_i g_i^PC − Σ_i g_i‖ / ‖Σ_i g_i‖``;
- projection shares ``⟨c_i, Σ_j c_j⟩ / ‖Σ_j c_j‖²`` of contributions ``c_i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import ParamLayout


def layer_grams(grads: Tensor, layout: ParamLayout) -> Tensor:
    """``[L, G, G]`` Gram matrix of each parameter tensor's block of ``grads [G, P]``.

    Their sum over ``L`` is the full Gram matrix ``K = g gᵀ``.
    """
    if grads.ndim != 2 or grads.shape[1] != layout.size:
        raise ValueError(
            f"grads must be [G, {layout.size}] (one row per group, laid out by the layout), "
            f"got {tuple(grads.shape)}"
        )
    blocks = torch.split(grads.to(torch.float64), layout.numels, dim=1)  # L x [G, p_l]
    return torch.stack([b @ b.T for b in blocks])  # [L, G, G]


def cosines(gram: Tensor) -> Tensor:
    """``[..., G, G]`` cosines ``K_ij / sqrt(K_ii K_jj)`` (NaN where a gradient is zero)."""
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()  # [..., G]
    return gram / (norms[..., :, None] * norms[..., None, :])


def magnitude_similarity(gram: Tensor) -> Tensor:
    """``[G, G]`` ``2 ‖g_i‖ ‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` (Yu et al. 2020; NaN if both zero)."""
    sq = torch.diagonal(gram).clamp(min=0)  # [G] squared norms
    return 2 * torch.sqrt(sq[:, None] * sq[None, :]) / (sq[:, None] + sq[None, :])


def projection_shares(gram: Tensor) -> Tensor:
    """``[G]`` ``⟨c_i, C⟩ / ‖C‖²`` with ``C = Σ_j c_j``, from the contributions' Gram matrix.

    The shares sum to 1: the part of the combined update each group pulls along its
    direction; a negative share is a group whose gradient opposes the update.
    """
    return gram.sum(dim=1) / gram.sum()


def pcgrad_shift(gram: Tensor) -> Tensor:
    """``‖Σ_i c_i^PC − Σ_i c_i‖ / ‖Σ_i c_i‖``: how far PCGrad would move the update (0-d).

    PCGrad (Yu et al. 2020, Alg. 1) replaces each ``c_i`` by ``c_i^PC``: starting from
    ``c_i`` and for each ``j ≠ i``, if ``⟨c_i^PC, c_j⟩ < 0``, subtract the projection
    ``⟨c_i^PC, c_j⟩ / ‖c_j‖² · c_j``. The paper visits the ``j`` in random order; here in
    ascending order (deterministic; for two groups the order does not matter). Run in
    coefficient space, ``c^PC = A c`` with ``A [G, G]``, so only ``K`` is needed.
    0 when no pair conflicts.
    """
    count = gram.shape[0]
    coef = torch.eye(count, dtype=gram.dtype, device=gram.device)  # [G, G] A
    others = torch.arange(count, device=gram.device)
    for j in range(count):
        dots = coef @ gram[:, j]  # [G] ⟨c_i^PC, c_j⟩ for every i
        step = torch.where((dots < 0) & (others != j), dots / gram[j, j], 0.0)  # [G]
        coef[:, j] -= step
    moved = coef.sum(dim=0) - 1  # [G] coefficients of Σ c^PC − Σ c
    return torch.sqrt((moved @ gram @ moved) / gram.sum())
