"""One observed training step: what ``Monitor.step`` returns.

The handle owns what belongs to one step: the probes due, their hooks, the copy of
the parameters an update probe needs, and the values logged with :meth:`StepHandle.log`.
The monitor decides which probes are due and what happens to the measurements; it
hands the handle two callbacks, for entering and leaving the block, and never writes
the handle's fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..probes.base import Probe
from ..probes.updates import kept_params
from .checks import check_logged


class StepHandle:
    """One training step under observation; returned by :meth:`Monitor.step`.

    Entering attaches the hooks of the probes due now (and copies the parameters
    if an update probe is due); leaving removes them — also when the block
    raises — and measures.

    Attributes:
        step: the training step.
        due: the probes due at this step.
        batch, optimizer, loss_fn: what this step's probes read.
        logged: the values given to :meth:`log`.
    """

    def __init__(
        self,
        step: int,
        due: tuple[Probe, ...],
        *,
        batch: Any,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None,
        on_enter: Callable[[StepHandle], None],
        on_exit: Callable[[StepHandle, bool], None],
    ) -> None:
        self.step, self.due = step, due
        self.batch, self.optimizer, self.loss_fn = batch, optimizer, loss_fn
        self.logged: dict[str, Tensor | float] = {}
        self._on_enter, self._on_exit = on_enter, on_exit
        self._hooks: list[RemovableHandle] = []
        self._before: dict[str, Tensor] | None = None
        #: the AMP loss scale when the block ended (set by the monitor), else None
        self.loss_scale: Tensor | None = None
        #: the micro-batches of an accumulated optimizer step (see :class:`MicroStep`)
        self.batches: list[Any] = [] if batch is None else [batch]
        self._sums: dict[str, Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def log_micro(self, values: Mapping[str, Tensor | float]) -> None:
        """Values logged in one micro-batch: ``logged`` holds each name's mean so far."""
        for name, value in check_logged(values).items():
            total = self._sums.get(name)
            self._sums[name] = value if total is None else total + value
            self._counts[name] = self._counts.get(name, 0) + 1
            self.logged[name] = self._sums[name] / self._counts[name]

    def log(self, **values: Tensor | float) -> None:
        """Record scalars for this step as ``scalars/<name>`` (e.g. ``loss=loss``).

        Tensors are detached and copied (a snapshot: later in-place changes do not
        leak in) on their device; nothing syncs until the monitor's next flush.
        Logging the same name twice in a step keeps the last.

        Raises:
            TypeError: a value is not a number or a one-element tensor.
        """
        self.logged.update(check_logged(values))

    # -- what the monitor asks of the handle ---------------------------------------------
    def attach(
        self, model: nn.Module, probe: Probe, on_error: Callable[[Probe, Exception], None]
    ) -> None:
        """Attach ``probe``'s hooks to ``model`` (if it has an ``attach``); ``on_error``
        decides on a failure."""
        attach = getattr(probe, "attach", None)
        if attach is None:
            return
        try:
            self._hooks.extend(attach(model))
        except Exception as err:
            on_error(probe, err)

    def keep_params(self, params: Mapping[str, Tensor]) -> None:
        """Copy ``params`` now (one fused copy), for the update measured after the step."""
        self._before = kept_params(params)  # DTensor shards (FSDP2) and others apart

    @property
    def holds_params(self) -> bool:
        """Whether the parameter copy is still held (until the update is measured)."""
        return self._before is not None

    def take_params(self) -> dict[str, Tensor] | None:
        """The copy from :meth:`keep_params` (None if none), released by the handle."""
        before, self._before = self._before, None
        return before

    def remove_hooks(self) -> None:
        """Remove every hook this step attached (idempotent)."""
        while self._hooks:
            self._hooks.pop().remove()

    # -- the with-block --------------------------------------------------------------------
    def __enter__(self) -> StepHandle:
        self._on_enter(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._on_exit(self, exc_type is not None)


class MicroStep:
    """One micro-batch of an accumulated optimizer step (``mon.step(..., accumulate=...)``).

    The first micro-batch enters the shared :class:`StepHandle` (hooks attached, the
    parameters copied for update probes); the last leaves it (hooks removed, probes
    measure the accumulated gradient). A micro-batch that raises leaves it as failed.
    ``log`` averages each name over the micro-batches that log it.
    """

    def __init__(
        self,
        handle: StepHandle,
        batch: Any,
        *,
        first: bool,
        last: bool,
        on_close: Callable[[], None],
    ) -> None:
        self.handle, self.first, self.last = handle, first, last
        self.step = handle.step
        self._batch, self._on_close = batch, on_close

    def log(self, **values: Tensor | float) -> None:
        """Record scalars for the optimizer step, averaged over its micro-batches."""
        self.handle.log_micro(values)

    def __enter__(self) -> MicroStep:
        if self.first:
            self.handle.__enter__()
        elif self._batch is not None:
            self.handle.batches.append(self._batch)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None or self.last:
            self._on_close()
            self.handle.__exit__(exc_type, exc, tb)
