"""Update norms and the update/weight ratio, ``||Δw|| / ||w||``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..functional.shards import any_sharded, dtensor_type, local_part
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

    Under FSDP2 (``fully_shard``) the copy and ``Δw`` are ``DTensor`` shards like the
    parameters (each rank copies its own shard); each rank sends its shards' squared
    norms, summed over ranks by the monitor (one :class:`~.base.OnHost`, nothing
    gathered) into the keys of one process.

    Keys: see ``keys``.

    Args:
        schedule: when to measure (default every 10 steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "updates"
    across_ranks = "sharded"  # FSDP2: shard squares summed over ranks; DDP: replicated
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
        if ctx.ranks is not None and any_sharded(ctx.update.values()):
            return self._shares(ctx, names, ctx.ranks.world)
        deltas = stacked_norms([local_part(d) for d in ctx.update.values()])  # [L]
        weights = stacked_norms([local_part(ctx.params_before[n]) for n in names])  # [L]
        weights_total = total_norm(weights)
        deltas_total = total_norm(deltas)
        return {
            f"{self.name}/norm": PerLayer(names, deltas),
            f"{self.name}/ratio": PerLayer(names, _ratio(deltas, weights)),
            f"{self.name}/norm_total": deltas_total,
            f"{self.name}/ratio_total": _ratio(deltas_total, weights_total),
        }

    def _shares(self, ctx: StepContext, names: tuple[str, ...], world: int) -> dict[str, Value]:
        """``[2L]`` this rank's shares of ``||Δw||²`` and ``||w||²``, summed over ranks by
        the monitor and finished on the host into the keys of one process."""
        deltas = shared_squares(list(ctx.update.values()), world)  # [L]
        weights = shared_squares([ctx.params_before[n] for n in names], world)  # [L]
        squares = torch.cat([deltas, weights.to(deltas.device)])  # [2L]
        finish = partial(_updates, probe=self.name, names=names)
        return {f"{self.name}/squares": OnHost(squares, finish, reduce="sum")}


def _updates(squares: np.ndarray, *, probe: str, names: tuple[str, ...]) -> dict[str, float]:
    """Update norms and ratios from ``[2L]`` squares (``Δw`` then ``w``) summed over ranks."""
    squares = np.asarray(squares, dtype=np.float64).reshape(2, len(names))
    out = norms_from_squares(squares[0], names, f"{probe}/norm")
    norms = np.sqrt(squares)  # [2, L]
    totals = np.sqrt(squares.sum(axis=1))  # [2]
    for name, delta, weight in zip(names, norms[0], norms[1], strict=True):
        out[f"{probe}/ratio/{name}"] = _host_ratio(delta, weight)
    out[f"{probe}/ratio_total"] = _host_ratio(totals[0], totals[1])
    return out


def _host_ratio(delta: float, weight: float) -> float:
    """``delta / weight``, NaN where ``weight`` is not positive (as :func:`_ratio`)."""
    return float(delta / weight) if weight > 0 else float("nan")


def _ratio(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``deltas / weights``, NaN where ``weights == 0`` (the ratio is undefined there)."""
    return torch.where(weights > 0, deltas / weights, torch.full_like(deltas, float("nan")))


def kept_params(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: a detached copy of params[name]}``, with one fused copy per kind of tensor
    (see :func:`_fused`), for the update measured after the step."""
    names = list(params)
    copies = _fused(lambda ts: torch._foreach_mul(ts, 1.0), [params[n].detach() for n in names])
    return dict(zip(names, copies, strict=True))


def parameter_deltas(
    params: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{name: params[name] - before[name]}`` with one fused subtraction per kind of
    tensor (see :func:`_fused`; ``DTensor`` shards subtract shard by shard, without a
    collective)."""
    names = list(before)
    now = [params[n].detach() for n in names]
    diffs = _fused(torch._foreach_sub, now, [before[n] for n in names])
    return dict(zip(names, diffs, strict=True))


def _fused(
    op: Callable[..., Sequence[torch.Tensor]], *columns: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``op(*columns)`` (a ``torch._foreach_*`` op), called once for the ``DTensor``s (FSDP2's
    shards) and once for the other tensors: a fused op refuses a list mixing the two (a
    parameter FSDP2 leaves replicated, ``fully_shard(..., ignored_params=...)``). The
    results come in the order of the inputs."""
    kind = dtensor_type()
    first = columns[0]
    sharded = [kind is not None and isinstance(t, kind) for t in first]
    if all(sharded) or not any(sharded):
        return list(op(*columns))
    out: list[torch.Tensor] = list(first)
    for flag in (True, False):
        index = [i for i, s in enumerate(sharded) if s == flag]
        results = op(*[[column[i] for i in index] for column in columns])
        for i, result in zip(index, results, strict=True):
            out[i] = result
    return out
