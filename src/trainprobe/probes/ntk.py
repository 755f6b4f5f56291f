"""Lazy or rich: the empirical NTK on a fixed subset, its alignment with the labels and how
far it has moved since the first measurement (Kumar, Bordelon, Gershman & Pehlevan 2024,
"Grokking as the transition from lazy to rich training dynamics")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..gradients.ntk import centered_alignment, label_kernel, relative_change
from ..keys import Key
from .base import StepContext, Value
from .batches import observing
from .labels import class_outputs
from .output_source import OutputGradientProbe, check_count
from .schedules import Schedule, every


@dataclass(frozen=True, kw_only=True, eq=False)
class NTKAlignment(OutputGradientProbe):
    """Centered kernel-target alignment, trace and drift of the empirical NTK.

    On a fixed subset ``X`` of ``n`` examples (``n <= max_examples``) with labels ``y``, the
    empirical NTK ``K = Σ_j J_j J_jᵀ`` ``[n, n]`` (see :mod:`trainprobe.gradients.ntk`):
    ``J_j`` ``[n, P]`` holds the per-example gradients of the scalar output ``v_jᵀ z(x)``.
    For ``C`` outputs ``V = I_C`` (``C`` per-example-gradient passes), so
    ``K_ii' = Σ_c ⟨∇z_c(x_i), ∇z_c(x_i')⟩``, the trace of the output kernel; above
    ``max_outputs`` outputs, ``max_outputs`` Rademacher columns ``/√k`` drawn once from
    ``seed`` (the same at every measurement) estimate it without bias.

    Why output gradients, and all outputs: the gradient of the true-class logit makes the
    head's block of ``K`` equal ``δ(y_i, y_j) h_iᵀh_j``, label-structured by construction, so
    it aligns with the labels before anything is learned; the per-example loss gradient
    ``ℓ'(z_i) ∇z_i`` scales rows by the residual, so ``K`` shrinks and "changes" as
    examples are fitted even in a kernel (lazy) regime. The trace kernel uses no label.

    The target kernel ``T = Y Yᵀ`` (one-hot ``Y`` for class labels: ``T_ij = 1`` iff
    ``y_i = y_j``; real targets as they are). Kumar et al. read grokking as a transition
    from lazy training (``K`` stays ``K_0``, the network fits with its initial features) to
    rich training (``K`` moves and aligns with the task); Baratin et al. 2021 ("Implicit
    regularization via neural feature alignment") track the same alignment.

    Keys: see ``keys``.

    State: ``K_0`` (and, without ``data=``, the subset frozen from the first measured
    step's batch); :meth:`reset` forgets both.

    Args:
        schedule: when to measure (default every 100 steps; a measurement costs ``C`` (at
            most ``max_outputs``) per-example-gradient passes over ``n`` examples, more
            when ``max_memory`` cannot hold the ``[n, P]`` Jacobian and it is taken in
            blocks).
        max_outputs: exact trace kernel up to this many outputs, else a sketch.
        seed: generator seed of the sketch's Rademacher columns.
        data, max_examples, params, mode, method, max_memory: the subset and its
            per-example gradients, see :class:`~.output_source.OutputGradientProbe`.
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "ntk"
    schedule: Schedule = every(100)
    keys = (
        Key(
            "ntk/alignment",
            "centered kernel-target alignment ⟨HKH, HTH⟩_F / (‖HKH‖_F ‖HTH‖_F), rising: rich",
        ),
        Key(
            "ntk/trace",
            "tr K = Σ_i Σ_j ‖J_j[i]‖², the trace of the empirical NTK on the probe's batch",
        ),
        Key(
            "ntk/change",
            "‖K_t − K_0‖_F / ‖K_0‖_F against the first measurement (small throughout: lazy)",
        ),
    )

    max_outputs: int = 16
    seed: int = 0
    _initial: Tensor | None = field(default=None, init=False, repr=False)  # [n, n] K_0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("NTKAlignment", "max_outputs", self.max_outputs, 1)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        inputs, targets = self.subset(ctx)
        projections = self.projections(_output_count(ctx.model, inputs, self.mode))  # [C, k]
        kernel = self.kernel(ctx.model, inputs, projections)  # [n, n]
        if self._initial is None or self._initial.shape != kernel.shape:
            self._keep(_initial=kernel)
        labels = label_kernel(targets.to(kernel.device))
        return {
            f"{self.name}/alignment": centered_alignment(kernel, labels),
            f"{self.name}/trace": torch.trace(kernel),
            f"{self.name}/change": relative_change(kernel, self._initial),
        }

    def projections(self, outputs: int) -> Tensor:
        """``V`` ``[C, k]``: ``I_C``, or ``k = max_outputs`` Rademacher columns ``/ √k``."""
        if outputs <= self.max_outputs:
            return torch.eye(outputs, dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (outputs, self.max_outputs), generator=gen) * 2 - 1
        return signs.double() / self.max_outputs**0.5

    def reset(self) -> None:
        """Forget ``K_0`` (and a subset frozen from a step batch)."""
        self._keep(_initial=None)
        super().reset()


def _output_count(model: nn.Module, inputs: Any, mode: str) -> int:
    """``C``, the model's outputs per example (one forward pass over the subset)."""
    with observing(model, mode) as eager, torch.no_grad():  # type: ignore[arg-type]
        out = eager(inputs)
    size = out.shape[0] if isinstance(out, Tensor) and out.ndim > 0 else -1
    return class_outputs(out, size, "NTKAlignment").shape[1]
