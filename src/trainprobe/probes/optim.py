"""The optimizer's learning rate per parameter group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..keys import Key
from .base import StepContext, Value, probe_name
from .schedules import Schedule, check_schedule, every


class LearningRate:
    """The learning rate of each parameter group, as the optimizer holds it.

    Keys: see ``keys``.

    Args:
        schedule: when to read it (default every step; reading costs no sync).
    """

    name = "optim"
    keys = (Key("optim/lr/<group>", "the learning rate of parameter group <group> (its index)"),)
    needs = frozenset({"optimizer"})

    def __init__(self, *, schedule: Schedule | None = None, name: str | None = None) -> None:
        self.schedule = every(1) if schedule is None else schedule
        check_schedule(self.schedule, "LearningRate")
        self.name = probe_name(self, name)

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        groups = ctx.optimizer.param_groups if ctx.optimizer is not None else []
        return {
            f"{self.name}/lr/{i}": _snapshot(group["lr"])
            for i, group in enumerate(groups)
            if "lr" in group
        }

    def settings(self) -> dict[str, Any]:
        return {}


def _snapshot(lr: Any) -> Any:
    """The value now: a tensor learning rate (capturable optimizers) is updated in place."""
    return lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
