"""Adversarial accuracy under an L∞ PGD attack on held-out data (Madry et al. 2018)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..keys import Key
from ..regions import pgd_attack
from .base import ProbeOptions, StepContext, Value
from .schedules import Schedule, log_spaced


@dataclass(frozen=True, kw_only=True, eq=False)
class Robustness(ProbeOptions):
    """Clean and adversarial accuracy of a classifier on a fixed batch.

    The attack is L∞ projected gradient descent on the cross-entropy (Madry, Makelov,
    Schmidt, Tsipras & Vladu 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks") from a uniform random start in the ``eps``-ball, drawn from
    ``torch.Generator().manual_seed(seed + step)``; an example counts as robust when every
    iterate is classified correctly (see :func:`trainprobe.regions.pgd_attack`). Humayun
    et al. 2024 ("Deep Networks Always Grok and Here is Why") see robustness arrive long
    after the training set is fit ("delayed robustness"), together with a drop of the
    local complexity (:class:`~trainprobe.probes.regions.LocalComplexity`) around the
    training points.

    Eval semantics (BatchNorm running statistics, no dropout; modes restored); input
    gradients only, through detached parameters, so ``.grad`` is untouched; the global
    RNG is forked.

    Keys: see ``keys``.

    Args:
        eps: the L∞ radius, in input units (default 8/255, the usual value for images in
            ``[0, 1]``).
        steps: PGD steps.
        step_size: default ``2.5 · eps / steps`` (Madry et al.).
        data: a held-out batch ``(inputs, labels)`` with labels ``[N]`` integer classes;
            default: the step's ``batch=``.
        bounds: ``(low, high)`` valid input range (e.g. ``(0, 1)``), or None.
        max_points: the first examples of the batch used.
        seed: the random starts' generator (``seed + step``).
        schedule: when to measure (default ``log_spaced()``: delayed robustness shows on
            a log-scaled step axis; each measurement costs ``steps`` forward-backward
            passes of ``max_points`` examples).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "robustness"
    across_ranks = "own_data"
    own_data = "data"
    schedule: Schedule = log_spaced()
    keys = (
        Key("robustness/clean_acc", "accuracy on the batch"),
        Key(
            "robustness/adv_acc",
            "accuracy under the attack (an upper bound of the true robust accuracy)",
        ),
        Key("robustness/eps", "the attack radius"),
    )

    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    data: Any = field(default=None, repr=False)
    bounds: tuple[float, float] | None = None
    max_points: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        eps, steps, step_size, bounds = self.eps, self.steps, self.step_size, self.bounds
        if not _number(eps, 0):
            raise ValueError(f"Robustness: eps must be a finite number >= 0, got {eps!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"Robustness: steps must be an integer >= 0, got {steps!r}")
        if step_size is not None and not _number(step_size, 0):
            raise ValueError(
                f"Robustness: step_size must be a finite number >= 0 or None, got {step_size!r}"
            )
        m = self.max_points
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"Robustness: max_points must be an integer >= 1, got {m!r}")
        if bounds is not None and not (
            isinstance(bounds, tuple)
            and len(bounds) == 2
            and all(_number(v, -math.inf) for v in bounds)
            and bounds[0] < bounds[1]
        ):
            raise ValueError(
                f"Robustness: bounds must be a tuple (low, high) with low < high, got {bounds!r}"
            )
        if self.data is not None:
            _examples(self.data)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if self.data is None and ctx.batch is None:
            raise ValueError("Robustness needs data: pass data=(x, y) or batch= to mon.step()")
        x, y = _examples(self.data if self.data is not None else ctx.batch)
        like = next((p for p in ctx.model.parameters() if p.is_floating_point()), x)
        x = x[: self.max_points].to(device=like.device, dtype=like.dtype)  # [N, *shape]
        y = y[: self.max_points].to(like.device)  # [N]
        result = pgd_attack(
            ctx.model,
            x,
            y,
            eps=float(self.eps),
            steps=self.steps,
            step_size=self.step_size,
            generator=torch.Generator().manual_seed(self.seed + ctx.step),
            bounds=self.bounds,
        )
        return {
            f"{self.name}/clean_acc": result.clean_acc,
            f"{self.name}/adv_acc": result.adv_acc,
            f"{self.name}/eps": float(self.eps),
        }


def _examples(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs [N, *shape], labels [N])`` of a classification batch, or a ValueError."""
    x, y = batch if isinstance(batch, tuple | list) and len(batch) == 2 else (None, None)
    inputs = isinstance(x, Tensor) and x.is_floating_point() and x.ndim >= 2
    if inputs and isinstance(y, Tensor) and not y.is_floating_point() and y.shape == x.shape[:1]:
        return x.detach(), y.detach()
    raise ValueError(
        "Robustness needs a batch (inputs [N, *shape] floating, labels [N] integer classes), "
        f"got {type(batch).__name__}; pass data=(x, y)"
    )


def _number(value: object, minimum: float) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return ok and math.isfinite(value) and value >= minimum
