"""Whether a loss is a function: two evaluations on the same batch must agree.

A Hessian (or a per-example gradient) of a random function is not defined; when two
evaluations differ, :func:`check_deterministic` names the first module whose output
changed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from .loss import Mode

_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``{model: {loss closure: {modes}}}`` that passed, for models without random modules."""


def check_deterministic(
    model: nn.Module, evaluate: Callable[[], Tensor], mode: Mode, *, loss_fn: Any = None
) -> None:
    """Raise if two evaluations of the loss on the same batch differ (dropout, noise).

    A Hessian of a random function is not defined. Two plain evaluations decide; only
    when they differ are two more run with every leaf module's output recorded, so the
    error can name the first module whose output changed (or the loss closure itself).
    With ``loss_fn`` (the closure ``evaluate`` calls), a pass is remembered for this
    model, closure and mode while the model holds no random module (dropout, RReLU):
    the probes build an operator at every measurement, and the two forwards were a third
    of the build's cost. A random closure fails its first check, so is never remembered.

    Args:
        model: the module whose leaf modules are watched.
        evaluate: ``() -> loss`` (run under the RNG fork the caller sets up).
        mode: the semantics, for the message.
        loss_fn: the loss closure, to remember a pass by (None: never remembered).
    """
    if loss_fn is not None and _passed(model, loss_fn, mode):
        return
    with torch.no_grad():
        first, second = evaluate().detach(), evaluate().detach()
    if not _differ(first, second):
        if loss_fn is not None:
            _remember(model, loss_fn, mode)
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


def has_random_modules(model: nn.Module) -> bool:
    """Whether any module of ``model`` draws random numbers in training (dropout with
    ``p > 0``, RReLU), in whatever mode it is now."""
    return any(
        (isinstance(m, _DropoutNd) and m.p > 0) or isinstance(m, nn.RReLU) for m in model.modules()
    )


def _passed(model: nn.Module, loss_fn: Any, mode: Mode) -> bool:
    try:
        return mode in _PASSED.get(model, {}).get(loss_fn, ()) and not has_random_modules(model)
    except TypeError:  # a closure that cannot be weakly referenced
        return False


def _remember(model: nn.Module, loss_fn: Any, mode: Mode) -> None:
    if has_random_modules(model):
        return
    try:
        closures = _PASSED.setdefault(model, weakref.WeakKeyDictionary())
        closures.setdefault(loss_fn, set()).add(mode)
    except TypeError:  # not weakly referenceable: checked every time
        pass


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
