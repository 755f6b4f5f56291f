"""Whether a loss is a function: two evaluations on the same batch must agree.

A Hessian (or a per-example gradient) of a random function is not defined; when two
evaluations differ, :func:`check_deterministic` names the first module whose output
changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from .loss import Mode


def check_deterministic(model: nn.Module, evaluate: Callable[[], Tensor], mode: Mode) -> None:
    """Raise if two evaluations of the loss on the same batch differ (dropout, noise).

    A Hessian of a random function is not defined. Two plain evaluations decide; only
    when they differ are two more run with every leaf module's output recorded, so the
    error can name the first module whose output changed (or the loss closure itself).

    Args:
        model: the module whose leaf modules are watched.
        evaluate: ``() -> loss`` (run under the RNG fork the caller sets up).
        mode: the semantics, for the message.
    """
    with torch.no_grad():
        first, second = evaluate().detach(), evaluate().detach()
    if not _differ(first, second):
        return
    passes: list[list[tuple[str, Tensor]]] = [[], []]
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    for outputs in passes:
        handles = [m.register_forward_hook(_recorder(n, outputs)) for n, m in leaves]
        try:
            with torch.no_grad():
                evaluate()
        finally:
            for handle in handles:
                handle.remove()
    raise ValueError(_randomness_message(dict(leaves), passes, mode))


ROUNDING = 100
"""Differences up to this many units of roundoff (relative) are not randomness: a CPU
reduction split over threads may add in another order from one call to the next."""


def _differ(first: Tensor, second: Tensor) -> bool:
    """Whether two evaluations differ by more than floating-point reordering can explain
    (``max |a − b| > ROUNDING · eps · max(|a|, |b|)``; NaN where both are NaN agrees)."""
    if first.shape != second.shape:
        return True
    if not first.is_floating_point() or first.numel() == 0:
        return not torch.equal(first, second)
    eps = torch.finfo(first.dtype).eps
    both_nan = first.isnan() & second.isnan()
    a, b = first.double().masked_fill(both_nan, 0), second.double().masked_fill(both_nan, 0)
    diff = (a - b).abs().max()  # NaN against a number stays NaN: compared below as differing
    return not bool(diff <= ROUNDING * eps * torch.maximum(a.abs().max(), b.abs().max()))


def _recorder(name: str, outputs: list[tuple[str, Tensor]]) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            outputs.append((name, output.detach().clone()))

    return hook


def _randomness_message(
    modules: dict[str, nn.Module], passes: list[list[tuple[str, Tensor]]], mode: Mode
) -> str:
    fix = "make the loss deterministic (a Hessian of a random function is not defined)"
    for (name, first), (_, second) in zip(*passes, strict=False):
        if _differ(first, second):
            module = modules[name]
            if isinstance(module, _DropoutNd) and mode == "train":
                fix = "use mode='eval' (the default), or set its p to 0"
            return (
                f"the loss is random: module {name!r} ({type(module).__name__}) gave different "
                f"outputs on the same batch under mode={mode!r}; {fix}"
            )
    return (
        f"the loss is random: two evaluations on the same batch under mode={mode!r} differ "
        f"although every module's output agreed, so the loss closure draws randomness; {fix}"
    )
