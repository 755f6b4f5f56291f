"""Update norms and the update/weight ratio, ``||Δw|| / ||w||``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..keys import Key
from .base import PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .tensors import stacked_norms, total_norm


@dataclass(frozen=True, kw_only=True, eq=False)
class UpdateNorms(ProbeOptions):
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

    Keys: see ``keys``.

    Args:
        schedule: when to measure (default every 10 steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "updates"
    schedule: Schedule = every(10)
    keys = (
        Key(
            "updates/norm/<param>",
            "‖Δw‖_2 of one optimizer step per tensor; the update-ratio row divides it by ‖w‖",
        ),
        Key("updates/ratio/<param>", "‖Δw‖ / ‖w‖ of one tensor (NaN where w is zero)"),
        Key("updates/norm_total", "the global ‖Δw‖ over all trainable parameters"),
        Key("updates/ratio_total", "‖Δw‖ / ‖w‖ over all trainable parameters"),
    )
    needs = frozenset({"update"})

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if ctx.update is None or ctx.params_before is None:
            raise ValueError("UpdateNorms needs ctx.update; declare needs={'update'}")
        names = tuple(ctx.update)
        deltas = stacked_norms(list(ctx.update.values()))  # [L]
        weights = stacked_norms([ctx.params_before[n] for n in names])  # [L]
        weights_total = total_norm(weights)
        deltas_total = total_norm(deltas)
        return {
            f"{self.name}/norm": PerLayer(names, deltas),
            f"{self.name}/ratio": PerLayer(names, _ratio(deltas, weights)),
            f"{self.name}/norm_total": deltas_total,
            f"{self.name}/ratio_total": _ratio(deltas_total, weights_total),
        }


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
