"""The loss as a pure function of selected parameters: ``L(w, batch)``.

:class:`Objective` evaluates ``loss_fn(model, batch)`` through :func:`~.call.call` with
the selected parameters swapped for tensors the caller passes in; every buffer and every
other parameter enters as a detached clone, so no evaluation moves BatchNorm statistics,
writes ``.grad``, builds a graph on the user's tensors or replaces one of the module's
``Parameter`` objects (shared and tied modules included, see :mod:`.call`). A compiled
model is evaluated through its eager module. :meth:`Objective.scope` sets the forward
semantics (module modes restored afterwards), forks the global RNG and selects the math
attention kernel.

The curvature operators and the gradient functions take an ``Objective`` the way the
Krylov algorithms take an operator: what is differentiated, in which parameters and
under which semantics is decided once, here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .call import Slots, call, inner_name, unwrap
from .determinism import check_deterministic
from .loss import LossFn, Mode, as_scalar, check_loss_fn, check_mode
from .params import ParamLayout, ParamSelection, select_params
from .scopes import evaluation


class _Bound(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so the swap covers the whole closure."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


class Objective:
    """``L(w, batch)``: ``loss_fn`` on ``model`` with parameters ``w`` (see module doc).

    Args:
        model: the user's module (never modified; a ``torch.compile`` wrapper is fine).
        loss_fn: ``loss(model, batch) -> scalar``.
        params: which parameters ``w`` holds (see :func:`~.params.select_params`);
            the others are held fixed at detached copies.
        mode: ``"eval"`` (default) or ``"train"`` forward semantics.
        dtype: compute dtype of ``w`` and of the floating constants (default: the first
            selected parameter's); ``torch.float64`` gives exact references.

    Attributes:
        model: the user's module.
        loss_fn: the loss closure.
        layout: the selected parameters, in model order (``P = layout.size``), named as
            ``model.named_parameters()`` names them.
        point: ``{name: detached parameter}``, the current ``w`` (cast to ``dtype``).
        mode: forward semantics.
        device, dtype: of ``w``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(1, 1, bias=False)
        >>> objective = Objective(net, lambda m, x: (m(x) ** 2).mean(), dtype=torch.float64)
        >>> with objective.scope():
        ...     objective({"weight": torch.full((1, 1), 3.0, dtype=torch.float64)},
        ...               torch.ones(4, 1, dtype=torch.float64))
        tensor(9., dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        params: ParamSelection = None,
        mode: Mode = "eval",
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.loss_fn = check_loss_fn(loss_fn)
        self.mode = check_mode(mode)
        selected = select_params(model, params)
        first = next(iter(selected.values()))
        self.model, self.device = model, first.device
        self.dtype = first.dtype if dtype is None else dtype
        self.layout = ParamLayout.of(selected)
        self.point = {n: self._cast(p.detach()) for n, p in selected.items()}
        self._bound = _Bound(unwrap(model), loss_fn)
        self._slots = Slots(self._bound)
        held = [(n, p) for n, p in model.named_parameters() if n not in selected]
        self._constants = {
            _key(n): self._cast(t.detach()).clone() for n, t in [*held, *model.named_buffers()]
        }

    def with_loss(self, loss_fn: LossFn) -> Objective:
        """The same model, parameters, mode and dtype with another loss closure."""
        params = list(self.layout.names)
        return Objective(self.model, loss_fn, params=params, mode=self.mode, dtype=self.dtype)

    def astype(self, dtype: torch.dtype) -> Objective:
        """The same function at the same ``w`` (this objective's snapshot, not the
        model's parameters now), evaluated in ``dtype``: a float64 twin of a float32
        objective gives exact references at the point the float32 one was taken."""
        twin = copy.copy(self)
        twin.dtype = dtype
        twin.point = {n: twin._cast(p) for n, p in self.point.items()}
        twin._constants = {k: twin._cast(t) for k, t in self._constants.items()}
        return twin

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Semantics, forked RNG and the math attention kernel for a series of calls."""
        with evaluation(self.model, self.mode, self.device):
            yield

    def raw(self, w: dict[str, Tensor], batch: Any) -> Any:
        """Whatever ``loss_fn`` returns with the parameters ``w`` (call inside :meth:`scope`)."""
        state = {**self._constants, **{_key(n): t for n, t in w.items()}}
        return call(self._bound, state, (batch,), slots=self._slots)

    def __call__(self, w: dict[str, Tensor], batch: Any) -> Tensor:
        """The loss as a 0-d tensor; ``ValueError`` if ``loss_fn`` returns anything else."""
        return as_scalar(self.raw(w, batch), "the loss closure")

    def at(self, vector: Tensor, batch: Any) -> Tensor:
        """The loss at the flat parameters ``vector`` ``[P]`` (call inside :meth:`scope`)."""
        return self(self.layout.unflatten(vector), batch)

    def flat_point(self) -> Tensor:
        """``w`` as a fresh ``[P]`` vector."""
        return self.layout.flatten(self.point)  # [P]

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

    def check_deterministic(self, batch: Any) -> None:
        """``ValueError`` naming the module if two evaluations at ``w`` on ``batch`` differ
        (dropout under ``mode="train"``, noise layers, a random loss closure); a pass is
        remembered for this model, loss closure and mode while the model has no random
        module (:func:`.determinism.check_deterministic`)."""
        with self.scope():  # both passes inside one fork: a random loss differs
            check_deterministic(
                self.model, lambda: self(self.point, batch), self.mode, loss_fn=self.loss_fn
            )


def network(
    model: nn.Module,
    *,
    params: ParamSelection = None,
    mode: Mode = "eval",
    dtype: torch.dtype | None = None,
) -> Objective:
    """The model's outputs ``model(inputs)`` as a function of the selected parameters (an
    :class:`Objective` whose closure returns the outputs, for the tangent kernel)."""
    return Objective(model, _outputs, params=params, mode=mode, dtype=dtype)


def _outputs(model: nn.Module, inputs: Any) -> Any:
    return model(inputs)


def check_objective(objective: object) -> Objective:
    """``objective`` if it is an :class:`Objective`, else a ``TypeError`` with the fix."""
    if not isinstance(objective, Objective):
        raise TypeError(
            f"expected a trainprobe.functional.Objective, got {type(objective).__name__}; "
            "build one with Objective(model, loss_fn, params=..., mode=...)"
        )
    return objective


def _key(name: str) -> str:
    """The state key of parameter or buffer ``name`` inside :class:`_Bound`."""
    return f"model.{inner_name(name)}"
