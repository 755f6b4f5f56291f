"""One observed training step: what ``Monitor.step`` returns."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._validate import check_logged
from .probes.base import Probe

if TYPE_CHECKING:
    from .monitor import Monitor


class StepHandle:
    """One training step under observation; returned by :meth:`Monitor.step`.

    Entering attaches the hooks of the probes due now (and copies the parameters
    if an update probe is due); leaving removes them — also when the block
    raises — and measures.
    """

    def __init__(
        self,
        monitor: Monitor,
        step: int,
        due: tuple[Probe, ...],
        batch: Any,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> None:
        self.monitor = monitor
        self.step = step
        self.due = due
        self.batch = batch
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.logged: dict[str, Tensor | float] = {}
        self.handles: list[RemovableHandle] = []
        self.params_before: dict[str, Tensor] | None = None

    def log(self, **values: Tensor | float) -> None:
        """Record scalars for this step as ``scalars/<name>`` (e.g. ``loss=loss``).

        Tensors are detached and copied (a snapshot: later in-place changes do not
        leak in) on their device; nothing syncs until the monitor's next flush.
        Logging the same name twice in a step keeps the last.

        Raises:
            TypeError: a value is not a number or a one-element tensor.
        """
        self.logged.update(check_logged(values))

    def __enter__(self) -> StepHandle:
        self.monitor._begin(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.monitor._end(self, failed=exc_type is not None)
