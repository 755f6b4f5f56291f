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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import NonFiniteLoss
from ..notices import warn_user
from ..probes import default_probes
from ..probes.amp import LossScale
from ..probes.base import (
    OnHost,
    PerLayer,
    Probe,
    StepContext,
    Value,
    declared_keys,
    due_schedule,
)
from ..probes.updates import parameter_deltas
from ..store import RunWriter
from ..store.writer import check_open_options
from . import meta as _meta
from .amp import current_scale, measuring, unscaling_factor
from .checks import (
    check_logged,
    check_loss_fn,
    check_measured_with,
    check_model,
    check_optimizer,
    check_options,
    check_probes,
    check_scaler,
    check_step,
    check_written_key,
    checked_finish,
)
from .coordination import RankCoordinator
from .distributed import NullWriter, detect_ranks, unwrap
from .mirror import Mirrors
from .step import MicroStep, StepHandle
from .transfer import to_host

TRAINING_NEEDS = frozenset({"grads", "update", "optimizer"})
"""What a probe reads that an evaluation step (``mon.step(..., evaluation=True)``) lacks."""

NO_OPTIMIZER = "pass optimizer= to watch() or mon.step()"


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
        resume_from: int | None = None,
        overwrite: bool = False,
        scaler: torch.amp.GradScaler | None = None,
        mirror: Any = None,
    ) -> None:
        self.model = check_model(model)
        self.scaler = check_scaler(scaler)
        #: under torch.distributed (two ranks or more), this rank's place; else None
        self.ranks = detect_ranks()
        #: what probes see: DDP's wrapped module (hooks fire inside DDP's forward)
        self.inner = unwrap(self.model)
        self.params = {n: p for n, p in self.inner.named_parameters() if p.requires_grad}
        chosen = check_probes(default_probes() if probes is None else probes)
        if self.scaler is not None and not any(isinstance(p, LossScale) for p in chosen):
            chosen = check_probes([*chosen, LossScale()])  # the scale and the skipped steps
        self.probes = tuple(chosen)
        self._chosen = probes is not None  # the user named the probes (else the defaults)
        self._declared = {p.name: declared_keys(p) for p in self.probes}
        self._due = {p.name: due_schedule(p) for p in self.probes}
        self._keys_seen: set[tuple] = set()  # (probe, key[, PerLayer names]) checked already
        self.optimizer = check_optimizer(optimizer, "watch")
        self.loss_fn = check_loss_fn(loss_fn, "watch")
        self.run_dir = Path(run_dir)
        self.flush_seconds, self.on_probe_error = check_options(flush_seconds, on_probe_error)
        #: under ranks, who opens the store and how failures are decided (else None)
        self._ranks = (
            None
            if self.ranks is None
            else RankCoordinator(
                self.ranks,
                self.probes,
                self.params,
                on_probe_error=self.on_probe_error,
                skip=self._skip,
                disable=self._disable_once,
            )
        )
        check_open_options(resume=resume, resume_from=resume_from, overwrite=overwrite)
        self._open_options = {"resume": resume, "resume_from": resume_from, "overwrite": overwrite}
        self._user_meta = dict(meta or {})
        self._writer: RunWriter | None = None
        self._last_step: int | None = None
        self._open: StepHandle | None = None
        #: the optimizer step whose micro-batches are being accumulated (see step())
        self._accumulating: StepHandle | None = None
        #: the step that ended last and its record (buffered as it ended); its update
        #: probes are measured when the next step begins, when the optimizer has stepped
        self._previous: tuple[StepHandle, dict[str, Value]] | None = None
        self._committed: set[str] = set()  # keys of the previous step already committed
        self._buffer: list[tuple[int, dict[str, Value]]] = []
        self._last_flush = time.monotonic()
        self._disabled: dict[str, str] = {}
        #: steps each probe skipped, its loss non-finite there (functional.NonFiniteLoss)
        self._skipped: dict[str, list[int]] = {}
        #: default probes that had nothing to read at some step (no optimizer), and why
        self._idle: dict[str, str] = {}
        self._optimizer_logged = False
        self._warned_no_grads = False
        #: trackers that get each committed value too and, at close, the run's findings
        self._mirror = Mirrors(mirror)
        #: each probe's last measured_with(), as stored in meta["measured_with"]
        self._measured_with: dict[str, dict[str, Any]] = {}

    # -- context management ------------------------------------------------------------
    def __enter__(self) -> Monitor:
        if self._ranks is None:
            self._writer = RunWriter(self.run_dir, **self._open_options)
            self._last_step = self._writer.last_step
        else:
            self._writer, self._last_step = self._ranks.open_store(self.run_dir, self._open_options)
        self._writer.set_meta(
            _meta.run_start(self.inner, list(self.params), self.probes, self._user_meta)
        )
        if self.ranks is not None:
            self._writer.set_meta({"ranks": {"world": self.ranks.world, "writer": 0}})
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
                if self._ranks is not None and self._previous is not None:
                    self._ranks.closing(self._previous, clean=exc_type is None)
            finally:
                self.flush()  # whatever was measured is written, even if finishing failed
        except BaseException as err:
            failure = failure or f"{type(err).__name__} while closing the monitor: {err}"
            raise
        finally:
            writer, self._writer = self._writer, None
            if writer is not None and not isinstance(writer, NullWriter):
                writer.set_meta(
                    {
                        "status": "finished" if failure is None else f"failed: {failure}",
                        "ended": _meta.now(),
                        "disabled_probes": self._disabled,
                        "skipped_steps": self._skipped,
                        "idle_probes": self._idle,
                    }
                )
                writer.close()
                self._mirror.close(self.run_dir)  # the findings, to the trackers

    # -- the training step ---------------------------------------------------------------
    def step(
        self,
        step: int,
        *,
        batch: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        evaluation: bool = False,
        accumulate: bool = False,
    ) -> StepHandle | MicroStep:
        """Observe training step ``step`` (use as ``with mon.step(...) as s:``).

        Args:
            step: the global step counter; must increase from call to call.
            batch: the step's input, for probes that evaluate on it.
            optimizer: overrides the optimizer given to :func:`watch` for this step.
            loss_fn: overrides the loss closure given to :func:`watch` for this step.
            evaluation: the step trains nothing (an evaluation pass, a last step
                after training): only the probes that read neither gradients, the
                update nor the optimizer run (activations, held-out data, curvature),
                and no warning says that no parameter had a gradient.
            accumulate: gradient accumulation: this block is a micro-batch after which
                the optimizer does not step; the next block, with the same ``step``,
                continues the optimizer step (``accumulate=False`` on the block after
                which it steps). Hooks stay on across the micro-batches, values logged
                with ``s.log`` are averaged over them, the gradient probes measure the
                accumulated gradient once (after the last), the update probes one
                optimizer step, and the curvature probes on the step's batch take every
                micro-batch (their Hessian, weighted by size); other probes that evaluate
                the step's batch see its first micro-batch. Usual loop:
                ``mon.step(i // k, batch=b, accumulate=(i + 1) % k != 0)``.

        Raises:
            ValueError: ``step`` does not increase (or changes while a step still
                accumulates), or the monitor is not entered.
        """
        if self._writer is None:
            raise ValueError(
                "mon.step() used outside `with trainprobe.watch(...) as mon:`; "
                "enter the monitor first"
            )
        for flag, value in (("evaluation", evaluation), ("accumulate", accumulate)):
            if not isinstance(value, bool):
                raise TypeError(
                    f"mon.step({flag}=...) takes True or False, got {type(value).__name__}"
                )
        if self._accumulating is not None:  # a micro-batch of the open optimizer step
            return self._next_micro(step, batch, last=not accumulate)
        check_step(step, self._last_step)
        optimizer = check_optimizer(optimizer, "mon.step") or self.optimizer
        loss_fn = check_loss_fn(loss_fn, "mon.step") or self.loss_fn
        if evaluation and accumulate:
            raise ValueError(
                "mon.step(evaluation=True, accumulate=True): an evaluation step trains "
                "nothing, so it has no gradient to accumulate; pass one of them"
            )
        due = tuple(
            p
            for p in self.probes
            if p.name not in self._disabled
            and self._due[p.name](step)
            and not (evaluation and p.needs & TRAINING_NEEDS)
        )
        handle = StepHandle(
            step,
            due,
            batch=batch,
            optimizer=optimizer,
            loss_fn=loss_fn,
            on_enter=self._begin,
            on_exit=self._end,
        )
        if not accumulate:
            return handle
        self._accumulating = handle
        return MicroStep(handle, batch, first=True, last=False, on_close=self._close_micro)

    def _next_micro(self, step: int, batch: Any, *, last: bool) -> MicroStep:
        handle = self._accumulating
        if step != handle.step:
            raise ValueError(
                f"mon.step({step}) while optimizer step {handle.step} still accumulates (its "
                "last block had accumulate=True); pass accumulate=False on the micro-batch "
                "after which the optimizer steps"
            )
        return MicroStep(handle, batch, first=False, last=last, on_close=self._close_micro)

    def _close_micro(self) -> None:
        self._accumulating = None

    def _begin(self, handle: StepHandle) -> None:
        if self._open is not None:
            raise ValueError(
                f"step {handle.step} entered while step {self._open.step} is still "
                "open; mon.step() blocks cannot nest"
            )
        self._last_step = handle.step
        self._finish_previous()
        if self._ranks is None:  # under ranks the update sums wait for this step's end
            self._flush_if_due()
        self._log_optimizer(handle.optimizer)
        self._open = handle
        try:
            if any("update" in p.needs for p in handle.due):
                handle.keep_params(self.params)
            for probe in handle.due:  # the probes with hooks attach them now
                handle.attach(self.inner, probe, self._attach_failed)
        except BaseException:
            handle.remove_hooks()
            self._open = None
            raise

    def _attach_failed(self, probe: Probe, err: Exception) -> None:
        if self._ranks is not None and self._ranks.hold(probe, err):  # decided at the end
            return
        if self.on_probe_error == "raise":
            raise err
        self._disable(probe, f"attach raised {type(err).__name__}: {err}")

    def _end(self, handle: StepHandle, failed: bool) -> None:
        handle.remove_hooks()
        self._open = None
        handle.loss_scale = current_scale(self.scaler)  # before scaler.update(): the step's own
        values: dict[str, Value] = {f"scalars/{k}": v for k, v in handle.logged.items()}
        if failed:  # keep what was logged; measuring a half-done step would mislead
            handle.take_params()
        else:
            self._check_grads(handle)
            unscale = unscaling_factor(self.scaler, handle.loss_scale, handle.optimizer)
            ctx = self._context(handle, grad_scale=unscale)
            with measuring(
                self.params.values()
            ):  # a block left inside autocast: probes keep their dtype
                for probe in handle.due:
                    if "update" not in probe.needs:
                        self._measure(probe, ctx, values)
        if self._ranks is not None:
            self._ranks.step_ended(handle, values, self._previous)
        self._previous, self._committed = (handle, values), set()
        self._buffer.append((handle.step, values))  # what the step measured, buffered now
        self._flush_if_due()

    def _check_grads(self, handle: StepHandle) -> None:
        """Warn once when gradient probes are due but no parameter holds a gradient."""
        if self._warned_no_grads or not any("grads" in p.needs for p in handle.due):
            return
        if not any(p.grad is not None for p in self.params.values()):  # stops at the first
            self._warned_no_grads = True
            warn_user(
                f"trainprobe: no parameter had a gradient when step {handle.step} ended, so "
                "gradient probes recorded nothing; call loss.backward() inside the "
                "`with mon.step(...)` block and optimizer.zero_grad() after it (a hand-written "
                "update can step on p.grad as well), or mark a step that trains nothing "
                "with mon.step(step, evaluation=True)"
            )

    def _finish_previous(self) -> None:
        """Measure the last step's update probes (the optimizer has stepped) into its record."""
        if self._previous is None:
            return
        handle, values = self._previous
        before = handle.take_params()  # released by the handle
        if before is None:
            return
        used, now = handle.loss_scale, current_scale(self.scaler)
        ctx = self._context(
            handle,
            update=parameter_deltas(self.params, before),
            params_before=before,
            loss_scale=None if used is None or now is None else (used, now),
        )
        with measuring(self.params.values()):
            for probe in handle.due:
                if "update" in probe.needs:
                    self._measure(probe, ctx, self._record_of(handle, values))

    def _record_of(self, handle: StepHandle, values: dict[str, Value]) -> dict[str, Value]:
        """The buffered record of ``handle``'s step to add values to: ``values`` while it is
        in the buffer, else (committed already) a new record of the same step, whose keys
        must not repeat the committed ones (the store is append-only)."""
        if any(v is values for _, v in self._buffer):
            return values
        self._committed |= values.keys()
        extra: dict[str, Value] = {}
        self._buffer.append((handle.step, extra))
        self._previous = (handle, extra)
        return extra

    def _context(self, handle: StepHandle, **extra: Any) -> StepContext:
        return StepContext(
            step=handle.step,
            model=self.inner,
            params=self.params,
            batch=handle.batch,
            optimizer=handle.optimizer,
            logged=handle.logged,
            loss_fn=handle.loss_fn,
            ranks=self.ranks,
            batches=handle.batches if len(handle.batches) > 1 else None,
            **extra,
        )

    def _measure(self, probe: Probe, ctx: StepContext, values: dict[str, Value]) -> None:
        if probe.name in self._disabled:
            return
        if "scaler" in probe.needs and self.scaler is None:
            self._disable(probe, "needs an AMP GradScaler: pass scaler= to watch()")
            return
        if "optimizer" in probe.needs and ctx.optimizer is None:
            if self._chosen:
                self._disable(probe, f"needs an optimizer: {NO_OPTIMIZER}")
            else:  # a default probe in a loop without one (a hand-written update): no noise
                self._idle.setdefault(
                    probe.name, f"no optimizer at step {ctx.step}: {NO_OPTIMIZER}"
                )
            return
        try:
            measured = probe.measure(ctx)
            how = getattr(probe, "measured_with", None)
            ran = None if how is None else check_measured_with(probe.name, how())
        except NonFiniteLoss as err:  # one bad batch: this step only, the probe stays on
            if self._ranks is None or not self._ranks.hold(probe, err, skipped=True):
                self._skip(probe, ctx.step, err)
            return
        except Exception as err:
            if self._ranks is not None and self._ranks.hold(probe, err):  # decided at the end
                return
            if self.on_probe_error == "raise":
                raise
            self._disable(probe, f"raised {type(err).__name__}: {err}")
            return
        values.update(self._checked_keys(probe.name, measured))
        if ran:
            self._store_measured_with(probe.name, ran)

    def _store_measured_with(self, name: str, ran: dict[str, Any]) -> None:
        """Keep ``meta["measured_with"][name]`` (how the probe's measurement ran, see
        :mod:`trainprobe.probes.base`) up to date, written when it changes. The section
        holds this monitor's probes: a resumed run's earlier entries give way to them at
        their first measurement."""
        if self._measured_with.get(name) == ran:
            return
        self._measured_with[name] = ran
        if self._writer is not None:  # a NullWriter on ranks other than 0
            self._writer.set_meta({"measured_with": self._measured_with})

    def _checked_keys(self, name: str, measured: Mapping[str, Value]) -> dict[str, Value]:
        """``measured``, each key checked against the probe's declared patterns (once per
        key, or per PerLayer's names; an OnHost value's keys when it is finished)."""
        declared = self._declared[name]
        out = dict(measured)
        for key, value in measured.items():
            if isinstance(value, OnHost):
                finish = partial(checked_finish, value.finish, name, declared)
                out[key] = replace(value, finish=finish)
                continue
            seen = (name, key, value.names) if isinstance(value, PerLayer) else (name, key)
            if seen in self._keys_seen:
                continue
            if isinstance(value, PerLayer):
                for layer in value.names:
                    check_written_key(name, declared, f"{key}/{layer}")
            else:
                check_written_key(name, declared, key)
            self._keys_seen.add(seen)
        return out

    def _skip(self, probe: Probe, step: int, err: Exception | str) -> None:
        """Record that ``probe`` measured nothing at ``step`` (warned once per probe)."""
        steps = self._skipped.setdefault(probe.name, [])
        if not steps:
            warn_user(
                f"trainprobe: probe {probe.name!r} skipped step {step}: {err}; it stays on "
                "(the run metadata lists the steps it skipped)"
            )
        steps.append(step)

    def _disable_once(self, probe: Probe, reason: str) -> None:
        if probe.name not in self._disabled:
            self._disable(probe, reason)

    def _disable(self, probe: Probe, reason: str) -> None:
        self._disabled[probe.name] = reason
        warn_user(f"trainprobe: probe {probe.name!r} disabled for the rest of the run: {reason}")

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
        handle, current = self._previous
        logged = {f"scalars/{k}": v for k, v in check_logged(values).items()}
        record = self._record_of(handle, current)  # not committed yet: the last value wins
        again = sorted(k for k in logged if k in self._committed)
        if again:
            warn_user(
                f"trainprobe: {again} were already committed for step {handle.step} (the "
                "flush at the step's end), so these later values are dropped; log each "
                "name once per step, or raise flush_seconds"
            )
        record.update({k: v for k, v in logged.items() if k not in self._committed})

    def log_clip(self, total_norm: Tensor | float, max_norm: float) -> None:
        """Record the gradient clipping of the step that just ended, from what
        ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` returned (no extra pass):
        ``scalars/grad_norm_preclip`` (its ``total_norm``) and ``scalars/clip_coef``, the
        factor the gradient was multiplied by, ``min(1, max_norm / (total_norm + 1e-6))``
        (torch's formula). Device tensors stay on the device.

        The gradient probes measure when the step block ends: clip after the block and
        they read the pre-clip gradient; clip inside it and they read the clipped one
        (this records the pre-clip norm either way).

        Raises:
            ValueError: ``max_norm`` is not a positive finite number, or no step ended yet.
        """
        if isinstance(max_norm, bool) or not isinstance(max_norm, int | float):
            raise ValueError(f"mon.log_clip: max_norm must be a number, got {max_norm!r}")
        if not 0 < float(max_norm) < float("inf"):
            raise ValueError(f"mon.log_clip: max_norm must be positive and finite, got {max_norm}")
        if isinstance(total_norm, Tensor):
            coef = torch.clamp(float(max_norm) / (total_norm.detach() + 1e-6), max=1.0)
        else:
            coef = min(1.0, float(max_norm) / (float(total_norm) + 1e-6))
        self.log(grad_norm_preclip=total_norm, clip_coef=coef)

    def flush(self) -> None:
        """Move buffered values to the host (one transfer) and commit them in one transaction."""
        if isinstance(self._writer, NullWriter):  # under ranks, rank 0 writes
            self._buffer = []
        elif self._writer is not None:
            pending = [(step, values) for step, values in self._buffer if values]
            if pending:
                records = to_host(pending, self._expansion_failed)
                self._writer.append(records)
                self._mirror.write(records)  # committed: the trackers get the same values
            self._buffer = []  # only once committed: a failed write is retried at the next flush
        self._last_flush = time.monotonic()

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _expansion_failed(self, key: str, err: Exception) -> None:
        """A probe's value could not be moved to the host: the error policy decides."""
        probe = next((p for p in self.probes if key.startswith(f"{p.name}/")), None)
        if self.on_probe_error == "raise" or probe is None:
            raise err
        if self.ranks is not None:  # only rank 0 flushes: disabling here would split the ranks
            warn_user(f"trainprobe: value {key!r} dropped: {type(err).__name__}: {err}")
            return
        if probe.name not in self._disabled:
            self._disable(
                probe, f"its value {key!r} failed on the host: {type(err).__name__}: {err}"
            )
