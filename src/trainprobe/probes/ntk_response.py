"""How the model's outputs respond along the NTK's label-carrying directions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..functional import ParamSelection, check_mode, network
from ..gradients import METHODS
from ..gradients.ntk import label_directions, tangent_kernel
from ..keys import Key
from ._supervised import (
    FixedSubset,
    check_count,
    class_outputs,
    observing,
    one_vs_rest,
    signed_labels,
)
from .base import StepContext, Value, probe_name
from .schedules import Schedule, check_schedule, every


class NTKResponse:
    """The network's output along the label-carrying eigendirections of its initial NTK,
    relative to the labels (Pezeshki et al. 2021, Figure 2).

    Scalar output and ``±1`` labels: ``f(x) = z(x)`` for one output; for ``C >= 2`` outputs
    one-vs-rest on ``positive_class`` ``c``: ``f = z_c − mean_{c'≠c} z_c'`` (``z_1 − z_0``
    for two classes) and ``y_i = +1`` iff the label is ``c`` (labels ``{0, 1}`` or
    ``{−1, +1}`` for one output: ``+1`` iff the label equals ``positive_class``).

    At the first measurement (at initialisation when the schedule includes step 0), on a
    fixed subset ``X`` of ``n`` examples: ``K_0 = J Jᵀ`` ``[n, n]`` from the per-example
    gradients of ``f``, eigenpairs ``(λ_k, u_k)`` in decreasing ``λ``, and the label energy
    ``e_k = (u_kᵀy)² / ‖y‖²`` (``Σ_k e_k = 1``). The recorded directions ``D`` are the
    first ``directions`` in that order with ``e_k >= min_label_energy`` (numerically null
    ones, ``λ_k < 1e-6 λ_0``, skipped). At every measurement, with ``f(X)`` ``[n]``:

        ``r_k = u_kᵀ f(X) / u_kᵀ y``      (unchanged by the sign of ``u_k``).

    Under squared loss a kernel fit drives every ``r_k`` to 1. Under cross-entropy the
    strong directions overshoot (``r_k`` grows with the margins) and, in the linearised
    analysis of Pezeshki et al., their growth suppresses the rest: a label-carrying
    direction whose ``r_k`` stays an order of magnitude below the others is starved.

    Keys: see ``keys``. At initialisation the ``r_k`` are noise (``f`` has not learned
    yet): read ``min_ratio`` once the labels are fitted.

    State: the subset, ``u_k`` and ``u_kᵀy`` for ``k ∈ D``; :meth:`reset` forgets them.

    Args:
        schedule: when to measure (default every 10 steps; the first measurement costs one
            per-example-gradient pass and an ``n × n`` eigendecomposition, later ones a
            forward pass).
        data: a fixed batch ``(x, y)``; its first ``max_examples`` examples are the subset.
            Default: the first measured step's ``batch=``, frozen.
        directions: the most directions recorded.
        min_label_energy: ``e_k`` a direction needs to count as label-carrying.
        positive_class: the class ``c`` treated as ``+1``.
        max_examples: ``n``, at most 256.
        params, mode, method, max_memory: of the per-example gradients (see
            :func:`trainprobe.gradients.per_sample_gradients`); ``mode`` also sets the
            semantics of the forward passes.
    """

    name = "ntk_response"
    keys = (
        Key("ntk_response/dir_<k>", "r of the k-th direction of D"),
        Key(
            "ntk_response/min_ratio",
            "min_k r_k / max_k r_k (NaN while max_k r_k <= 0); near 0, or negative: starvation",
        ),
    )
    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        schedule: Schedule | None = None,
        name: str | None = None,
        data: Any = None,
        directions: int = 4,
        min_label_energy: float = 0.02,
        positive_class: int = 1,
        max_examples: int = 256,
        params: ParamSelection = None,
        mode: str = "eval",
        method: str = "auto",
        max_memory: int | None = None,
    ) -> None:
        self.schedule = every(10) if schedule is None else schedule
        check_schedule(self.schedule, "NTKResponse")
        self.name = probe_name(self, name)
        self.directions = check_count("NTKResponse", "directions", directions, 1)
        if not 0 < min_label_energy <= 1:
            raise ValueError(
                f"NTKResponse: min_label_energy must be in (0, 1], got {min_label_energy!r}"
            )
        if method not in METHODS:
            raise ValueError(f"NTKResponse: method must be one of {METHODS}, got {method!r}")
        self.min_label_energy, self.positive_class = min_label_energy, positive_class
        self.max_examples = check_count("NTKResponse", "max_examples", max_examples, 2, 256)
        self.params, self.mode, self.method = params, check_mode(mode), method
        self.max_memory = max_memory
        self._subset = FixedSubset(data, max_examples, "NTKResponse")
        self._basis: tuple[Tensor, Tensor] | None = None  # [n, k] u_k, [k] u_kᵀy

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        x, y = self._subset.get(ctx.batch)
        with observing(ctx.model, self.mode) as model, torch.no_grad():
            outputs = class_outputs(model(x), y.shape[0], "NTKResponse")  # [n, C]
        v = one_vs_rest(outputs.shape[1], self.positive_class)  # [C]
        if self._basis is None:
            self._basis = self._directions(ctx.model, x, signed_labels(y, self.positive_class), v)
        basis, label_proj = self._basis
        f = outputs.double() @ v.to(outputs.device)  # [n]
        ratios = (basis.T @ f) / label_proj  # [k]
        top = ratios.max()
        out: dict[str, Value] = {f"{self.name}/dir_{k}": r for k, r in enumerate(ratios)}
        out[f"{self.name}/min_ratio"] = torch.where(top > 0, ratios.min() / top, torch.nan)
        return out

    def _directions(self, model: nn.Module, x: Any, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``u_k`` ``[n, k]`` and ``u_kᵀy`` ``[k]`` of the label-carrying directions ``D``."""
        outputs = network(model, params=self.params, mode=self.mode)
        kernel, used = tangent_kernel(
            outputs, x, v[:, None], method=self.method, max_memory=self.max_memory
        )
        self.method = "loop" if used == "loop" else self.method
        found = label_directions(kernel, y, count=self.directions, min_energy=self.min_label_energy)
        if found is None:
            raise ValueError(
                f"NTKResponse: no eigendirection of the initial NTK carries >= "
                f"{self.min_label_energy} of the label energy; lower min_label_energy"
            )
        return found

    def reset(self) -> None:
        """Forget the directions (and a subset frozen from a step batch)."""
        self._basis = None
        self._subset.reset()

    def settings(self) -> dict[str, Any]:
        return {
            "data": "fixed batch" if self._subset.given else "first step batch",
            "directions": self.directions,
            "min_label_energy": self.min_label_energy,
            "positive_class": self.positive_class,
            "max_examples": self.max_examples,
            "mode": self.mode,
            "method": self.method,
            "max_memory": self.max_memory,
            "params": self.params if isinstance(self.params, str | None) else repr(self.params),
        }
