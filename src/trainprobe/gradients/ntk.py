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
(``E[v vᵀ] = I``) at ``k`` instead of ``C`` passes. Each ``J_v`` is one
:func:`~.persample.per_sample_gradients` call with the "loss" ``f_v`` (so the same
methods, chunking and BatchNorm rules apply).

Centered kernel-target alignment (Cortes, Mohri & Rostamizadeh 2012, "Algorithms for
Learning Kernels Based on Centered Alignment"), with ``H = I − 11ᵀ/n``:

    ``A(K, T) = ⟨HKH, HTH⟩_F / (‖HKH‖_F ‖HTH‖_F)``   in ``[−1, 1]``,

against the label kernel ``T = Y Yᵀ`` (``Y`` one-hot for class labels, the targets for
real-valued ones). :func:`label_directions` picks the eigenvectors of ``K`` that carry the
labels (Pezeshki et al. 2021's feature directions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..functional import Objective, check_objective
from .persample import Method, PerSampleGradients, per_sample_gradients


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
        method, max_memory: as in :func:`~.persample.per_sample_gradients`.

    Raises:
        ValueError: ``direction`` does not match the model's ``C`` outputs.
    """

    def scalar(net: nn.Module, rows: Any) -> Tensor:
        out = network.loss_fn(net, rows)  # [1, ...] for a one-example batch
        flat = out.reshape(out.shape[0], -1)  # [1, C]
        if flat.shape[1] != direction.shape[0]:
            raise ValueError(
                f"the output projection has {direction.shape[0]} entries but the model gives "
                f"{flat.shape[1]} outputs per example; pass one weight per output"
            )
        return (flat @ direction.to(flat)).sum()

    projected = check_objective(network).with_loss(scalar)
    return per_sample_gradients(projected, inputs, method=method, max_memory=max_memory)


def tangent_kernel(
    network: Objective,
    inputs: Any,
    projections: Tensor,
    *,
    method: Method = "vmap",
    max_memory: int | None = None,
) -> tuple[Tensor, str]:
    """``K = Σ_j J_{v_j} J_{v_j}ᵀ`` ``[n, n]`` in float64 (module doc), and the method used.

    Args:
        network, inputs: as in :func:`output_gradients`.
        projections: ``V`` ``[C, k]``, one column per scalar output (``I_C``: the trace
            kernel; ``torch.ones(1, 1)`` for a model with one output per example).
        max_memory: as in :func:`output_gradients`.
        method: as there; ``"auto"`` settles on ``"loop"`` at the first column that
            needs it.

    Raises:
        ValueError: ``projections`` is not ``[C, k]`` with ``k >= 1``.
    """
    if projections.ndim != 2 or projections.shape[1] < 1:
        raise ValueError(
            f"projections must be a [C, k] matrix with k >= 1 columns, got shape "
            f"{tuple(projections.shape)}; use torch.eye(C) for the trace kernel"
        )
    kernel: Tensor | None = None
    used = "vmap"
    for v in projections.T:  # [C] each
        rows = output_gradients(network, inputs, v, method=method, max_memory=max_memory)
        if rows.method == "loop":  # vmap failed once: no second failure, no second warning
            method = used = "loop"
        jac = rows.grads.to(torch.promote_types(rows.grads.dtype, torch.float32))  # [n, P]
        block = (jac @ jac.T).double()  # [n, n]
        kernel = block if kernel is None else kernel + block
    return kernel, used  # type: ignore[return-value]


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
