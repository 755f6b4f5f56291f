"""Thin adapters that run :func:`trainprobe.watch` inside a training framework.

- :mod:`.lightning`: ``TrainprobeCallback`` for Lightning's ``Trainer`` (extra ``lightning``);
- :mod:`.hf`: ``TrainprobeCallback`` for the Hugging Face ``Trainer`` (extra ``hf``).

Each maps the framework's events to one ``mon.step(...)`` block per optimizer step: entered
before the first micro-batch's forward, left at the last event before the optimizer steps.
Neither imports its framework here, so ``import trainprobe.integrations`` needs no extra.
:func:`end_step` is what both do when the block is left: it refuses, loudly, gradients the
probes cannot read (still multiplied by an AMP loss scale, or held outside ``p.grad``);
:func:`open_monitor` and :func:`close_monitor` open and close the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..monitor import Monitor, StepHandle, watch
from ..monitor.amp import still_scaled
from ..probes.base import Probe


def open_monitor(
    model: nn.Module,
    probes: Sequence[Probe] | None,
    *,
    run_dir: str | Path | None,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None,
    options: Mapping[str, Any],
    integration: Mapping[str, str],
) -> Monitor:
    """``watch(model, probes, ..., **options)``, entered; ``integration`` (the framework and
    which gradient the probes measure) is added to the run's ``meta``."""
    options = dict(options)
    meta = {**(options.pop("meta", None) or {}), "integration": dict(integration)}
    monitor = watch(
        model, probes, run_dir=run_dir, optimizer=optimizer, loss_fn=loss_fn, meta=meta, **options
    )
    return monitor.__enter__()


def close_monitor(monitor: Monitor | None, error: BaseException | None) -> None:
    """Close ``monitor`` (None: nothing to close): ``finished``, or ``failed`` with ``error``;
    an open step block is left as failed and its hooks removed."""
    if monitor is not None:
        kind = None if error is None else type(error)
        monitor.__exit__(kind, error, None if error is None else error.__traceback__)


def gradient_problem(
    handle: StepHandle,
    params: Mapping[str, Tensor],
    *,
    event: str,
    seen_grads: bool,
    scaler: torch.amp.GradScaler | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> str | None:
    """Why the gradient probes due in ``handle`` cannot read ``params``' gradients, or None.

    Args:
        handle: the step block about to be left.
        params: the watched (trainable) parameters.
        event: the framework event leaving the block, for the message.
        seen_grads: an earlier step of this run had gradients (then a step without any is a
            skipped step, which the monitor reports; not a setup that can never work).
        scaler: the AMP ``GradScaler`` of ``optimizer``, if any.
        optimizer: the optimizer about to step.
    """
    if not any("grads" in probe.needs for probe in handle.due):
        return None
    if still_scaled(scaler, optimizer):  # fused optimizers unscale inside step()
        return (
            f"the gradients at {event} of step {handle.step} are still multiplied by the "
            f"fp16 loss scale ({type(optimizer).__name__} unscales inside its step(), e.g. a "
            "fused optimizer), so gradient probes would read scaled values; use an optimizer "
            "without fused=True, or bf16 (no GradScaler), or drop the gradient probes"
        )
    if not seen_grads and all(p.grad is None for p in params.values()):
        return (
            f"no parameter holds a .grad at {event} of step {handle.step}: the gradients live "
            "elsewhere (DeepSpeed ZeRO keeps them partitioned inside its engine) or backward "
            "never reached the parameters; gradient probes cannot measure this setup: train "
            "without ZeRO stage 2/3, or drop the gradient probes (norms, conflict, noise)"
        )
    return None


def end_step(
    handle: StepHandle,
    params: Mapping[str, Tensor],
    *,
    event: str,
    seen_grads: bool,
    scaler: torch.amp.GradScaler | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> bool:
    """Leave ``handle``'s step block (the probes measure now); see :func:`gradient_problem`.

    Returns:
        Whether ``seen_grads`` holds after this step (some parameter had a gradient).

    Raises:
        RuntimeError: the probes cannot read the gradients; the block is left as failed first
            (hooks removed, nothing measured), and the message names the cause and the fix.
    """
    problem = gradient_problem(
        handle, params, event=event, seen_grads=seen_grads, scaler=scaler, optimizer=optimizer
    )
    if problem is not None:
        error = RuntimeError(f"trainprobe: {problem}")
        handle.__exit__(RuntimeError, error, None)
        raise error
    handle.__exit__(None, None, None)
    return seen_grads or any(p.grad is not None for p in params.values())
