"""The optimizer's learning rate per parameter group."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..keys import Key
from .base import ProbeOptions, StepContext, Value
from .schedules import Schedule, every


@dataclass(frozen=True, kw_only=True, eq=False)
class LearningRate(ProbeOptions):
    """The learning rate of each parameter group, as the optimizer holds it.

    Keys: see ``keys``.

    Args:
        schedule: when to read it (default every step; reading costs no sync).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "optim"
    schedule: Schedule = every(1)
    keys = (Key("optim/lr/<group>", "the learning rate of parameter group <group> (its index)"),)
    needs = frozenset({"optimizer"})

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        groups = ctx.optimizer.param_groups if ctx.optimizer is not None else []
        return {
            f"{self.name}/lr/{i}": _snapshot(group["lr"])
            for i, group in enumerate(groups)
            if "lr" in group
        }


def _snapshot(lr: Any) -> Any:
    """The value now: a tensor learning rate (capturable optimizers) is updated in place."""
    return lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
