"""Small tensor kernels shared by probes: fused norms, finiteness masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def stack_scalars(values: Sequence[Tensor]) -> Tensor:
    """Stack 0-d tensors into ``[L]`` on the first one's device, in their widest dtype."""
    if not values:
        raise ValueError("stack_scalars needs at least one tensor")
    device, dtype = values[0].device, values[0].dtype
    for value in values[1:]:
        dtype = torch.promote_types(dtype, value.dtype)
    if any(v.dtype != dtype or v.device != device for v in values):
        values = [v.to(device=device, dtype=dtype, non_blocking=True) for v in values]
    return torch.stack(list(values))  # [L]


def stacked_norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor, ``[L]``, in one fused call (``torch._foreach_norm``).

    The result is on the first tensor's device, in the widest floating dtype
    among the inputs (float32 norms of float32 tensors, float64 of float64).
    """
    if not tensors:
        raise ValueError("stacked_norms needs at least one tensor")
    return stack_scalars(torch._foreach_norm(list(tensors)))  # one kernel per device/dtype


def total_norm(norms: Tensor) -> Tensor:
    """Global L2 norm from per-tensor norms: ``sqrt(sum_i ||t_i||^2)``."""
    return torch.linalg.vector_norm(norms)


def first_true(mask: Tensor) -> Tensor:
    """Index of the first True in a ``[L]`` bool mask, or -1 (no host sync)."""
    first = torch.argmax(mask.to(torch.int8))
    return torch.where(mask.any(), first, torch.full_like(first, -1))
