"""FSDP2's sharded tensors (``DTensor``) seen from one process: what type they are, and
the part of a tensor this process holds. Shared by the probes (shard statistics) and the
curvature core (finite differences through a sharded model)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import Tensor


@functools.cache
def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters), or None where
    this torch build has no distributed package."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without torch.distributed
        return None
    return DTensor


def any_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (a parameter or gradient under FSDP2)."""
    kind = dtensor_type()
    return kind is not None and any(isinstance(t, kind) for t in tensors)


def local_part(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process holds: a ``DTensor``'s local shard (no
    collective), any other tensor itself."""
    if type(tensor) in _PLAIN:  # the common case, without the isinstance walk
        return tensor
    kind = dtensor_type()
    return tensor.to_local() if kind is not None and isinstance(tensor, kind) else tensor


_PLAIN = (Tensor, torch.nn.Parameter)
