"""The loss closure a functional evaluation takes, and its forward semantics.

A loss closure ``loss(model, batch) -> 0-d tensor`` is any scalar objective of a model
on a batch; :func:`criterion_loss` wraps the usual ``criterion(model(x), y)``. The
*mode* says under which forward semantics it is evaluated (see
:func:`~.scopes.semantics`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss(model, batch) -> 0-d tensor``: any scalar objective of the model on a batch."""

Mode = Literal["eval", "train"]
"""``"eval"``: running statistics, no dropout; ``"train"``: batch statistics (frozen
running statistics) and dropout."""


class NonFiniteLoss(FloatingPointError):
    """The loss evaluated for a measurement is NaN or infinite at this step (one bad batch):
    the measurement is undefined there. The monitor skips that step for the probe and keeps
    it on, where any other error disables it."""


def check_mode(mode: object) -> Mode:
    """``mode`` if it is ``"eval"`` or ``"train"``, else a ``ValueError`` with the fix."""
    if mode not in ("eval", "train"):
        raise ValueError(
            f"mode must be 'eval' or 'train' ('eval': running statistics, no dropout), got {mode!r}"
        )
    return mode  # type: ignore[return-value]


def check_loss_fn(loss_fn: object) -> LossFn:
    """``loss_fn`` if it is callable, else a ``TypeError`` naming the expected signature."""
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a callable loss(model, batch), got {type(loss_fn).__name__}"
        )
    return loss_fn  # type: ignore[return-value]


def as_scalar(value: object, what: str) -> Tensor:
    """``value`` reshaped to a 0-d tensor, or a ``ValueError`` naming what it was."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar tensor (mean over the batch), got "
            f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))}"
        )
    return value.reshape(())


def criterion_loss(criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """``loss(model, (inputs, targets)) = criterion(model(inputs), targets)``.

    Args:
        criterion: e.g. ``nn.CrossEntropyLoss()`` (mean reduction, as PyTorch's default).
    """
    if not callable(criterion):
        raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")

    def loss(model: nn.Module, batch: Any) -> Tensor:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError(
                "criterion_loss expects batches of (inputs, targets); for other batch "
                "shapes pass your own loss(model, batch) closure"
            )
        inputs, targets = batch
        return criterion(model(inputs), targets)

    return loss
