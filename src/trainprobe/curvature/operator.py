"""What the curvature algorithms take: a symmetric linear operator, never a model.

An operator is one of (DESIGN.md rule 1):

- a dense symmetric ``[n, n]`` tensor (exact tests are then trivial);
- a callable ``v [n] -> A v [n]``;
- an object with ``matvec(v [n]) -> [n]`` and ``matmat(V [n, k]) -> [n, k]`` (a
  :class:`MatmatOperator`, such as the Hessian operators of :mod:`.hvp`), whose
  ``matmat`` applies ``A`` to ``k`` vectors in one batched call.

:func:`as_matmat` gives every algorithm one batched entry point. A plain callable has
no batched form, so it is applied column by column there; the Hessian operators are
``vmap``-batched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class MatmatOperator(Protocol):
    """A symmetric operator that applies itself to one vector or to a batch of them."""

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v [n]``."""
        ...

    def matmat(self, vs: Tensor) -> Tensor:
        """``A V`` for ``V [n, k]``, in one batched call."""
        ...


Operator = Tensor | Callable[[Tensor], Tensor] | MatmatOperator


def _check_dense(operator: Tensor, dim: int) -> None:
    if operator.shape != (dim, dim):
        raise ValueError(
            f"a dense operator must have shape [{dim}, {dim}], got {tuple(operator.shape)}"
        )


def as_matvec(operator: Operator, dim: int) -> Callable[[Tensor], Tensor]:
    """A callable ``v [n] -> A v [n]`` for any :data:`Operator`."""
    if isinstance(operator, Tensor):
        _check_dense(operator, dim)
        return lambda v: operator @ v
    if isinstance(operator, MatmatOperator):
        return operator.matvec
    if not callable(operator):
        raise TypeError(
            "operator must be a [n, n] tensor, a callable v -> A v, or an object with "
            f"matvec and matmat, got {type(operator).__name__}"
        )
    return operator


def as_matmat(operator: Operator, dim: int) -> Callable[[Tensor], Tensor]:
    """A callable ``V [n, k] -> A V [n, k]``: batched where the operator is."""
    if isinstance(operator, Tensor):
        _check_dense(operator, dim)
        return lambda vs: operator @ vs
    if isinstance(operator, MatmatOperator):
        return operator.matmat
    matvec = as_matvec(operator, dim)

    def columns(vs: Tensor) -> Tensor:  # a plain callable has no batched form
        return torch.stack([matvec(vs[:, i]).reshape(-1) for i in range(vs.shape[1])], dim=1)

    return columns


def operator_placement(
    operator: Operator, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to call ``operator`` with: the given ones, else the
    operator's own ``device``/``dtype`` attributes (dense tensors and Hessian
    operators have them), else the CPU and float64."""
    device = device if device is not None else getattr(operator, "device", "cpu")
    dtype = dtype if dtype is not None else getattr(operator, "dtype", torch.float64)
    return torch.device(device), dtype
