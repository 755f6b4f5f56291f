"""The function whose curvature we take: a loss closure, the parameters it is taken in,
and the forward semantics (eval or train) it is evaluated under.

Everything here restores what it touches: module modes and BatchNorm flags are set
for the duration of a call and put back in ``finally``; the global RNG is forked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss(model, batch) -> 0-d tensor``: any scalar objective of the model on a batch."""

ParamSelection = None | str | Iterable[str] | nn.Module
"""All trainable parameters (None), a regex on names, explicit names, or a submodule."""

Mode = Literal["eval", "train"]


def criterion_loss(criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """``loss(model, (inputs, targets)) = criterion(model(inputs), targets)``.

    Args:
        criterion: e.g. ``nn.CrossEntropyLoss()`` (mean reduction, as PyTorch's default).
    """
    if not callable(criterion):
        raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")

    def loss(model: nn.Module, batch: Any) -> Tensor:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError(
                "criterion_loss expects batches of (inputs, targets); for other batch "
                "shapes pass your own loss(model, batch) closure"
            )
        inputs, targets = batch
        return criterion(model(inputs), targets)

    return loss


def select_params(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` the curvature is taken in, by name, in model order.

    Args:
        model: the module.
        params: None (every parameter with ``requires_grad``), a regular expression
            matched with ``re.search`` against names, an iterable of names, or a
            submodule of ``model`` (its parameters).

    Raises:
        ValueError: nothing selected, an unknown name, a module not inside ``model``, or
            a frozen (``requires_grad=False``) parameter named explicitly.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        what = "model has no parameter with requires_grad=True; unfreeze some"
    elif isinstance(params, str):
        pattern = re.compile(params)
        chosen = [n for n in named if pattern.search(n) and named[n].requires_grad]
        what = f"no trainable parameter name matches {params!r}; names are {list(named)[:8]}"
    elif isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = [n for n, p in named.items() if id(p) in ids and p.requires_grad]
        what = "the module passed as params has no trainable parameter of this model"
    else:
        chosen = list(params)
        unknown = [n for n in chosen if n not in named]
        if unknown:
            raise ValueError(f"params: unknown names {unknown}; names are {list(named)[:8]}")
        what = "params is empty; pass parameter names, a regex, a module or None"
    if not chosen:
        raise ValueError(what)
    frozen = [n for n in chosen if not named[n].requires_grad]
    if frozen:
        raise ValueError(
            f"params {frozen} are frozen (requires_grad=False), so training never moves "
            "them; leave them out of params= or set requires_grad=True"
        )
    order = set(chosen)
    return {n: p for n, p in named.items() if n in order}


@contextmanager
def semantics(model: nn.Module, mode: Mode) -> Iterator[None]:
    """Evaluate ``model`` with ``mode`` semantics, restoring every flag afterwards.

    ``"eval"``: every module in eval mode (BatchNorm uses its running statistics,
    dropout is off). ``"train"``: every module in train mode, BatchNorm normalises
    with the batch statistics but its running statistics are not updated
    (``track_running_stats`` is off for the call).
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        model.train(mode == "train")
        if mode == "train":
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


def rng_fork(device: torch.device) -> AbstractContextManager:
    """Fork the global RNG (CPU and ``device``'s) so nothing here consumes it."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


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
