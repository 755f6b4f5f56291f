"""Small tensor kernels shared by probes: fused norms, stacking 0-d tensors, and the
shares of squared norms that ranks sum under FSDP2 (sharded ``DTensor`` parameters)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..functional.shards import dtensor_type, local_part


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


def _holders(tensor: Tensor, world: int) -> float:
    """How many of the ``world`` ranks hold each element of ``tensor``'s local part: a
    plain tensor is on every rank (replicated), a ``DTensor`` on the ranks that are not
    told apart by a ``Shard`` placement of its mesh."""
    kind = dtensor_type()
    if kind is None or not isinstance(tensor, kind):
        return float(world)
    shards = 1
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            raise ValueError(
                f"a DTensor of shape {tuple(tensor.shape)} is Partial (a reduction still "
                "pending) on its mesh, so no rank holds its value yet; measure it after the "
                "reduction (FSDP2 reduce-scatters gradients at the end of the backward)"
            )
        if placement.is_shard():
            shards *= tensor.device_mesh.size(dim)
    return world / shards


def shared_squares(
    tensors: Sequence[Tensor],
    world: int,
    *,
    wide: torch.dtype | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """``[L]`` float64: this rank's share of each tensor's squared L2 norm, so that the
    sum over the ``world`` ranks is ``||t||^2`` of the whole tensor.

    ``s_r = ||local_r||^2 / h``, with ``local_r`` the rank's part (a ``DTensor``'s local
    shard, another tensor itself) and ``h`` the number of ranks holding that part
    (``world`` for a replicated tensor, 1 for a shard of a 1-D FSDP2 mesh), so that
    ``Σ_r s_r = ||t||^2`` without gathering any tensor. ``wide`` as in
    :func:`stacked_norms`; ``scale`` (a 0-d tensor, e.g. ``1 / loss scale``) multiplies
    every tensor before squaring.
    """
    holders = [_holders(t, world) for t in tensors]
    norms = stacked_norms([local_part(t) for t in tensors], wide=wide)  # [L]
    if scale is not None:
        norms = norms * scale.to(norms.device, norms.dtype)
    count = torch.tensor(holders, dtype=torch.float64).to(norms.device, non_blocking=True)
    return norms.double().square() / count  # [L]


def norms_from_squares(squares: np.ndarray, names: Sequence[str], prefix: str) -> dict[str, float]:
    """``{prefix/name: sqrt(squares[i])}`` and ``{prefix_total: sqrt(Σ squares)}`` on the
    host (the keys :class:`~.base.PerLayer` and :func:`total_norm` give in one process)."""
    squares = np.asarray(squares, dtype=np.float64).reshape(len(names))
    out = {f"{prefix}/{n}": float(np.sqrt(s)) for n, s in zip(names, squares, strict=True)}
    out[f"{prefix}_total"] = float(np.sqrt(squares.sum()))
    return out
