"""Run metadata: model summary, optimizer hyperparameters, versions."""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..probes.base import declared_keys, due_schedule, probe_settings


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (
            value.detach().cpu().tolist() if value.numel() <= 16 else f"tensor{list(value.shape)}"
        )
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def model_summary(model: nn.Module, trainable: Sequence[str]) -> dict[str, Any]:
    """Class, parameter counts and the ordered trainable parameter names and shapes."""
    named = dict(model.named_parameters())
    return {
        "class": type(model).__qualname__,
        "num_params": sum(p.numel() for p in named.values()),
        "num_trainable": sum(named[n].numel() for n in trainable),
        "params": list(trainable),
        "shapes": {n: list(named[n].shape) for n in trainable},
        "dtypes": sorted({str(p.dtype) for p in named.values()}),
        "devices": sorted({str(p.device) for p in named.values()}),
        "repr": repr(model)[:20_000],
    }


def optimizer_summary(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer class and each parameter group's hyperparameters (no tensors)."""
    groups = [
        {k: _jsonable(v) for k, v in group.items() if k != "params"}
        | {"num_params": sum(p.numel() for p in group["params"])}
        for group in optimizer.param_groups
    ]
    return {"class": type(optimizer).__qualname__, "param_groups": groups}


def run_start(
    model: nn.Module, trainable: Sequence[str], probes: Sequence[Any], user: dict[str, Any]
) -> dict[str, Any]:
    """Metadata written when a monitor opens a run."""
    return {
        "status": "running",
        "created": now(),
        "model": model_summary(model, trainable),
        "probes": [
            {
                "name": p.name,
                "class": type(p).__qualname__,
                "schedule": due_schedule(p).describe(),
                "needs": sorted(p.needs),
                "settings": probe_settings(p),
                "keys": [[k.pattern, k.meaning] for k in declared_keys(p)],
            }
            for p in probes
        ],
        "versions": versions(),
        "user": user,
    }


def versions() -> dict[str, str]:
    return {
        "trainprobe": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda),
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
