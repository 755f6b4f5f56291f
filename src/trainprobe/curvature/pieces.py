"""The data of a Hessian: batches moved to the device and dtype, with their weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ..functional import (
    rng_fork,
)


def _pieces(
    batch: Any,
    batches: Iterable[Any] | None,
    reduction: str,
    batch_size: Callable[[Any], int],
    device: torch.device,
    dtype: torch.dtype,
) -> list[tuple[Any, float]]:
    """``[(batch on device, weight)]``: the data loop's one materialisation."""
    if (batch is None) == (batches is None):
        raise ValueError("pass exactly one of batch= (one batch) or batches= (an iterable)")
    if batch is not None:
        items = [batch]
    else:
        with rng_fork(device):  # iterating a DataLoader draws its seed from the global RNG
            items = list(batches)
        if not items:
            raise ValueError("batches= yielded no batch; pass a non-empty iterable")

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    items = [tree_map(move, b) for b in items]
    if reduction == "sum" or len(items) == 1:
        return [(b, 1.0) for b in items]
    sizes = [batch_size(b) for b in items]
    total = sum(sizes)
    return [(b, n / total) for b, n in zip(items, sizes, strict=True)]
