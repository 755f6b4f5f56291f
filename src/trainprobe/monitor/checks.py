"""Checks at the public boundary; every error names the value and the fix."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from ..keys import Key, check_key, check_name, matching
from ..probes.base import NEEDS, Probe
from ..probes.schedules import check_schedule


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch(model): expected a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"watch(model): {type(model).__name__} has no trainable parameters (none, or all "
            "requires_grad=False); unfreeze some with p.requires_grad_(True) or watch the "
            "module you train"
        )
    return model


def check_probes(probes: Iterable[object]) -> list[Probe]:
    if isinstance(probes, (str, bytes)) or not isinstance(probes, Iterable):
        raise TypeError(f"watch(probes=...): expected a list of probe instances, got {probes!r}")
    checked: list[Probe] = []
    for i, probe in enumerate(probes):
        if isinstance(probe, type):
            raise TypeError(
                f"probes[{i}] is the class {probe.__name__}; pass an instance: {probe.__name__}()"
            )
        if not isinstance(probe, Probe):
            missing = [
                a for a in ("name", "schedule", "needs", "keys", "measure") if not hasattr(probe, a)
            ]
            raise TypeError(
                f"probes[{i}] ({type(probe).__name__}) is not a probe: it lacks "
                f"{missing}; see trainprobe.probes.base for the protocol"
            )
        owner = f"probes[{i}] ({type(probe).__name__})"
        check_name(probe.name, f"{owner} name")
        check_schedule(probe.schedule, owner)
        if hasattr(probe, "due"):
            check_schedule(probe.due, f"{owner} due")
        for optional in ("attach", "settings", "measured_with"):
            if hasattr(probe, optional) and not callable(getattr(probe, optional)):
                raise TypeError(
                    f"{owner}: {optional} must be a method, got {getattr(probe, optional)!r}"
                )
        _check_declared(probe)
        unknown = set(probe.needs) - NEEDS
        if unknown:
            raise ValueError(
                f"probe {probe.name!r} needs {sorted(unknown)}, which the monitor "
                f"does not provide; choose from {sorted(NEEDS)}"
            )
        checked.append(probe)
    names = [p.name for p in checked]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"two probes are named {dupes}: their record keys would collide; "
            "pass each probe once (one instance can log every layer)"
        )
    return checked


def _check_declared(probe: Probe) -> None:
    """``probe.keys``: a non-empty tuple of :class:`Key`, all under one probe name."""
    keys = probe.keys
    if not (isinstance(keys, tuple) and keys and all(isinstance(k, Key) for k in keys)):
        raise TypeError(
            f"probe {probe.name!r} ({type(probe).__name__}): keys must be a non-empty tuple of "
            f"trainprobe.keys.Key declaring the keys it writes, got {keys!r}; e.g. "
            f"keys = (Key('{probe.name}/value', 'what the value means'),)"
        )
    names = sorted({k.probe for k in keys})
    if len(names) > 1:
        raise ValueError(
            f"probe {probe.name!r} ({type(probe).__name__}) declares keys under {names}; "
            "spell every pattern with one probe name (its class's name)"
        )


def check_written_key(probe_name: str, declared: tuple[Key, ...], key: object) -> None:
    """A ``ValueError`` unless ``key`` is a well-formed key that one of the patterns
    ``declared`` by the probe named ``probe_name`` matches."""
    if not (isinstance(key, str) and key.startswith(f"{probe_name}/")):
        raise ValueError(
            f"probe {probe_name!r} wrote key {key!r}; its keys must start with '{probe_name}/'"
        )
    try:
        check_key(key)
    except ValueError as err:
        raise ValueError(f"probe {probe_name!r}: {err}") from None
    if matching(declared, key) is None:
        raise ValueError(
            f"probe {probe_name!r} wrote key {key!r}, which matches none of the keys it "
            f"declares: {[k.pattern for k in declared]}; add a Key(...) for it to the "
            "probe's keys"
        )


def checked_finish(
    finish: Callable[[Any], Mapping[str, float]],
    probe_name: str,
    declared: tuple[Key, ...],
    host: Any,
) -> Mapping[str, float]:
    """``finish(host)`` of an :class:`~trainprobe.probes.base.OnHost` value, its keys
    checked as :func:`check_written_key` does."""
    finished = finish(host)
    for key in finished:
        check_written_key(probe_name, declared, key)
    return finished


def check_measured_with(probe_name: str, how: object) -> dict[str, Any]:
    """What a probe's ``measured_with()`` returned, as a dict with string keys (see
    :mod:`trainprobe.probes.base`), else a ``TypeError``."""
    if not (isinstance(how, Mapping) and all(isinstance(k, str) for k in how)):
        raise TypeError(
            f"probe {probe_name!r}: measured_with() must return a dict with string keys "
            f"(how its measurement ran, e.g. {{'engine': 'graph'}}), got {how!r}"
        )
    return dict(how)


def check_options(flush_seconds: float, on_probe_error: str) -> tuple[float, str]:
    if not flush_seconds >= 0:
        raise ValueError(f"watch(flush_seconds=...) must be >= 0, got {flush_seconds!r}")
    if on_probe_error not in ("warn", "raise"):
        raise ValueError(
            f"watch(on_probe_error=...) must be 'warn' or 'raise', got {on_probe_error!r}"
        )
    return float(flush_seconds), on_probe_error


def check_optimizer(optimizer: object, where: str) -> torch.optim.Optimizer | None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{where}(optimizer=...): expected a torch.optim.Optimizer, "
            f"got {type(optimizer).__name__}"
        )
    return optimizer


def check_loss_fn(loss_fn: object, where: str) -> Callable[[nn.Module, Any], Tensor] | None:
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"{where}(loss_fn=...) must be a callable loss(model, batch) -> scalar tensor, "
            f"got {type(loss_fn).__name__}; e.g. "
            "trainprobe.curvature.criterion_loss(nn.CrossEntropyLoss())"
        )
    return loss_fn


def check_step(step: object, last: int | None) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"mon.step(step): expected a non-negative int, got {step!r}")
    if step < 0:
        raise ValueError(f"mon.step(step): expected a non-negative int, got {step!r}")
    if last is not None and step <= last:
        raise ValueError(
            f"step {step} does not come after step {last}: steps must increase; pass a "
            "global counter (e.g. epoch * len(loader) + i), or resume a run past its last step"
        )
    return step


def check_logged(values: Mapping[str, object]) -> dict[str, Tensor | float]:
    out: dict[str, Tensor | float] = {}
    for name, value in values.items():
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise TypeError(
                    f"log({name}=...): expected a scalar, got a tensor of shape "
                    f"{tuple(value.shape)}; log value.mean() or a single element"
                )
            out[name] = value.detach().reshape(()).clone()  # a later in-place change must not leak
        elif isinstance(value, Real) and not isinstance(value, bool):
            out[name] = float(value)
        else:
            raise TypeError(
                f"log({name}=...): expected a number or a one-element tensor, "
                f"got {type(value).__name__}"
            )
    return out


def check_scaler(scaler: Any) -> Any:
    """``scaler`` if it is an AMP ``GradScaler`` (or None), else a ``TypeError``."""
    if scaler is None:
        return None
    if not all(hasattr(scaler, a) for a in ("scale", "unscale_", "step", "update", "is_enabled")):
        raise TypeError(
            f"watch(scaler=...): expected a torch.amp.GradScaler, got {type(scaler).__name__}"
        )
    return scaler
