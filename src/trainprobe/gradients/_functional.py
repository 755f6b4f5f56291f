"""The loss as a pure function of the selected parameters, and the batch split into examples.

:class:`FunctionalLoss` evaluates ``loss_fn(model, batch)`` through
``torch.func.functional_call`` with the selected parameters swapped for tensors the
caller passes in; every buffer and every other parameter enters as a detached clone, so
no evaluation moves BatchNorm statistics, writes ``.grad`` or builds a graph on the
user's tensors. :meth:`FunctionalLoss.scope` sets the forward semantics (module modes
restored afterwards), forks the global RNG and selects the math attention kernel.

:class:`SplitBatch` views an arbitrary batch (a tensor, tuple, dict, ...) as ``B``
examples: tensor leaves whose leading size is ``B`` are split along dim 0, every other
leaf (numbers, strings, 0-d tensors, tensors of another leading size) goes whole to
every sub-batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..curvature.hvp import _differentiable_attention, _Objective
from ..curvature.loss import LossFn, Mode, ParamSelection, rng_fork, select_params, semantics
from ..curvature.params import ParamLayout


def check_mode(mode: object) -> Mode:
    """``mode`` if it is ``"eval"`` or ``"train"``, else a ``ValueError`` with the fix."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' (running statistics) or 'train', got {mode!r}")
    return mode  # type: ignore[return-value]


class FunctionalLoss:
    """``loss(w, batch)``: ``loss_fn`` on ``model`` with parameters ``w`` (see module doc).

    Attributes:
        model: the user's module (never modified).
        layout: the selected parameters, in model order (``P = layout.size``).
        point: ``{name: detached parameter}``, the current ``w``.
        mode: forward semantics, ``"eval"`` or ``"train"``.
        device, dtype: of the first selected parameter.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: ParamSelection, mode: Mode
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a callable loss(model, batch), got {type(loss_fn).__name__}"
            )
        selected = select_params(model, params)
        self.model, self.mode = model, check_mode(mode)
        self.layout = ParamLayout.of(selected)
        self.point = {n: p.detach() for n, p in selected.items()}
        first = next(iter(selected.values()))
        self.device, self.dtype = first.device, first.dtype
        self._objective = _Objective(model, loss_fn)
        fixed = [(n, p) for n, p in model.named_parameters() if n not in selected]
        self._constants = {
            f"model.{n}": t.detach().clone() for n, t in [*fixed, *model.named_buffers()]
        }

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Semantics, forked RNG and the math attention kernel for a series of calls."""
        with ExitStack() as stack:
            stack.enter_context(rng_fork(self.device))
            stack.enter_context(semantics(self.model, self.mode))
            stack.enter_context(_differentiable_attention())
            yield

    def raw(self, w: dict[str, Tensor], batch: Any) -> Any:
        """Whatever ``loss_fn`` returns with the parameters ``w`` (call inside :meth:`scope`)."""
        state = {**self._constants, **{f"model.{n}": t for n, t in w.items()}}
        return functional_call(self._objective, state, (batch,))

    def __call__(self, w: dict[str, Tensor], batch: Any) -> Tensor:
        """The loss as a 0-d tensor; ``ValueError`` if ``loss_fn`` returns anything else."""
        return as_scalar(self.raw(w, batch), "the loss closure")

    def leaves(self) -> dict[str, Tensor]:
        """Fresh leaves ``w`` requiring grad (for ``torch.autograd.grad``), sharing storage."""
        return {n: p.detach().requires_grad_(True) for n, p in self.point.items()}

    def flat_grad(self, value: Tensor, w: dict[str, Tensor], *, retain: bool = False) -> Tensor:
        """``∇_w value`` laid out as ``[P]``; zeros for parameters ``value`` does not use."""
        if not value.requires_grad:
            return torch.zeros(self.layout.size, dtype=self.dtype, device=self.device)
        tensors = list(w.values())
        grads = torch.autograd.grad(value, tensors, retain_graph=retain, allow_unused=True)
        filled = [
            torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)
        ]
        return self.layout.flatten(dict(zip(w, filled, strict=True)))  # [P]


def as_scalar(value: object, what: str) -> Tensor:
    """``value`` reshaped to a 0-d tensor, or a ``ValueError`` naming what it was."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar tensor (mean over the batch), got "
            f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))}"
        )
    return value.reshape(())


@dataclass(frozen=True)
class SplitBatch:
    """A batch seen as ``size`` examples (see the module doc).

    Attributes:
        size: ``B``, the leading size of the first tensor leaf with a dimension.
        leaves: the batch's leaves (``torch.utils._pytree`` order).
        spec: its tree structure.
        split: indices of the leaves split along dim 0.
    """

    size: int
    leaves: tuple[Any, ...]
    spec: TreeSpec
    split: tuple[int, ...]

    @classmethod
    def of(cls, batch: Any) -> SplitBatch:
        leaves, spec = tree_flatten(batch)
        sized = [t for t in leaves if isinstance(t, Tensor) and t.ndim > 0]
        if not sized:
            raise ValueError(
                "cannot tell the examples apart: the batch holds no tensor with a leading "
                "(batch) dimension; pass inputs as tensors of shape [B, ...]"
            )
        size = int(sized[0].shape[0])
        if size < 1:
            raise ValueError("the batch is empty (leading size 0); pass at least one example")
        split = tuple(
            i for i, t in enumerate(leaves)
            if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == size
        )  # fmt: skip
        return cls(size, tuple(leaves), spec, split)

    def rows(self, index: slice | Tensor) -> list[Tensor]:
        """The split leaves at ``index`` (a slice or a ``[n]`` index tensor), in order."""
        if isinstance(index, slice):
            return [self.leaves[i][index] for i in self.split]
        return [self.leaves[i][index.to(self.leaves[i].device)] for i in self.split]

    def rebuild(self, rows: Sequence[Tensor]) -> Any:
        """The batch with the split leaves replaced by ``rows`` (same order as ``split``)."""
        leaves = list(self.leaves)
        for i, row in zip(self.split, rows, strict=True):
            leaves[i] = row
        return tree_unflatten(leaves, self.spec)

    def take(self, index: slice | Tensor) -> Any:
        """The sub-batch of the examples at ``index``."""
        return self.rebuild(self.rows(index))
