"""The change of the weights between consecutive checkpoints (an offline-only probe)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..keys import Key
from ..probes.base import PerLayer, ProbeOptions, StepContext, Value
from ..probes.schedules import Schedule, every
from ..probes.tensors import stacked_norms, total_norm


@dataclass(frozen=True, kw_only=True, eq=False)
class CheckpointUpdate(ProbeOptions):
    """How far the weights moved since the previous scanned checkpoint.

    ``Δw = w_k − w_{k−1}`` between consecutive checkpoints ``k−1`` and ``k`` (steps
    ``s_{k−1} < s_k``). This is the sum of all optimizer updates in between, not one
    step's update, so it is stored under its own keys rather than ``updates/...``
    (whose detectors expect a single optimizer step). The first checkpoint has no
    predecessor and records nothing.

    Keys: see ``keys``.

    Args:
        schedule: which checkpoints (default every one).
        name: see :class:`~trainprobe.probes.base.ProbeOptions` (the scan reserves
            ``"scan"`` for this probe).
    """

    name: str = "scan"
    schedule: Schedule = every(1)
    keys = (
        Key("scan/update_norm/<param>", "‖Δw‖_2 per parameter tensor"),
        Key("scan/update_norm_total", "sqrt(sum ‖Δw‖^2)"),
        Key(
            "scan/update_ratio_total",
            "‖Δw‖ / ‖w_{k−1}‖ over all parameters (NaN when w_{k−1} is zero)",
        ),
        Key("scan/steps_between", "s_k − s_{k−1}, the steps between the two checkpoints"),
    )
    _previous: tuple[int, dict[str, Tensor]] | None = field(default=None, init=False, repr=False)

    def remember(self, step: int, params: Mapping[str, Tensor]) -> None:
        """Keep a copy of ``params`` as the checkpoint at ``step`` (e.g. when resuming)."""
        self._keep(_previous=(step, {n: p.detach().clone() for n, p in params.items()}))

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        previous = self._previous
        self._keep(_previous=None)
        self.remember(ctx.step, ctx.params)
        if previous is None:
            return {}
        before_step, before = previous
        names = tuple(n for n in ctx.params if n in before)
        deltas = torch._foreach_sub(
            [ctx.params[n].detach() for n in names], [before[n] for n in names]
        )
        delta_norms = stacked_norms(deltas)  # [L]
        weight_total = total_norm(stacked_norms([before[n] for n in names]))
        delta_total = total_norm(delta_norms)
        ratio = torch.where(
            weight_total > 0, delta_total / weight_total, torch.full_like(delta_total, float("nan"))
        )
        return {
            f"{self.name}/update_norm": PerLayer(names, delta_norms),
            f"{self.name}/update_norm_total": delta_total,
            f"{self.name}/update_ratio_total": ratio,
            f"{self.name}/steps_between": float(ctx.step - before_step),
        }
