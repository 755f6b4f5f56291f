"""Update norms and the update/weight ratio, ``||Δw|| / ||w||``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._tensors import stacked_norms, total_norm
from .base import PerLayer, StepContext, Value
from .schedules import Schedule, check_schedule, every


class UpdateNorms:
    """How far each parameter tensor moved in one optimizer step, absolutely and relatively.

    ``Δw = w_after − w_before`` where ``w_before`` is copied when a due step starts
    (the only steps that pay for the copy) and ``w_after`` is read when the next
    step starts (or the monitor closes), so anything that changed the parameters
    in between — optimizer step, weight decay, clamping, EMA swaps — is counted.

    The ratio ``||Δw||/||w||`` is scale-free; around 1e-3 per step is the usual
    healthy band for SGD/Adam training (much larger: the learning rate is too high
    for that layer; much smaller: the layer barely learns). It is undefined for a
    tensor that is exactly zero before the step (zero-initialised biases, LoRA B,
    LayerScale at 0): the probe writes NaN there rather than a huge number.

    Keys:
        ``updates/norm/<param>``, ``updates/ratio/<param>``;
        ``updates/norm_total`` (global ``||Δw||``), ``updates/ratio_total``
        (``||Δw|| / ||w||`` over all parameters).

    Args:
        schedule: when to measure (default every 10 steps).
    """

    name = "updates"
    needs = frozenset({"update"})

    def __init__(self, *, schedule: Schedule | None = None) -> None:
        self.schedule = every(10) if schedule is None else schedule
        check_schedule(self.schedule, "UpdateNorms")

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if ctx.update is None or ctx.params_before is None:
            raise ValueError("UpdateNorms needs ctx.update; declare needs={'update'}")
        names = tuple(ctx.update)
        deltas = stacked_norms(list(ctx.update.values()))  # [L]
        weights = stacked_norms([ctx.params_before[n] for n in names])  # [L]
        weights_total = total_norm(weights)
        deltas_total = total_norm(deltas)
        return {
            "updates/norm": PerLayer(names, deltas),
            "updates/ratio": PerLayer(names, _ratio(deltas, weights)),
            "updates/norm_total": deltas_total,
            "updates/ratio_total": _ratio(deltas_total, weights_total),
        }

    def settings(self) -> dict[str, Any]:
        return {}


def _ratio(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``deltas / weights``, NaN where ``weights == 0`` (the ratio is undefined there)."""
    return torch.where(weights > 0, deltas / weights, torch.full_like(deltas, float("nan")))


def parameter_deltas(
    params: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{name: params[name] - before[name]}`` with one fused subtraction."""
    names = list(before)
    diffs = torch._foreach_sub([params[n].detach() for n in names], [before[n] for n in names])
    return dict(zip(names, diffs, strict=True))
