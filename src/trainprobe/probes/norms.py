"""Layer-wise weight and gradient norms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..functional.shards import any_sharded, local_part
from ..keys import Key
from .base import OnHost, PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .tensors import (
    norms_from_squares,
    shared_squares,
    stacked_norms,
    total_norm,
)


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerNorms(ProbeOptions):
    """L2 norms of every trainable parameter tensor and of its gradient.

    Keys: see ``keys`` (parameters whose ``.grad`` is None that step get no gradient key).

    Gradients are read after the user's backward, before the optimizer step
    (and so before any clipping the user does after the step block).

    Under FSDP2 (``fully_shard``: parameters and gradients are ``DTensor`` shards) each
    rank sends its shards' squared norms, which the monitor sums over ranks (one
    :class:`~.base.OnHost`, no gathered tensor): ``||w|| = sqrt(Σ_r ||w_r||²)``, the same
    keys as in one process (a replicated tensor counts once). Under DDP the tensors are
    the same on every rank and rank 0's norms are stored.

    Args:
        schedule: when to measure (default every 10 steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "norms"
    across_ranks = "sharded"  # FSDP2: shard squares summed over ranks; DDP: replicated
    schedule: Schedule = every(10)
    keys = (
        Key("norms/weight/<param>", "‖w‖_2 of one parameter tensor"),
        Key("norms/weight_total", "sqrt(sum ‖w‖^2) over all trainable parameters"),
        Key("norms/grad/<param>", "‖∇w‖_2 of one parameter tensor's gradient"),
        Key("norms/grad_total", "the global gradient norm, the quantity clip_grad_norm_ clips"),
    )
    needs = frozenset({"grads"})

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if ctx.ranks is not None and any_sharded(ctx.params.values()):
            return self._shares(ctx, ctx.ranks.world)
        names = tuple(ctx.params)
        weights = stacked_norms([local_part(p.detach()) for p in ctx.params.values()])  # [L]
        out: dict[str, Value] = {
            f"{self.name}/weight": PerLayer(names, weights),
            f"{self.name}/weight_total": total_norm(weights),
        }
        with_grad = [(n, p.grad) for n, p in ctx.params.items() if p.grad is not None]
        if with_grad:
            # under an AMP scale the squares of .grad may overflow float32: widen
            wide = None if ctx.grad_scale is None else torch.float64
            grads = ctx.unscaled(
                stacked_norms([local_part(g.detach()) for _, g in with_grad], wide=wide)
            )
            out[f"{self.name}/grad"] = PerLayer(tuple(n for n, _ in with_grad), grads)
            out[f"{self.name}/grad_total"] = total_norm(grads)
        return out

    def _shares(self, ctx: StepContext, world: int) -> dict[str, Value]:
        """``[L + L']`` this rank's shares of ``||w||²`` and ``||∇w||²``, summed over ranks
        by the monitor and finished on the host into the keys of one process."""
        squares = shared_squares([p.detach() for p in ctx.params.values()], world)  # [L]
        with_grad = [(n, p.grad) for n, p in ctx.params.items() if p.grad is not None]
        if with_grad:
            wide = None if ctx.grad_scale is None else torch.float64
            grads = [g.detach() for _, g in with_grad]
            scaled = shared_squares(grads, world, wide=wide, scale=ctx.grad_scale)  # [L']
            squares = torch.cat([squares, scaled.to(squares.device)])  # [L + L']
        finish = partial(
            _norms,
            probe=self.name,
            weights=tuple(ctx.params),
            grads=tuple(n for n, _ in with_grad),
        )
        return {f"{self.name}/squares": OnHost(squares, finish, reduce="sum")}


def _norms(
    squares: np.ndarray, *, probe: str, weights: tuple[str, ...], grads: tuple[str, ...]
) -> dict[str, float]:
    """The weight and gradient norms from ``[L + L']`` squares summed over ranks."""
    squares = np.asarray(squares, dtype=np.float64).reshape(-1)
    out = norms_from_squares(squares[: len(weights)], weights, f"{probe}/weight")
    if grads:
        out.update(norms_from_squares(squares[len(weights) :], grads, f"{probe}/grad"))
    return out
