"""A NaN/Inf guard on the loss, the gradients and the parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._tensors import first_true, stacked_norms
from .base import StepContext, Value
from .schedules import Schedule, check_schedule, every


class NonFiniteGuard:
    """Counts parameter tensors whose gradient or value holds NaN/Inf, every step.

    A tensor is flagged when its L2 norm is not finite (one fused norm call per
    list, no host sync): any NaN or Inf element makes the norm non-finite; so
    does a norm beyond the float range, which is as fatal for training.

    Keys:
        ``nonfinite/loss``: 1.0 when the value logged as ``loss`` is NaN/Inf, else 0.0
        (only when a loss is logged); ``nonfinite/grad``, ``nonfinite/param``: how
        many parameter tensors are non-finite; ``nonfinite/first_grad``,
        ``nonfinite/first_param``: index into the run's ``meta["model"]["params"]``
        of the first one, -1 when none.

    Args:
        schedule: when to check (default every step).
    """

    name = "nonfinite"
    needs = frozenset({"grads", "logged"})

    def __init__(self, *, schedule: Schedule | None = None) -> None:
        self.schedule = every(1) if schedule is None else schedule
        check_schedule(self.schedule, "NonFiniteGuard")

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        out: dict[str, Value] = {}
        loss = ctx.logged.get("loss")
        if loss is not None:
            out["nonfinite/loss"] = (~torch.isfinite(torch.as_tensor(loss))).any().float()
        params = list(ctx.params.values())
        indexed = [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]
        tensors = [p.detach() for p in params] + [g.detach() for _, g in indexed]
        bad = ~torch.isfinite(stacked_norms(tensors))  # [L + L'], one fused norm call
        bad_params, bad_grads = bad[: len(params)], bad[len(params) :]
        out["nonfinite/param"] = bad_params.sum()
        out["nonfinite/first_param"] = first_true(bad_params)
        if indexed:
            index = torch.tensor([i for i, _ in indexed], device=bad.device)  # [L']
            first = first_true(bad_grads)
            out["nonfinite/grad"] = bad_grads.sum()
            out["nonfinite/first_grad"] = torch.where(first >= 0, index[first.clamp(min=0)], first)
        return out

    def settings(self) -> dict[str, Any]:
        return {}
