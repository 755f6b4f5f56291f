"""Held-out evaluation: loss and accuracy on data training never sees (:class:`HeldOut`),
and the check of the values a user's evaluation function returns (:func:`named_values`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..functional import Mode, as_scalar, check_mode
from ..keys import Key, is_name
from .base import ProbeOptions, StepContext, Value
from .batches import inputs_targets, observing
from .schedules import Schedule, every

Criterion = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, kw_only=True, eq=False)
class HeldOut(ProbeOptions):
    """Loss and accuracy on held-out data, and on a fixed train batch measured alike.

    Every measurement runs the model on fixed batches in ``mode`` semantics (eval by
    default: dropout off, BatchNorm running statistics), under ``no_grad`` with the global
    RNG forked, and restores every module's mode: train and held-out numbers differ only
    by the data, not by dropout or by which train batch the step drew.

    With ``data``, per batch ``(x, y)``: ``outputs = model(x)``, ``loss = criterion(outputs,
    y)`` (mean-reduced), the loss averaged over batches weighted by their example counts.
    Accuracy is written only for class-index targets (integer ``y`` of shape
    ``outputs.shape[:-1]``): the fraction of targets with ``argmax(outputs, -1) == y``
    (over every position of a sequence output).

    Keys: see ``keys``.

    Args:
        data: a held-out batch ``(x, y)`` or a list of them (re-read at each measurement).
        eval_fn: instead of ``data``: ``eval_fn(model) -> {name: float | 0-d tensor}`` with
            lower_snake names, run under the same semantics, ``no_grad`` and RNG fork.
        train_data: a fixed train batch ``(x, y)`` or a list of them (with ``data``).
        criterion: ``criterion(outputs, targets) -> scalar`` (default None: cross-entropy).
        schedule: when to measure (default every 50 steps).
        mode: ``"eval"`` (default) or ``"train"`` semantics.
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "heldout"
    schedule: Schedule = every(50)
    keys = (
        Key("heldout/loss", "the loss on data"),
        Key("heldout/acc", "the accuracy on data"),
        Key("heldout/train_loss", "the loss on train_data"),
        Key("heldout/train_acc", "the accuracy on train_data"),
        Key("heldout/<name>", "with eval_fn, each value it returns"),
    )

    data: Any = field(default=None, repr=False)
    eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None = field(default=None, repr=False)
    train_data: Any = field(default=None, repr=False)
    criterion: Criterion | None = field(default=None, repr=False)
    mode: Mode = "eval"
    _data: list[tuple[Any, Tensor]] = field(default_factory=list, init=False, repr=False)
    _train: list[tuple[Any, Tensor]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.data is None) == (self.eval_fn is None):
            raise ValueError(
                "HeldOut needs exactly one of data=(x, y) (or a list of batches) and "
                "eval_fn=lambda model: {name: value}"
            )
        if self.eval_fn is not None and (not callable(self.eval_fn) or self.train_data is not None):
            raise TypeError(
                "HeldOut: eval_fn must be callable eval_fn(model) -> {name: value}, without "
                "train_data= (return train metrics from eval_fn instead)"
            )
        if self.criterion is not None and not callable(self.criterion):
            raise TypeError("HeldOut: criterion must be callable criterion(outputs, targets)")
        check_mode(self.mode)
        self._keep(
            _data=_batches(self.data, "data"), _train=_batches(self.train_data, "train_data")
        )

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        with observing(ctx.model, self.mode) as model, torch.no_grad():
            if self.eval_fn is not None:
                return named_values(self.eval_fn(model), "HeldOut: eval_fn", f"{self.name}/")
            criterion = F.cross_entropy if self.criterion is None else self.criterion
            out = _evaluate(model, self._data, criterion, f"{self.name}/")
            if self._train:
                out.update(_evaluate(model, self._train, criterion, f"{self.name}/train_"))
        return out


def _batches(data: Any, what: str) -> list[tuple[Any, Tensor]]:
    """``data`` as a list of ``(x, y)`` batches (one batch, or a list of them)."""
    if data is None:
        return []
    if isinstance(data, Iterator):
        raise TypeError(f"HeldOut: {what}= is a one-shot iterator; pass a list of batches")
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[1], Tensor):
        return [inputs_targets(data, f"HeldOut({what}=...)")]
    if not isinstance(data, tuple | list) or not data:
        raise ValueError(f"HeldOut: {what}= must be a batch (x, y) or a non-empty list of them")
    return [inputs_targets(batch, f"HeldOut({what}=...)") for batch in data]


def _evaluate(
    model: nn.Module, batches: list[tuple[Any, Tensor]], criterion: Criterion, prefix: str
) -> dict[str, Value]:
    """Mean loss (weighted by examples) and, for class targets, accuracy over ``batches``."""
    loss_sum, examples, hits, targets, classified = 0.0, 0, 0.0, 0, True
    for x, y in batches:
        outputs = model(x)
        loss = as_scalar(criterion(outputs, y), "HeldOut's criterion")
        loss_sum = loss_sum + loss.double() * y.shape[0]
        examples += y.shape[0]
        classified = classified and _is_class_target(outputs, y)
        if classified:
            hits = hits + (outputs.argmax(dim=-1) == y).sum().double()
            targets += y.numel()
    out: dict[str, Value] = {f"{prefix}loss": loss_sum / examples}
    if classified:
        out[f"{prefix}acc"] = hits / targets
    return out


def _is_class_target(outputs: Any, y: Tensor) -> bool:
    return (
        isinstance(outputs, Tensor)
        and outputs.ndim >= 2
        and not y.is_floating_point()
        and tuple(y.shape) == tuple(outputs.shape[:-1])
    )


def named_values(values: Any, owner: str, prefix: str) -> dict[str, Tensor | float]:
    """``{prefix + name: value}`` from a user function's ``{name: float | 1-element tensor}``
    with lower_snake names, or a ``ValueError`` naming ``owner``."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{owner} must return a dict {{name: value}}, got {type(values).__name__}")
    out: dict[str, Tensor | float] = {}
    for key, value in values.items():
        if not is_name(key):
            raise ValueError(
                f"{owner} returned the name {key!r}; record keys need lower_snake names like "
                "'loss' or 'top5_acc'"
            )
        if isinstance(value, Tensor) and value.numel() == 1:
            out[prefix + key] = value.detach().reshape(())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[prefix + key] = float(value)
        else:
            raise ValueError(
                f"{owner}'s {key!r} must be a float or a one-element tensor, got "
                f"{type(value).__name__}"
            )
    return out
