"""Small tensor kernels shared by probes: fused norms, finiteness masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def stacked_norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor, ``[L]``, in one fused call where torch has it.

    The result is on the first tensor's device, in the widest floating dtype
    among the inputs (float32 norms of float32 tensors, float64 of float64).
    """
    if not tensors:
        raise ValueError("stacked_norms needs at least one tensor")
    device = tensors[0].device
    norms = torch._foreach_norm(list(tensors))  # one kernel per device/dtype group
    dtype = norms[0].dtype
    for norm in norms[1:]:
        dtype = torch.promote_types(dtype, norm.dtype)
    same = all(n.dtype == dtype and n.device == device for n in norms)
    if not same:
        norms = [n.to(device=device, dtype=dtype, non_blocking=True) for n in norms]
    return torch.stack(norms)  # [L]


def total_norm(norms: Tensor) -> Tensor:
    """Global L2 norm from per-tensor norms: ``sqrt(sum_i ||t_i||^2)``."""
    return torch.linalg.vector_norm(norms)


def first_true(mask: Tensor) -> Tensor:
    """Index of the first True in a ``[L]`` bool mask, or -1 (no host sync)."""
    first = torch.argmax(mask.to(torch.int8))
    return torch.where(mask.any(), first, torch.full_like(first, -1))
