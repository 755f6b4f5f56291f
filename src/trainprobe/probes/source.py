"""Where the probes that evaluate the loss take it: one frozen data source (``data``,
``loss_fn``, ``params``, ``mode``), declared once and inherited, so that every such probe
lists it in its signature and checks it the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..functional import LossFn, Mode, Objective, ParamSelection
from .base import ProbeOptions, StepContext, step_source


@dataclass(frozen=True, kw_only=True, eq=False)
class LossProbe(ProbeOptions):
    """The options of a probe that evaluates the loss itself, at this step's parameters.

    Args:
        data: a fixed batch (e.g. a held-out batch); default: the step's ``batch=``.
        loss_fn: ``loss(model, batch) -> scalar``, mean-reduced; default: the ``loss_fn``
            given to ``watch`` or ``mon.step``.
        params: which parameters (None: the trainable ones the loss uses; a regex, names
            or a module).
        mode: ``"eval"`` (default: BatchNorm running statistics, no dropout) or
            ``"train"`` forward semantics.
    """

    across_ranks = "own_data"
    own_data = "data"
    data: Any = field(default=None, repr=False)
    loss_fn: LossFn | None = field(default=None, repr=False)
    params: ParamSelection = None
    mode: Mode = "eval"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(
                f"{owner}: loss_fn must be callable loss(model, batch) -> scalar tensor, got "
                f"{type(self.loss_fn).__name__}; e.g. "
                "trainprobe.curvature.criterion_loss(nn.CrossEntropyLoss())"
            )
        if self.mode not in ("eval", "train"):
            raise ValueError(
                f"{owner}: mode must be 'eval' or 'train' ('eval': running statistics, no "
                f"dropout), got {self.mode!r}"
            )

    def source(self, ctx: StepContext) -> tuple[LossFn, Any]:
        """The loss and the batch this measurement evaluates (its own, else the step's)."""
        return step_source(ctx, type(self).__name__, self.loss_fn, self.data)

    def objective(self, ctx: StepContext) -> tuple[Objective, Any]:
        """The loss as a function of the selected parameters, and the batch to take it on."""
        loss_fn, batch = self.source(ctx)
        return Objective(ctx.model, loss_fn, params=self.params, mode=self.mode), batch
