"""Mixed precision as the monitor sees it: the loss scale of an AMP ``GradScaler`` (read
from its device tensor, no sync), the factor that unscales ``.grad`` while it is still
scaled, and autocast off while probes measure."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor

from ..functional import no_autocast


def current_scale(scaler: Any) -> Tensor | None:
    """The scaler's current scale (a copy of its device tensor; no sync), or None
    (no scaler, a disabled one, or one that has not scaled a loss yet)."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return None if scale is None or not scaler.is_enabled() else scale.detach().clone()


def unscaling_factor(
    scaler: Any, scale: Tensor | None, optimizer: torch.optim.Optimizer | None
) -> Tensor | None:
    """``1 / scale`` (0-d) while the gradients of ``optimizer`` are still multiplied by the
    loss scale (:func:`still_scaled`), None once the user called
    ``scaler.unscale_(optimizer)`` (or without a scale)."""
    if scale is None or not still_scaled(scaler, optimizer):
        return None
    return scale.double().reciprocal().reshape(())


def still_scaled(scaler: Any, optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer``'s gradients are still multiplied by ``scaler``'s loss scale
    (``scaler.unscale_(optimizer)`` not called since its last update; fused optimizers
    unscale inside their own ``step``). ``GradScaler`` has no public query: its
    per-optimizer stage is what ``unscale_`` and ``step`` consult."""
    if scaler is None or not scaler.is_enabled() or optimizer is None:
        return False
    stage = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {}).get("stage")
    return getattr(stage, "name", None) != "UNSCALED"


def measuring(params: Iterable[Tensor]) -> ExitStack:
    """Autocast off on the CPU and the parameters' devices: a step block left inside the
    user's ``torch.autocast`` must not run the probes' maths in bf16/fp16."""
    stack = ExitStack()
    kinds = {"cpu"} | {p.device.type for p in params}
    for kind in sorted(kinds):
        stack.enter_context(no_autocast(torch.device(kind)))
    return stack
