"""Adversarial accuracy under an L∞ projected-gradient attack (Madry, Makelov, Schmidt,
Tsipras & Vladu 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks")."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..functional import call, rng_fork, semantics, unwrap


@dataclass(frozen=True)
class AttackResult:
    """Per-example outcome of :func:`pgd_attack`.

    Attributes:
        clean: ``[N]`` bool, ``argmax f(x) = y``.
        robust: ``[N]`` bool, correctly classified at every iterate of the attack (the
            random start included): an upper bound of the true robust accuracy.
        delta: ``[N, *shape]`` the last iterate's perturbation, ``‖δ‖_∞ <= eps``.
    """

    clean: Tensor  # [N]
    robust: Tensor  # [N]
    delta: Tensor  # [N, *shape]

    @property
    def clean_acc(self) -> Tensor:
        """0-d fraction of clean examples classified correctly."""
        return self.clean.float().mean()

    @property
    def adv_acc(self) -> Tensor:
        """0-d fraction of examples the attack did not break."""
        return self.robust.float().mean()


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    generator: torch.Generator,
    bounds: tuple[float, float] | None = None,
) -> AttackResult:
    """L∞ PGD on the cross-entropy from a uniform random start in the ``eps``-ball.

    ``δ_0 ~ U[−ε, ε]^D``; ``δ_{k+1} = Π(δ_k + α · sign ∇_δ CE(f(x + δ_k), y))`` with ``Π``
    the projection onto ``‖δ‖_∞ <= ε`` (and onto ``bounds`` for ``x + δ``). An example
    is robust if every iterate ``x + δ_0, ..., x + δ_K`` is classified correctly.

    Gradients are taken with ``torch.autograd.grad`` with respect to ``δ`` only, through
    detached parameters: ``.grad`` is never written. Eval mode (modes restored), the
    global RNG forked (cuDNN off for the call in models with RNNs, whose cuDNN backward
    needs training mode); the random start comes from ``generator``.

    Args:
        model: a classifier ``[N, *shape] -> [N, C]`` logits.
        x: ``[N, *shape]`` inputs.
        y: ``[N]`` integer labels in ``[0, C)``.
        eps: the radius ``ε >= 0`` (input units); 0 gives the clean accuracy.
        steps: ``K >= 0`` gradient steps.
        step_size: ``α`` (default ``2.5 ε / K``, Madry et al.).
        generator: randomness of the start.
        bounds: ``(low, high)`` the valid input range (e.g. ``(0, 1)`` for images).

    Raises:
        ValueError: bad ``eps``, ``steps``, ``step_size``, ``bounds``, inputs or labels,
            or a model that does not return ``[N, C]`` logits.
    """
    _check(eps=eps, steps=steps, step_size=step_size, bounds=bounds, x=x, y=y)
    model = unwrap(model)  # the eager module: no recompiles for the attack's shapes
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    params = {name: p.detach() for name, p in model.named_parameters()}

    def logits(inputs: Tensor) -> Tensor:
        out = call(model, params, (inputs,))
        if not isinstance(out, Tensor) or out.shape[0] != len(x) or out.ndim != 2:
            raise ValueError(
                f"pgd_attack: the model must return [N, C] logits, got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        return out

    with semantics(model, "eval"), rng_fork(x.device), _rnn_backward(model):
        with torch.no_grad():
            clean_logits = logits(x)  # [N, C]
        _check_labels(y, clean_logits.shape[1])
        clean = _correct(clean_logits, y)  # [N]
        delta = _project(
            (
                torch.rand(x.shape, generator=generator, dtype=x.dtype, device=generator.device) * 2
                - 1
            ).to(x.device)
            * eps,
            x,
            eps,
            bounds,
        )
        robust = clean.clone()
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                out = logits(x + delta)  # [N, C]
                (grad,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), delta)
            robust &= _correct(out.detach(), y)
            delta = _project(delta.detach() + alpha * grad.sign(), x, eps, bounds)
        with torch.no_grad():
            robust &= _correct(logits(x + delta), y)
    return AttackResult(clean, robust, delta.detach())


def _rnn_backward(model: nn.Module) -> AbstractContextManager:
    """cuDNN off for models with RNNs: its RNN backward runs in training mode only."""
    if not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=False, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic)


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    return logits.argmax(dim=1) == y  # [N]


def _check_labels(y: Tensor, classes: int) -> None:
    low, high = int(y.min()), int(y.max())  # deliberate sync: one check per attack
    if not 0 <= low <= high < classes:
        raise ValueError(
            f"pgd_attack: labels must lie in [0, {classes}) for {classes} logits, "
            f"got values in [{low}, {high}]"
        )


def _project(delta: Tensor, x: Tensor, eps: float, bounds: tuple[float, float] | None) -> Tensor:
    """Onto ``‖δ‖_∞ <= ε`` and, with ``bounds``, ``low <= x + δ <= high``."""
    delta = delta.clamp(-eps, eps)
    return delta if bounds is None else (x + delta).clamp(*bounds) - x


def _finite(value: object, minimum: float) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= minimum


def _check(
    *, eps: object, steps: object, step_size: object, bounds: object, x: object, y: object
) -> None:
    if not _finite(eps, 0):
        raise ValueError(f"eps must be a finite number >= 0 (L∞ radius), got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if step_size is not None and not _finite(step_size, 0):
        raise ValueError(f"step_size must be a finite number >= 0 or None, got {step_size!r}")
    if bounds is not None and not (
        isinstance(bounds, tuple)
        and len(bounds) == 2
        and all(_finite(v, -math.inf) for v in bounds)
        and bounds[0] < bounds[1]
    ):
        raise ValueError(f"bounds must be a tuple (low, high) with low < high, got {bounds!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or len(x) == 0:
        raise ValueError("inputs must be a floating tensor [N, *shape] with N >= 1")
    if not isinstance(y, Tensor) or y.is_floating_point() or y.shape != (len(x),):
        raise ValueError(
            f"labels must be an integer tensor [N] = [{len(x)}], got "
            f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}"
        )
