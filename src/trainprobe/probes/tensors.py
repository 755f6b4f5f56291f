"""Small tensor kernels shared by probes: fused norms, stacking 0-d tensors."""

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
        # non_blocking only towards an accelerator: a non-blocking copy to the CPU could be
        # read by the stack below before it lands
        values = [
            v.to(device=device, dtype=dtype, non_blocking=device.type != "cpu") for v in values
        ]
    return torch.stack(list(values))  # [L]


def stacked_norms(tensors: Sequence[Tensor], *, wide: torch.dtype | None = None) -> Tensor:
    """L2 norm of each tensor, ``[L]``, in one fused call (``torch._foreach_norm``).

    Accumulated in float32 at least (float64 when an input is float64, or ``wide``), so
    the norm of a half-precision tensor does not overflow at 65504; ``wide=float64`` for
    tensors multiplied by a large factor (an AMP loss scale) whose squares would
    overflow float32. The result is on the first tensor's device.
    """
    if not tensors:
        raise ValueError("stacked_norms needs at least one tensor")
    if wide is None:
        wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    try:
        norms = torch._foreach_norm(list(tensors), 2, dtype=wide)  # one kernel per group
    except (TypeError, RuntimeError):  # torch without the dtype argument
        norms = [torch.linalg.vector_norm(t, dtype=wide) for t in tensors]
    return stack_scalars(norms)


def total_norm(norms: Tensor) -> Tensor:
    """Global L2 norm from per-tensor norms: ``sqrt(sum_i ||t_i||^2)``."""
    return torch.linalg.vector_norm(norms)
