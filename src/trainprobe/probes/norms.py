"""Layer-wise weight and gradient norms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..keys import Key
from .base import PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .tensors import stacked_norms, total_norm


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerNorms(ProbeOptions):
    """L2 norms of every trainable parameter tensor and of its gradient.

    Keys: see ``keys`` (parameters whose ``.grad`` is None that step get no gradient key).

    Gradients are read after the user's backward, before the optimizer step
    (and so before any clipping the user does after the step block).

    Args:
        schedule: when to measure (default every 10 steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "norms"
    schedule: Schedule = every(10)
    keys = (
        Key("norms/weight/<param>", "‖w‖_2 of one parameter tensor"),
        Key("norms/weight_total", "sqrt(sum ‖w‖^2) over all trainable parameters"),
        Key("norms/grad/<param>", "‖∇w‖_2 of one parameter tensor's gradient"),
        Key("norms/grad_total", "the global gradient norm, the quantity clip_grad_norm_ clips"),
    )
    needs = frozenset({"grads"})

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        names = tuple(ctx.params)
        weights = stacked_norms([p.detach() for p in ctx.params.values()])  # [L]
        out: dict[str, Value] = {
            f"{self.name}/weight": PerLayer(names, weights),
            f"{self.name}/weight_total": total_norm(weights),
        }
        with_grad = [(n, p.grad) for n, p in ctx.params.items() if p.grad is not None]
        if with_grad:
            # under an AMP scale the squares of .grad may overflow float32: widen
            wide = None if ctx.grad_scale is None else torch.float64
            grads = ctx.unscaled(stacked_norms([g.detach() for _, g in with_grad], wide=wide))
            out[f"{self.name}/grad"] = PerLayer(tuple(n for n, _ in with_grad), grads)
            out[f"{self.name}/grad_total"] = total_norm(grads)
        return out
