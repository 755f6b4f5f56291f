"""Held-out evaluation: loss and accuracy on data training never sees."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from ..functional import as_scalar, check_mode
from ..keys import Key
from ._supervised import inputs_targets, named_values, observing
from .base import StepContext, Value, probe_name
from .schedules import Schedule, check_schedule, every

Criterion = Callable[[Tensor, Tensor], Tensor]


class HeldOut:
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
        criterion: ``criterion(outputs, targets) -> scalar`` (default cross-entropy).
        schedule: when to measure (default every 50 steps).
        mode: ``"eval"`` (default) or ``"train"`` semantics.
    """

    name = "heldout"
    keys = (
        Key("heldout/loss", "the loss on data"),
        Key("heldout/acc", "the accuracy on data"),
        Key("heldout/train_loss", "the loss on train_data"),
        Key("heldout/train_acc", "the accuracy on train_data"),
        Key("heldout/<name>", "with eval_fn, each value it returns"),
    )
    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        data: Any = None,
        *,
        eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
        train_data: Any = None,
        criterion: Criterion | None = None,
        schedule: Schedule | None = None,
        name: str | None = None,
        mode: str = "eval",
    ) -> None:
        self.schedule = every(50) if schedule is None else schedule
        check_schedule(self.schedule, "HeldOut")
        self.name = probe_name(self, name)
        if (data is None) == (eval_fn is None):
            raise ValueError(
                "HeldOut needs exactly one of data=(x, y) (or a list of batches) and "
                "eval_fn=lambda model: {name: value}"
            )
        if eval_fn is not None and (not callable(eval_fn) or train_data is not None):
            raise TypeError(
                "HeldOut: eval_fn must be callable eval_fn(model) -> {name: value}, without "
                "train_data= (return train metrics from eval_fn instead)"
            )
        if criterion is not None and not callable(criterion):
            raise TypeError("HeldOut: criterion must be callable criterion(outputs, targets)")
        self.eval_fn, self.mode = eval_fn, check_mode(mode)
        self.criterion = F.cross_entropy if criterion is None else criterion
        self._data, self._train = _batches(data, "data"), _batches(train_data, "train_data")

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        with observing(ctx.model, self.mode) as model, torch.no_grad():
            if self.eval_fn is not None:
                return named_values(self.eval_fn(model), "HeldOut: eval_fn", f"{self.name}/")
            out = _evaluate(model, self._data, self.criterion, f"{self.name}/")
            if self._train:
                out.update(_evaluate(model, self._train, self.criterion, f"{self.name}/train_"))
        return out

    def settings(self) -> dict[str, Any]:
        return {
            "data": "eval_fn" if self.eval_fn is not None else f"{len(self._data)} batches",
            "train_data": f"{len(self._train)} batches",
            "mode": self.mode,
            "criterion": getattr(self.criterion, "__name__", type(self.criterion).__name__),
        }


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
