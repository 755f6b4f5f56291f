"""How the model's outputs respond along the NTK's label-carrying directions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..gradients.ntk import label_directions
from ..keys import Key
from .base import StepContext, Value
from .batches import observing
from .labels import class_outputs, one_vs_rest, signed_labels
from .output_source import OutputGradientProbe, check_count
from .schedules import Schedule, every


@dataclass(frozen=True, kw_only=True, eq=False)
class NTKResponse(OutputGradientProbe):
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
            per-example-gradient pass (more when ``max_memory`` cannot hold the ``[n, P]``
            Jacobian: see :class:`~.output_source.OutputGradientProbe`) and an ``n × n``
            eigendecomposition, later ones a forward pass).
        directions: the most directions recorded.
        min_label_energy: ``e_k`` a direction needs to count as label-carrying.
        positive_class: the class ``c`` treated as ``+1``.
        data, max_examples, params, mode, method, max_memory: the subset and its
            per-example gradients, see :class:`~.output_source.OutputGradientProbe`
            (``mode`` also sets the semantics of the forward passes).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "ntk_response"
    schedule: Schedule = every(10)
    keys = (
        Key(
            "ntk_response/dir_<k>",
            "the output's response along the k-th label-carrying eigendirection of the initial "
            "NTK, over its label energy (Pezeshki et al. 2021); near 0: not learned",
        ),
        Key(
            "ntk_response/min_ratio",
            "min_k r_k / max_k r_k (NaN while max_k r_k <= 0); near 0, or negative: starvation",
        ),
    )

    directions: int = 4
    min_label_energy: float = 0.02
    positive_class: int = 1
    # u_k [n, k] and u_kᵀy [k] of the directions D, found at the first measurement
    _basis: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("NTKResponse", "directions", self.directions, 1)
        if not 0 < self.min_label_energy <= 1:
            raise ValueError(
                f"NTKResponse: min_label_energy must be in (0, 1], got {self.min_label_energy!r}"
            )

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        x, y = self.subset(ctx)
        with observing(ctx.model, self.mode) as model, torch.no_grad():
            outputs = class_outputs(model(x), y.shape[0], "NTKResponse")  # [n, C]
        v = one_vs_rest(outputs.shape[1], self.positive_class)  # [C]
        if self._basis is None:
            labels = signed_labels(y, self.positive_class)  # [n]
            self._keep(_basis=self._directions(ctx.model, x, labels, v))
        basis, label_proj = self._basis  # type: ignore[misc]
        f = outputs.double() @ v.to(outputs.device)  # [n]
        ratios = (basis.T @ f) / label_proj  # [k]
        top = ratios.max()
        out: dict[str, Value] = {f"{self.name}/dir_{k}": r for k, r in enumerate(ratios)}
        out[f"{self.name}/min_ratio"] = torch.where(top > 0, ratios.min() / top, torch.nan)
        return out

    def _directions(self, model: nn.Module, x: Any, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``u_k`` ``[n, k]`` and ``u_kᵀy`` ``[k]`` of the label-carrying directions ``D``."""
        kernel = self.kernel(model, x, v[:, None])  # [n, n]
        found = label_directions(kernel, y, count=self.directions, min_energy=self.min_label_energy)
        if found is None:
            raise ValueError(
                f"NTKResponse: no eigendirection of the initial NTK carries >= "
                f"{self.min_label_energy} of the label energy; lower min_label_energy"
            )
        return found

    def reset(self) -> None:
        """Forget the directions (and a subset frozen from a step batch)."""
        self._keep(_basis=None)
        super().reset()
