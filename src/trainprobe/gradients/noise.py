"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A) with unbiased estimators, per parameter tensor.

Let the per-example gradients be i.i.d. with mean ``G`` and covariance ``Σ``. A gradient
averaged over ``b`` examples has ``E‖g_b‖² = ‖G‖² + tr(Σ)/b``. Given ``K`` disjoint
pieces of the batch of sizes ``b_k`` (``Σ b_k = B``) with mean gradients ``g_k``, and the
batch gradient ``g_B = Σ_k (b_k/B) g_k``:

    E[mean_k ‖g_k‖²] = ‖G‖² + tr(Σ) · mean_k(1/b_k),      E‖g_B‖² = ‖G‖² + tr(Σ)/B,

two linear equations in ``‖G‖²`` and ``tr(Σ)``. Solving them with the observed values
gives estimators that are unbiased (both sides are linear in the observations):

    S   = (mean_k ‖g_k‖² − ‖g_B‖²) / (mean_k(1/b_k) − 1/B)      estimates tr(Σ),
    |G|² = ‖g_B‖² − S / B                                          estimates ‖G‖².

Per-example pieces (``b_k = 1``, ``K = B``, ``ḡ = g_B``) give the textbook forms
``S = B/(B−1) · (mean_i ‖g_i‖² − ‖ḡ‖²)`` (the sample variance, summed over coordinates)
and ``|G|² = (B ‖ḡ‖² − mean_i ‖g_i‖²) / (B − 1)``; equal micro-batches of size ``b``
give McCandlish's two-batch-size estimator (A.1) with ``B_small = b``, ``B_big = B``.

``B_simple = tr(Σ) / ‖G‖²`` is estimated by ``S / |G|²``: a ratio of unbiased estimates,
itself biased for a single batch; average ``S`` and ``|G|²`` over steps before dividing
(as McCandlish et al. do with moving averages) for an unbiased ratio in the limit.
Everything is computed per parameter tensor ``l`` and summed, since both squared norms
and traces add over disjoint coordinates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..functional import Objective, ParamLayout, SplitBatch, check_objective
from .groups import microbatch_gradients
from .persample import Method, for_each_chunk


@dataclass(frozen=True)
class NoiseScale:
    """Unbiased per-layer estimates of the gradient's signal and noise (module doc).

    Attributes:
        names: the parameter tensors ``l``, in layout order.
        trace_cov: ``[L]`` float64 ``S_l``, estimates ``tr(Σ_l)`` (per-example noise).
        grad_sq: ``[L]`` float64 ``|G_l|²``, estimates ``‖G_l‖²`` (may be negative when the
            signal is below the noise of one batch).
        batch_size: ``B``.
    """

    names: tuple[str, ...]
    trace_cov: Tensor
    grad_sq: Tensor
    batch_size: int

    @property
    def b_simple(self) -> Tensor:
        """``Σ_l S_l / Σ_l |G_l|²`` (0-d): the critical batch size estimate ``B_simple``."""
        return self.trace_cov.sum() / self.grad_sq.sum()

    @property
    def snr(self) -> Tensor:
        """``[L]`` ``|G_l|² / (S_l / B)``: squared signal over the noise variance of the
        batch-mean gradient of tensor ``l`` (``= B / B_simple,l``). Near 0 (possibly
        negative) for pure noise; the plug-in ``‖ḡ_l‖² / (S_l / B)`` is this plus 1 in
        expectation."""
        return self.grad_sq * self.batch_size / self.trace_cov


def layer_sq_norms(vectors: Tensor, layout: ParamLayout) -> Tensor:
    """``[K, L]`` float64 squared norm of each parameter tensor's block of ``[K, P]`` rows."""
    blocks = torch.split(vectors, layout.numels, dim=-1)  # L x [K, p_l]
    return torch.stack(
        [torch.linalg.vector_norm(b, dim=-1, dtype=torch.float64) ** 2 for b in blocks], dim=-1
    )


def noise_scale(
    piece_sq: Tensor, sizes: Tensor, batch_sq: Tensor, *, names: tuple[str, ...]
) -> NoiseScale:
    """The estimators of the module doc from squared norms.

    Args:
        piece_sq: ``[K, L]`` ``‖g_{k,l}‖²`` of each piece's mean gradient.
        sizes: ``[K]`` examples ``b_k`` per piece.
        batch_sq: ``[L]`` ``‖g_{B,l}‖²`` of the batch gradient.
        names: the ``L`` parameter tensor names.

    Raises:
        ValueError: fewer than two pieces, or shapes that disagree.
    """
    if piece_sq.ndim != 2 or piece_sq.shape[0] < 2:
        raise ValueError(
            f"piece_sq must be [K, L] with K >= 2 pieces (one piece carries no noise "
            f"estimate), got {tuple(piece_sq.shape)}; split the batch into more pieces"
        )
    count, layers = piece_sq.shape
    if sizes.shape != (count,) or batch_sq.shape != (layers,) or len(names) != layers:
        raise ValueError(
            f"shapes disagree: piece_sq {tuple(piece_sq.shape)}, sizes {tuple(sizes.shape)}, "
            f"batch_sq {tuple(batch_sq.shape)}, {len(names)} names; expected [K], [L], L"
        )
    sizes = sizes.to(device=piece_sq.device, dtype=torch.float64)
    return _estimate(
        piece_sq.to(torch.float64).mean(dim=0), (1 / sizes).mean(), sizes.sum(), batch_sq, names
    )


def _estimate(
    mean_sq: Tensor, mean_inverse: Tensor, total: Tensor, batch_sq: Tensor, names: tuple[str, ...]
) -> NoiseScale:
    """The estimators from ``mean_k ‖g_{k,l}‖²`` ``[L]``, ``mean_k 1/b_k``, ``B`` and
    ``‖g_{B,l}‖²`` ``[L]``."""
    spread = mean_inverse - 1 / total  # mean_k(1/b_k) − 1/B > 0 for K >= 2
    trace_cov = (mean_sq - batch_sq.to(torch.float64)) / spread  # [L]
    grad_sq = batch_sq.to(torch.float64) - trace_cov / total  # [L]
    batch_size = round(float(total))  # deliberate sync: the example count, once per call
    return NoiseScale(names, trace_cov, grad_sq, batch_size)


def _pooled(
    piece_sq: Tensor,
    sizes: Tensor,
    weighted: Tensor,
    layout: ParamLayout,
    reduce: Callable[[Tensor], Tensor] | None,
) -> NoiseScale:
    """The estimate over the pieces of every process: ``piece_sq [K, L]``, ``sizes [K]``
    and ``weighted [P] = Σ_k b_k g_k`` are this process's; ``reduce`` sums a tensor over
    processes (one call), or None for this process alone."""
    sizes = sizes.to(device=piece_sq.device, dtype=torch.float64)
    layers = piece_sq.shape[1]
    local = torch.cat(
        [
            piece_sq.to(torch.float64).sum(dim=0),  # [L] Σ_k ‖g_k‖²
            weighted.to(torch.float64),  # [P] Σ_k b_k g_k
            torch.stack([(1 / sizes).sum(), sizes.sum(), torch.ones_like(sizes).sum()]),
        ]
    )
    pooled = local if reduce is None else reduce(local)
    sum_sq, weighted, (inverse, total, count) = pooled[:layers], pooled[layers:-3], pooled[-3:]
    if reduce is None and piece_sq.shape[0] < 2:
        raise ValueError("one piece carries no noise estimate; split the batch into more")
    mean = weighted / total  # [P] the (global) batch gradient
    batch_sq = layer_sq_norms(mean[None], layout)[0]  # [L]
    return _estimate(sum_sq / count, inverse / count, total, batch_sq, layout.names)


def per_sample_noise(
    objective: Objective,
    batch: Any,
    *,
    method: Method = "vmap",
    max_memory: int | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[NoiseScale, str]:
    """:class:`NoiseScale` from per-example gradients, never holding ``[B, P]``.

    Chunks of per-example gradients (see :func:`~.persample.per_sample_gradients` for
    the arguments) are reduced to ``[B, L]`` squared norms and a running ``[P]`` sum.
    Returns the estimate and the per-example method that ran (``"vmap"`` or ``"loop"``).

    ``reduce``: sums a tensor over processes (data-parallel ranks, each with its share of
    the global batch): the estimate is then the global batch's, exactly as one process
    holding every example would compute it (one call of ``P + L + 3`` floats).
    """
    fl = check_objective(objective)
    split = SplitBatch.of(batch)
    layers = len(fl.layout.names)
    squares = torch.empty(split.size, layers, dtype=torch.float64, device=fl.device)  # [B, L]
    total = torch.zeros(fl.layout.size, dtype=torch.float64, device=fl.device)  # [P]

    def accumulate(start: int, grads: Tensor, values: Tensor) -> None:
        squares[start : start + grads.shape[0]] = layer_sq_norms(grads, fl.layout)
        total.add_(grads.sum(dim=0, dtype=torch.float64))

    used, _ = for_each_chunk(
        fl, split, accumulate, method=method, chunk_size=None, max_memory=max_memory
    )
    sizes = torch.ones(split.size, dtype=torch.float64)
    return _pooled(squares, sizes, total, fl.layout, reduce), used


def microbatch_noise(
    objective: Objective,
    batch: Any,
    microbatches: int,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> NoiseScale:
    """:class:`NoiseScale` from ``microbatches`` consecutive micro-batch gradients
    (:func:`~.groups.microbatch_gradients`): ``m`` backward passes, any model.
    ``reduce``: as in :func:`per_sample_noise` (every process's micro-batches pooled)."""
    groups = microbatch_gradients(objective, batch, microbatches)
    if len(groups.ids) < 2:
        raise ValueError(
            f"microbatches={microbatches} gives one piece, which carries no noise estimate; "
            "pass microbatches >= 2"
        )
    piece_sq = layer_sq_norms(groups.grads, groups.layout)  # [m, L]
    counts = groups.counts.to(groups.grads.device, torch.float64)
    weighted = counts @ groups.grads.to(torch.float64)  # [P] Σ_k b_k g_k
    return _pooled(piece_sq, counts, weighted, groups.layout, reduce)
