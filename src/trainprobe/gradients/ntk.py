"""The empirical neural tangent kernel on a fixed set of examples, and its alignment with
the labels (pure maths: no hooks, no state).

For a model with outputs ``z(x) ∈ R^C`` and a projection ``v ∈ R^C``, the scalar output
``f_v(x) = vᵀ z(x)`` has per-example gradients (the rows of its Jacobian)
``J_v[i] = ∇_w f_v(x_i)``, ``[n, P]``, and the empirical NTK (Jacot, Gabriel & Hongler
2018, "Neural Tangent Kernel") of ``k`` projections ``V = [v_1 … v_k]`` is

    ``K = Σ_j J_{v_j} J_{v_j}ᵀ``      ``[n, n]``.

``V = I_C`` gives the trace of the ``[nC, nC]`` output kernel over its output blocks,
``K_ii' = Σ_c ⟨∇z_c(x_i), ∇z_c(x_i')⟩`` (label-free, invariant to relabelling the
classes); ``k`` Rademacher columns scaled by ``1/√k`` give an unbiased estimate of it
(``E[v vᵀ] = I``) at ``k`` instead of ``C`` passes. Each ``J_v`` holds the per-example
gradients of the "loss" ``f_v`` (:mod:`~.persample`: the same methods, chunking and
BatchNorm rules apply); :func:`tangent_kernel` takes them by blocks of rows within a memory
budget, so ``n`` is bounded by ``max_memory`` (the kernel alone is ``8 n²`` bytes), never
by a fixed cap.

Centered kernel-target alignment (Cortes, Mohri & Rostamizadeh 2012, "Algorithms for
Learning Kernels Based on Centered Alignment"), with ``H = I − 11ᵀ/n``:

    ``A(K, T) = ⟨HKH, HTH⟩_F / (‖HKH‖_F ‖HTH‖_F)``   in ``[−1, 1]``,

against the label kernel ``T = Y Yᵀ`` (``Y`` one-hot for class labels, the targets for
real-valued ones). :func:`label_directions` picks the eigenvectors of ``K`` that carry the
labels (Pezeshki et al. 2021's feature directions).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import Objective, SplitBatch, check_objective
from .persample import (
    DEFAULT_MAX_MEMORY,
    Consume,
    Method,
    PerSampleGradients,
    for_each_chunk,
    per_sample_gradients,
)


def output_gradients(
    network: Objective,
    inputs: Any,
    direction: Tensor,
    *,
    method: Method = "vmap",
    max_memory: int | None = None,
) -> PerSampleGradients:
    """Rows ``∇_w f_v(x_i)`` ``[n, P]`` of ``f_v(x) = vᵀ z(x)`` (``losses``: ``f_v(x_i)``).

    Args:
        network: the model's outputs as a function of the selected parameters,
            :func:`trainprobe.functional.network` (``model(inputs)``, flattened per
            example, is ``z`` ``[n, C]``; a ``[n]`` output is ``C = 1``).
        inputs: anything the model takes; tensors of leading size ``n`` are split.
        direction: ``v`` ``[C]``.
        method, max_memory: as in :func:`~.persample.per_sample_gradients` (the returned
            ``[n, P]`` comes on top of ``max_memory``; :func:`tangent_kernel` never holds it).

    Raises:
        ValueError: ``direction`` does not match the model's ``C`` outputs.
    """
    projected = _projected(network, direction)
    return per_sample_gradients(projected, inputs, method=method, max_memory=max_memory)


def _projected(network: Objective, direction: Tensor) -> Objective:
    """The objective whose per-example "loss" is ``f_v(x_i) = vᵀ z(x_i)``."""

    def scalar(net: nn.Module, rows: Any) -> Tensor:
        out = network.loss_fn(net, rows)  # [1, ...] for a one-example batch
        flat = out.reshape(out.shape[0], -1)  # [1, C]
        if flat.shape[1] != direction.shape[0]:
            raise ValueError(
                f"the output projection has {direction.shape[0]} entries but the model gives "
                f"{flat.shape[1]} outputs per example; pass one weight per output"
            )
        return (flat @ direction.to(flat)).sum()

    return check_objective(network).with_loss(scalar)


def tangent_kernel(
    network: Objective,
    inputs: Any,
    projections: Tensor,
    *,
    method: Method = "vmap",
    max_memory: int | None = None,
) -> tuple[Tensor, str]:
    """``K = Σ_j J_{v_j} J_{v_j}ᵀ`` ``[n, n]`` in float64 (module doc), and the method used.

    Computed by blocks within ``max_memory`` bytes (see :func:`kernel_blocks`): the rows
    ``J[a]`` of ``h`` examples are held while the later examples' rows stream past in
    chunks of ``s``, adding ``J[a] J[b]ᵀ`` to ``K[a, b]`` and ``K[b, a]``. When the whole
    ``[n, P]`` Jacobian fits (``h = n``) each example's gradient is taken once; otherwise
    about ``n (⌈n/h⌉ + 1) / 2`` per-example gradients per projection (under ``mode="train"``
    a dropout mask is drawn afresh each time an example's gradient is retaken).

    Args:
        network, inputs: as in :func:`output_gradients`.
        projections: ``V`` ``[C, k]``, one column per scalar output (``I_C``: the trace
            kernel; ``torch.ones(1, 1)`` for a model with one output per example).
        method: as in :func:`output_gradients`; ``"auto"`` settles on ``"loop"`` at the
            first pass that needs it.
        max_memory: bytes for the ``[n, n]`` float64 kernel and the gradient rows held at
            once (default :data:`~.persample.DEFAULT_MAX_MEMORY`); activations come on top.

    Raises:
        ValueError: ``projections`` is not ``[C, k]`` with ``k >= 1``, or ``max_memory``
            cannot hold the kernel and two gradient rows (the message names the bytes).
    """
    if projections.ndim != 2 or projections.shape[1] < 1:
        raise ValueError(
            f"projections must be a [C, k] matrix with k >= 1 columns, got shape "
            f"{tuple(projections.shape)}; use torch.eye(C) for the trace kernel"
        )
    fl = check_objective(network)
    split = SplitBatch.of(inputs)
    n = split.size
    held, streamed = kernel_blocks(n, fl.layout.size, fl.dtype, max_memory)
    kernel = torch.zeros(n, n, dtype=torch.float64, device=fl.device)  # [n, n]
    for v in projections.T:  # [C] each
        projected = _projected(fl, v)
        for start in range(0, n, held):
            rows = slice(start, min(start + held, n))
            method = _add_rows(kernel, projected, split, rows, streamed, method)
    return kernel, ("loop" if method == "loop" else "vmap")


def kernel_blocks(
    examples: int, params: int, dtype: torch.dtype, max_memory: int | None
) -> tuple[int, int]:
    """``(h, s)``: gradient rows held, and streamed per chunk, by :func:`tangent_kernel`.

    The bytes in use are ``8 n² + h P w + s P r + h s (w + 8)``: the float64 kernel, the
    held rows (``w`` bytes per entry: ``float32`` or wider), a streamed chunk (``r = 2b``
    for the per-parameter gradients of the ``b``-byte ``dtype`` and their flat copy, plus
    ``w`` for the widened copy when ``b < w``) and one block product ``J[a] J[b]ᵀ`` with its
    float64 copy; activations come on top. ``s`` starts at ``min(n, 64)``, halved while
    fewer than ``min(n, 4s)`` rows could be held (each block of held rows costs a pass over
    the later examples), and ``h`` takes the rest; once all ``n`` rows are held, ``s``
    grows into what is left.

    Args:
        examples: ``n``.
        params: ``P``, the selected parameters.
        dtype: the gradients' dtype (the parameters').
        max_memory: the budget in bytes (default :data:`~.persample.DEFAULT_MAX_MEMORY`).

    Raises:
        ValueError: ``max_memory`` is not a positive integer, or cannot hold the kernel and
            two gradient rows; the message names ``n``, the bytes needed and ``max_memory=``.
    """
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"max_memory must be a positive integer (bytes), got {budget!r}")
    wide = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    narrow = torch.empty((), dtype=dtype).element_size()
    stream_row = params * (2 * narrow + (wide if narrow < wide else 0))
    free = budget - 8 * examples**2

    def held_with(s: int) -> int:
        return (free - s * stream_row) // (params * wide + s * (wide + 8))

    streamed = min(examples, 64)
    while streamed > 1 and held_with(streamed) < min(examples, 4 * streamed):
        streamed //= 2  # fewer rows streamed at once, more held: fewer passes
    held = min(examples, held_with(streamed))
    if held < 1:
        need = 8 * examples**2 + params * wide + stream_row + wide + 8
        raise ValueError(
            f"the NTK of n={examples} examples needs at least {need} bytes (the [n, n] float64 "
            f"kernel: {8 * examples**2}, plus one held and one streamed gradient row of "
            f"{params} parameters), more than max_memory={budget}; pass max_memory={need} or "
            "more, fewer examples (max_examples=) or fewer parameters (params=)"
        )
    if held == examples:  # the whole Jacobian is held: stream in the largest chunks that fit
        spare = free - examples * params * wide
        streamed = max(streamed, min(examples, spare // (stream_row + examples * (wide + 8))))
    return held, streamed


def _add_rows(
    kernel: Tensor, fl: Objective, split: SplitBatch, rows: slice, streamed: int, method: Method
) -> Method:
    """Add ``J[a] J[b]ᵀ`` for the examples ``a`` at ``rows`` and every ``b >= a`` (and the
    mirror entries below the diagonal block) to ``kernel`` ``[n, n]``; returns the method
    to go on with (``"loop"`` once vmap has failed)."""
    wide = torch.promote_types(fl.dtype, torch.float32)
    block = torch.empty(rows.stop - rows.start, fl.layout.size, dtype=wide, device=fl.device)

    def hold(start: int, grads: Tensor, values: Tensor) -> None:
        block[start : start + grads.shape[0]] = grads  # [c, P] into [h, P]

    def add(first: int, grads: Tensor) -> None:
        cols = slice(first, first + grads.shape[0])
        part = (block @ grads.to(wide).T).double()  # [h, c]
        kernel[rows, cols] += part
        if cols.start >= rows.stop:
            kernel[cols, rows] += part.T

    method = _chunks(fl, _part(split, rows), hold, method, streamed)
    for first in range(rows.start, rows.stop, streamed):  # the diagonal block, [h, s] at a time
        add(first, block[first - rows.start : first - rows.start + streamed])
    if rows.stop < split.size:
        later = _part(split, slice(rows.stop, split.size))
        method = _chunks(fl, later, lambda i, g, _: add(rows.stop + i, g), method, streamed)
    return method


def _chunks(
    fl: Objective, split: SplitBatch, consume: Consume, method: Method, size: int
) -> Method:
    """:func:`~.persample.for_each_chunk` in chunks of ``size``; ``"loop"`` after a fallback,
    else ``method`` unchanged (``"auto"`` stays ready to fall back later)."""
    used, _ = for_each_chunk(fl, split, consume, method=method, chunk_size=size, max_memory=None)
    return "loop" if used == "loop" else method


def _part(split: SplitBatch, rows: slice) -> SplitBatch:
    """The examples at ``rows`` of ``split`` (the unsplit leaves as they are)."""
    leaves = list(split.leaves)
    for i, part in zip(split.split, split.rows(rows), strict=True):
        leaves[i] = part
    return replace(split, size=rows.stop - rows.start, leaves=tuple(leaves))


def label_kernel(targets: Tensor, classes: int | None = None) -> Tensor:
    """``T = Y Yᵀ`` ``[n, n]`` float64: ``Y`` one-hot ``[n, classes]`` for integer labels
    ``[n]`` (``T_ij = 1`` iff ``y_i = y_j``), else the real targets ``[n]`` or ``[n, d]``."""
    if not targets.is_floating_point():
        if targets.ndim != 1:
            raise ValueError(
                f"integer labels must have shape [n], got {tuple(targets.shape)}; pass one "
                "class index per example"
            )
        same = targets[:, None] == targets[None, :]  # [n, n]
        return same.double()
    y = targets.double().reshape(targets.shape[0], -1)  # [n, d]
    return y @ y.T


def centered_alignment(kernel: Tensor, target: Tensor) -> Tensor:
    """``A(K, T) = ⟨HKH, HTH⟩_F / (‖HKH‖_F ‖HTH‖_F)`` (module doc), 0-d float64.

    NaN where a centered kernel is zero (a constant kernel aligns with nothing).
    """
    if kernel.shape != target.shape or kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"kernel and target must be square matrices of one shape, got "
            f"{tuple(kernel.shape)} and {tuple(target.shape)}"
        )
    k_c, t_c = _center(kernel.double()), _center(target.double())  # [n, n] each
    return (k_c * t_c).sum() / (torch.linalg.matrix_norm(k_c) * torch.linalg.matrix_norm(t_c))


def _center(matrix: Tensor) -> Tensor:
    """``H M H``: rows and columns minus their means (plus the grand mean)."""
    centered = matrix - matrix.mean(dim=0, keepdim=True)  # [n, n]
    return centered - centered.mean(dim=1, keepdim=True)


def relative_change(kernel: Tensor, initial: Tensor) -> Tensor:
    """``‖K − K_0‖_F / ‖K_0‖_F`` (0-d; NaN for a zero ``K_0``)."""
    return torch.linalg.matrix_norm(kernel - initial) / torch.linalg.matrix_norm(initial)


def label_directions(
    kernel: Tensor, labels: Tensor, *, count: int, min_energy: float, floor: float = 1e-6
) -> tuple[Tensor, Tensor] | None:
    """The first ``count`` eigenvectors of ``kernel`` (decreasing eigenvalue) that carry
    label energy ``e_k = (u_kᵀy)² / ‖y‖² >= min_energy``, skipping numerically null ones
    (``λ_k < floor · λ_0``): ``(u_k [n, k], u_kᵀy [k])``, or None when none qualifies.

    ``Σ_k e_k = 1`` over all ``n`` eigenvectors; each ``u_k`` has an arbitrary sign, which
    ``u_kᵀy`` carries along. Synchronises once (the selection is data-dependent).
    """
    values, vectors = torch.linalg.eigh(kernel.double())  # ascending
    values, vectors = values.flip(0), vectors.flip(1)  # [n], [n, n] decreasing
    y = labels.double().to(vectors.device).reshape(-1)  # [n]
    proj = vectors.T @ y  # [n]
    energy = proj**2 / (y @ y)  # [n]
    usable = (energy >= min_energy) & (values > floor * values[0])
    chosen = usable.nonzero()[:, 0][:count]  # deliberate sync: which directions
    if chosen.numel() == 0:
        return None
    return vectors[:, chosen], proj[chosen]
