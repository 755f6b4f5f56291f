"""A NaN/Inf guard on the loss, the gradients and the parameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..functional.shards import local_part
from ..keys import Key
from .base import OnHost, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .tensors import stacked_norms


@dataclass(frozen=True, kw_only=True, eq=False)
class NonFiniteGuard(ProbeOptions):
    """Counts parameter tensors whose gradient or value holds NaN/Inf, every step.

    A tensor is flagged when its L2 norm (accumulated in float32 or wider) is
    not finite: any NaN or Inf element makes the norm non-finite. On the device
    a step costs one fused norm call and one stack; the counting happens on the
    host when the monitor flushes (:class:`~trainprobe.probes.base.OnHost`).

    Under ``torch.distributed`` the norms are summed over ranks before the count (a
    NaN/Inf on any rank is one everywhere); under FSDP2 (``fully_shard``) each rank
    takes the norms of its own ``DTensor`` shards, so a NaN in any shard flags the tensor.

    Keys: see ``keys`` (``nonfinite/loss`` only when a loss is logged; the first
    offenders index the run's ``meta["model"]["params"]``, -1 when none).

    Args:
        schedule: when to check (default every step).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "nonfinite"
    across_ranks = "sharded"  # FSDP2: shard squares summed over ranks; DDP: replicated
    schedule: Schedule = every(1)
    keys = (
        Key("nonfinite/loss", "1.0 when the value logged as loss is NaN/Inf, else 0.0"),
        Key("nonfinite/grad", "how many parameter tensors have a non-finite gradient"),
        Key("nonfinite/param", "how many parameter tensors are non-finite"),
        Key(
            "nonfinite/first_grad",
            "index (into the model's parameter list) of the first tensor whose gradient went "
            "NaN/Inf; −1 while none has",
        ),
        Key(
            "nonfinite/first_param",
            "index (into the model's parameter list) of the first tensor that went NaN/Inf; −1 "
            "while none has",
        ),
    )
    needs = frozenset({"grads", "logged"})

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        params = list(ctx.params.values())
        grad_index = tuple(i for i, p in enumerate(params) if p.grad is not None)
        tensors = [p.detach() for p in params] + [params[i].grad.detach() for i in grad_index]
        values = stacked_norms([local_part(t) for t in tensors])  # [L + L']
        loss = ctx.logged.get("loss")  # a device tensor, a float, or None
        on_device = isinstance(loss, torch.Tensor)
        if on_device:
            wide = loss.reshape(1).to(
                device=values.device, dtype=values.dtype, non_blocking=values.device.type != "cpu"
            )
            values = torch.cat([values, wide])  # [L + L' + 1]: checked on the host
        finish = partial(
            _summarise,
            probe=self.name,
            n_params=len(params),
            grad_index=grad_index,
            loss_tensor=on_device,
            loss_float=None if on_device else loss,
        )
        return {f"{self.name}/check": OnHost(values, finish, reduce="sum")}


def _first(bad: np.ndarray, index: np.ndarray) -> float:
    hits = np.flatnonzero(bad)
    return float(index[hits[0]]) if hits.size else -1.0


def _summarise(
    host: np.ndarray,
    *,
    probe: str,
    n_params: int,
    grad_index: tuple[int, ...],
    loss_tensor: bool,
    loss_float: float | None,
) -> dict[str, float]:
    """Counts and first offenders from ``[L norms, L' grad norms, (loss)]`` on the host."""
    bad = ~np.isfinite(host)
    bad_params, bad_grads = bad[:n_params], bad[n_params : n_params + len(grad_index)]
    out = {
        f"{probe}/param": float(bad_params.sum()),
        f"{probe}/first_param": _first(bad_params, np.arange(n_params)),
    }
    if grad_index:
        out[f"{probe}/grad"] = float(bad_grads.sum())
        out[f"{probe}/first_grad"] = _first(bad_grads, np.asarray(grad_index))
    if loss_tensor:
        out[f"{probe}/loss"] = float(bad[-1])
    elif loss_float is not None:
        out[f"{probe}/loss"] = float(not np.isfinite(loss_float))
    return out
