"""The only orchestrator: due probes -> hooks -> measure -> one record per step -> store.

Usage::

    with trainprobe.watch(model, run_dir="runs/exp1", optimizer=opt) as mon:
        for step, (x, y) in enumerate(loader):
            with mon.step(step, batch=(x, y)) as s:
                loss = loss_fn(model(x), y)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from . import _meta
from ._transfer import to_host
from ._validate import (
    check_logged,
    check_loss_fn,
    check_model,
    check_optimizer,
    check_options,
    check_probes,
    check_step,
)
from .probes import default_probes
from .probes.base import Probe, StepContext, Value
from .probes.updates import parameter_deltas
from .step import StepHandle
from .store import RunWriter


class Monitor:
    """Runs probes on their schedules and writes one record per step; see :func:`watch`."""

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[Probe] | None,
        *,
        run_dir: str | Path,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None,
        resume: bool,
        flush_seconds: float,
        on_probe_error: str,
        meta: Mapping[str, Any] | None,
    ) -> None:
        self.model = check_model(model)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.probes = tuple(check_probes(default_probes() if probes is None else probes))
        self.optimizer = check_optimizer(optimizer, "watch")
        self.loss_fn = check_loss_fn(loss_fn, "watch")
        self.run_dir = Path(run_dir)
        self.flush_seconds, self.on_probe_error = check_options(flush_seconds, on_probe_error)
        self._resume = resume
        self._user_meta = dict(meta or {})
        self._writer: RunWriter | None = None
        self._last_step: int | None = None
        self._open: StepHandle | None = None
        self._previous: tuple[StepHandle, dict[str, Value]] | None = None  # ended, not buffered
        self._buffer: list[tuple[int, dict[str, Value]]] = []
        self._last_flush = time.monotonic()
        self._disabled: dict[str, str] = {}
        self._optimizer_logged = False
        self._warned_no_grads = False

    # -- context management ------------------------------------------------------------
    def __enter__(self) -> Monitor:
        self._writer = RunWriter(self.run_dir, resume=self._resume)
        self._last_step = self._writer.last_step
        self._writer.set_meta(
            _meta.run_start(self.model, list(self.params), self.probes, self._user_meta)
        )
        self._log_optimizer(self.optimizer)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failure = None if exc_type is None else f"{exc_type.__name__}: {exc}"
        try:
            try:
                if self._open is not None:  # the step block never closed (generator abandoned)
                    self._end(self._open, failed=True)
                self._finish_previous()
            finally:
                self.flush()  # whatever was measured is written, even if finishing failed
        except BaseException as err:
            failure = failure or f"{type(err).__name__} while closing the monitor: {err}"
            raise
        finally:
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.set_meta({
                    "status": "finished" if failure is None else f"failed: {failure}",
                    "ended": _meta.now(),
                    "disabled_probes": self._disabled,
                })  # fmt: skip
                writer.close()

    # -- the training step ---------------------------------------------------------------
    def step(
        self,
        step: int,
        *,
        batch: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> StepHandle:
        """Observe training step ``step`` (use as ``with mon.step(...) as s:``).

        Args:
            step: the global step counter; must increase from call to call.
            batch: the step's input, for probes that evaluate on it.
            optimizer: overrides the optimizer given to :func:`watch` for this step.
            loss_fn: overrides the loss closure given to :func:`watch` for this step.

        Raises:
            ValueError: ``step`` does not increase, or the monitor is not entered.
        """
        if self._writer is None:
            raise ValueError(
                "mon.step() used outside `with trainprobe.watch(...) as mon:`; "
                "enter the monitor first"
            )
        check_step(step, self._last_step)
        optimizer = check_optimizer(optimizer, "mon.step") or self.optimizer
        loss_fn = check_loss_fn(loss_fn, "mon.step") or self.loss_fn
        due = tuple(p for p in self.probes if p.name not in self._disabled and p.schedule(step))
        return StepHandle(self, step, due, batch, optimizer, loss_fn)

    def _begin(self, handle: StepHandle) -> None:
        if self._open is not None:
            raise ValueError(
                f"step {handle.step} entered while step {self._open.step} is still "
                "open; mon.step() blocks cannot nest"
            )
        self._last_step = handle.step
        self._finish_previous()
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()
        self._log_optimizer(handle.optimizer)
        self._open = handle
        try:
            if any("update" in p.needs for p in handle.due):
                handle.params_before = dict(
                    zip(
                        self.params,
                        torch._foreach_mul([p.detach() for p in self.params.values()], 1.0),
                        strict=True,
                    )
                )
            for probe in handle.due:
                self._attach(probe, handle)
        except BaseException:
            self._remove_hooks(handle)
            self._open = None
            raise

    def _attach(self, probe: Probe, handle: StepHandle) -> None:
        try:
            handle.handles.extend(probe.attach(self.model))
        except Exception as err:
            if self.on_probe_error == "raise":
                raise
            self._disable(probe, f"attach raised {type(err).__name__}: {err}")

    def _end(self, handle: StepHandle, *, failed: bool) -> None:
        self._remove_hooks(handle)
        self._open = None
        values: dict[str, Value] = {f"scalars/{k}": v for k, v in handle.logged.items()}
        if failed:  # keep what was logged; measuring a half-done step would mislead
            handle.params_before = None
        else:
            self._check_grads(handle)
            ctx = self._context(handle)
            for probe in handle.due:
                if "update" not in probe.needs:
                    self._measure(probe, ctx, values)
        self._previous = (handle, values)

    def _check_grads(self, handle: StepHandle) -> None:
        """Warn once when gradient probes are due but no parameter holds a gradient."""
        if self._warned_no_grads or not any("grads" in p.needs for p in handle.due):
            return
        if not any(p.grad is not None for p in self.params.values()):  # stops at the first
            self._warned_no_grads = True
            warnings.warn(
                f"trainprobe: no parameter had a gradient when step {handle.step} ended, so "
                "gradient probes recorded nothing; call loss.backward() inside the "
                "`with mon.step(...)` block and optimizer.zero_grad() after it",
                RuntimeWarning,
                stacklevel=4,
            )

    def _finish_previous(self) -> None:
        """Measure update probes of the last step (the optimizer has stepped) and buffer it."""
        if self._previous is None:
            return
        handle, values = self._previous
        self._previous = None
        before, handle.params_before = handle.params_before, None  # release the copy
        try:
            if before is not None:
                ctx = self._context(
                    handle, update=parameter_deltas(self.params, before), params_before=before
                )
                for probe in handle.due:
                    if "update" in probe.needs:
                        self._measure(probe, ctx, values)
        finally:  # what the step already measured is kept even if an update probe raises
            if values:
                self._buffer.append((handle.step, values))

    def _context(self, handle: StepHandle, **extra: Any) -> StepContext:
        return StepContext(
            step=handle.step,
            model=self.model,
            params=self.params,
            batch=handle.batch,
            optimizer=handle.optimizer,
            logged=handle.logged,
            loss_fn=handle.loss_fn,
            **extra,
        )

    def _measure(self, probe: Probe, ctx: StepContext, values: dict[str, Value]) -> None:
        if probe.name in self._disabled:
            return
        if "optimizer" in probe.needs and ctx.optimizer is None:
            self._disable(probe, "needs an optimizer: pass optimizer= to watch() or mon.step()")
            return
        try:
            measured = probe.measure(ctx)
        except Exception as err:
            if self.on_probe_error == "raise":
                raise
            self._disable(probe, f"raised {type(err).__name__}: {err}")
            return
        for key in measured:
            if not key.startswith(f"{probe.name}/"):
                raise ValueError(
                    f"probe {probe.name!r} wrote key {key!r}; its keys must start "
                    f"with '{probe.name}/'"
                )
        values.update(measured)

    def _disable(self, probe: Probe, reason: str) -> None:
        self._disabled[probe.name] = reason
        warnings.warn(
            f"trainprobe: probe {probe.name!r} disabled for the rest of the run: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )

    def _remove_hooks(self, handle: StepHandle) -> None:
        while handle.handles:
            handle.handles.pop().remove()

    def _log_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is not None and not self._optimizer_logged and self._writer is not None:
            self._writer.set_meta({"optimizer": _meta.optimizer_summary(optimizer)})
            self._optimizer_logged = True

    # -- storage -------------------------------------------------------------------------
    def log(self, **values: Tensor | float) -> None:
        """Record scalars for the last step (e.g. an evaluation after the step block)."""
        if self._previous is None:
            raise ValueError(
                "mon.log() records into the step that just ended; call it after a "
                "`with mon.step(...)` block, or use s.log() inside it"
            )
        self._previous[1].update({f"scalars/{k}": v for k, v in check_logged(values).items()})

    def flush(self) -> None:
        """Move buffered values to the host (one transfer) and commit them in one transaction."""
        if self._buffer and self._writer is not None:
            records = to_host(self._buffer, self._expansion_failed)
            self._writer.append(records)
            self._buffer = []  # only once committed: a failed write is retried at the next flush
        self._last_flush = time.monotonic()

    def _expansion_failed(self, key: str, err: Exception) -> None:
        """A probe's value could not be moved to the host: the error policy decides."""
        probe = next((p for p in self.probes if key.startswith(f"{p.name}/")), None)
        if self.on_probe_error == "raise" or probe is None:
            raise err
        if probe.name not in self._disabled:
            self._disable(
                probe, f"its value {key!r} failed on the host: {type(err).__name__}: {err}"
            )


def watch(
    model: nn.Module,
    probes: Sequence[Probe] | None = None,
    *,
    run_dir: str | Path | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    resume: bool = False,
    flush_seconds: float = 2.0,
    on_probe_error: str = "warn",
    meta: Mapping[str, Any] | None = None,
) -> Monitor:
    """Watch ``model`` while it trains; use as ``with watch(model, ...) as mon:``.

    Args:
        model: any ``nn.Module`` with trainable parameters.
        probes: probe instances; default :func:`trainprobe.probes.default_probes`.
        run_dir: where the run is stored (default ``runs/run-<UTC time>``).
        optimizer: lets probes read the learning rate and optimizer state.
        loss_fn: ``loss(model, batch) -> scalar``, for probes that evaluate the loss
            themselves (Hessian, sharpness): e.g.
            ``trainprobe.curvature.criterion_loss(nn.CrossEntropyLoss())``.
        resume: append to an existing run in ``run_dir`` (steps must go on past it).
        flush_seconds: values are buffered on the device and committed at most this
            long after they were measured (0: every step); a process killed in between
            loses only the buffered steps.
        on_probe_error: ``"warn"`` disables a probe that raises (training goes on);
            ``"raise"`` propagates the error.
        meta: extra JSON-serialisable metadata stored with the run (config, seed, ...).

    Raises:
        TypeError: ``model`` is not a module, a probe is a class or not a probe.
        ValueError: no trainable parameters, duplicate probe names, bad options.
        FileExistsError: ``run_dir`` already holds a run and ``resume`` is false.
    """
    if run_dir is None:
        run_dir = Path("runs") / time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    return Monitor(
        model,
        probes,
        run_dir=run_dir,
        optimizer=optimizer,
        loss_fn=loss_fn,
        resume=resume,
        flush_seconds=flush_seconds,
        on_probe_error=on_probe_error,
        meta=meta,
    )
