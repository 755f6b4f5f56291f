"""Lazy or rich: the empirical NTK on a fixed subset, its alignment with the labels and how
far it has moved since the first measurement (Kumar, Bordelon, Gershman & Pehlevan 2024,
"Grokking as the transition from lazy to rich training dynamics")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..functional import ParamSelection, check_mode, network
from ..gradients import METHODS
from ..gradients.ntk import centered_alignment, label_kernel, relative_change, tangent_kernel
from ..keys import Key
from ._supervised import FixedSubset, check_count, class_outputs, observing
from .base import StepContext, Value, probe_name
from .schedules import Schedule, check_schedule, every


class NTKAlignment:
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
            most ``max_outputs``) per-example-gradient passes over ``n`` examples).
        data: a fixed batch ``(x, y)``; its first ``max_examples`` examples are the subset.
            Default: the first measured step's ``batch=``, frozen.
        max_examples: ``n``, at most 256 (``K`` is ``[n, n]``).
        max_outputs: exact trace kernel up to this many outputs, else a sketch.
        seed: generator seed of the sketch's Rademacher columns.
        params: which parameters (None: all trainable; a regex, names or a module).
        mode: ``"eval"`` (default: BatchNorm running statistics, no dropout) or ``"train"``.
        method: per-example gradients by ``"auto"`` (default), ``"vmap"`` or ``"loop"``.
        max_memory: bytes per chunk of per-example gradients.
    """

    name = "ntk"
    keys = (
        Key(
            "ntk/alignment",
            "centered kernel-target alignment ⟨HKH, HTH⟩_F / (‖HKH‖_F ‖HTH‖_F), rising: rich",
        ),
        Key("ntk/trace", "tr K = Σ_i Σ_j ‖J_j[i]‖²"),
        Key(
            "ntk/change",
            "‖K_t − K_0‖_F / ‖K_0‖_F against the first measurement (small throughout: lazy)",
        ),
    )
    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        schedule: Schedule | None = None,
        name: str | None = None,
        data: Any = None,
        max_examples: int = 256,
        max_outputs: int = 16,
        seed: int = 0,
        params: ParamSelection = None,
        mode: str = "eval",
        method: str = "auto",
        max_memory: int | None = None,
    ) -> None:
        self.schedule = every(100) if schedule is None else schedule
        check_schedule(self.schedule, "NTKAlignment")
        self.name = probe_name(self, name)
        self.max_examples = check_count("NTKAlignment", "max_examples", max_examples, 2, 256)
        self.max_outputs = check_count("NTKAlignment", "max_outputs", max_outputs, 1)
        if method not in METHODS:
            raise ValueError(f"NTKAlignment: method must be one of {METHODS}, got {method!r}")
        self.seed, self.params, self.mode, self.method = seed, params, check_mode(mode), method
        self.max_memory = max_memory
        self._subset = FixedSubset(data, max_examples, "NTKAlignment")
        self._initial: Tensor | None = None  # [n, n] K_0

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        inputs, targets = self._subset.get(ctx.batch)
        projections = self.projections(_output_count(ctx.model, inputs, self.mode))  # [C, k]
        outputs = network(ctx.model, params=self.params, mode=self.mode)
        kernel, used = tangent_kernel(
            outputs, inputs, projections, method=self.method, max_memory=self.max_memory
        )
        self.method = "loop" if used == "loop" else self.method
        if self._initial is None or self._initial.shape != kernel.shape:
            self._initial = kernel
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
        self._initial = None
        self._subset.reset()

    def settings(self) -> dict[str, Any]:
        return {
            "data": "fixed batch" if self._subset.given else "first step batch",
            "max_examples": self.max_examples,
            "max_outputs": self.max_outputs,
            "seed": self.seed,
            "mode": self.mode,
            "method": self.method,
            "params": self.params if isinstance(self.params, str | None) else repr(self.params),
            "max_memory": self.max_memory,
        }


def _output_count(model: nn.Module, inputs: Any, mode: str) -> int:
    """``C``, the model's outputs per example (one forward pass over the subset)."""
    with observing(model, mode) as eager, torch.no_grad():  # type: ignore[arg-type]
        out = eager(inputs)
    size = out.shape[0] if isinstance(out, Tensor) and out.ndim > 0 else -1
    return class_outputs(out, size, "NTKAlignment").shape[1]
