"""How much of the gradient lies in the top Hessian eigenspace (Gur-Ari, Roberts & Dyer
2018, "Gradient descent happens in a tiny subspace")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..curvature import ParamLayout
from ..keys import Key
from ._curvature import CurvatureProbe
from .base import StepContext, Value


@dataclass(frozen=True, kw_only=True, eq=False)
class GradientSubspace(CurvatureProbe):
    """Fraction of the gradient's squared norm in the span of the top-``k`` eigenvectors.

    ``fraction = ||V_kᵀ g||² / ||g||²`` with ``V_k`` ``[P, k]`` the top-``k``
    Hessian eigenvectors (Lanczos, warm-started) and ``g`` the gradient. Gur-Ari et
    al. find it near 1 for ``k`` = the number of classes soon after training starts;
    a fraction near ``k / P`` means the gradient ignores the curvature's directions.

    Keys: see ``keys``.

    Args:
        k: eigenvectors spanning the subspace (e.g. the number of classes).
        gradient: ``"loss"`` (default): the gradient of the probe's own loss and data,
            consistent with the Hessian; ``"step"``: the parameters' ``.grad`` after the
            user's backward (the gradient the optimizer is about to use).
        tol: Lanczos residual tolerance (relative).
        data, batches, loss_fn, params, mode, engine, dtype, seed, schedule, name: see
            :class:`~._curvature.CurvatureProbe`.
    """

    name: str = "grad_subspace"
    keys = (
        Key("grad_subspace/fraction", "‖V_kᵀ g‖² / ‖g‖², in [0, 1] (NaN for a zero gradient)"),
        Key("grad_subspace/hvps", "Hessian-vector products spent"),
        Key(
            "grad_subspace/fd_error",
            "the largest estimated relative error of the products when the finite-difference "
            "engine ran (a layer without a double backward; each product is checked and refused "
            "over 1e-2); absent for the exact engines",
        ),
    )

    k: int = 10
    gradient: str = "loss"
    tol: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"GradientSubspace: k must be an integer >= 1, got {self.k!r}")
        if self.gradient not in ("loss", "step"):
            raise ValueError(
                f"GradientSubspace: gradient must be 'loss' or 'step', got {self.gradient!r}"
            )

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """``.grad`` after the user's backward only with ``gradient="step"``."""
        return frozenset({"grads"}) if self.gradient == "step" else frozenset()

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        op = self.operator(ctx)
        pairs = self.eigenpairs(op, op.dim, ctx.step, top=min(self.k, op.dim), tol=self.tol)
        g = op.gradient if self.gradient == "loss" else _step_gradient(ctx, op.layout)
        g = g.to(device=pairs.vectors.device, dtype=torch.float64)  # [P]
        inside = pairs.vectors.double().T @ g  # [k] (vectors: float32 for a float32 model)
        fraction = (inside @ inside) / (g @ g)  # NaN for g = 0
        return {
            f"{self.name}/fraction": fraction,
            f"{self.name}/hvps": float(op.matvecs),
            **self.engine_record(op),
        }


def _step_gradient(ctx: StepContext, layout: ParamLayout) -> Tensor:
    """The parameters' ``.grad`` laid out as the operator's ``[P]`` (zeros where None)."""
    grads = {}
    for name in layout.names:
        grad = ctx.params[name].grad
        grads[name] = torch.zeros_like(ctx.params[name]) if grad is None else grad.detach()
    return layout.flatten(grads)  # [P]
