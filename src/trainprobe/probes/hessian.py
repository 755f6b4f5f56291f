"""Hessian spectrum probes: top eigenpairs, trace and spectral density."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..curvature import hutch_plus_plus, hutchinson, spectral_density
from ..keys import Key
from ._curvature import CurvatureProbe
from .base import StepContext, Value


@dataclass(frozen=True, kw_only=True, eq=False)
class HessianTop(CurvatureProbe):
    """Extreme Hessian eigenvalues by Lanczos, warm-started from the last measurement.

    Keys: see ``keys`` (``eig_<i>`` for ``i < top``, ``bottom_<i>`` for ``i < bottom``,
    ``eigvecs`` with ``vectors=True``).

    Args:
        top: how many of the largest eigenvalues.
        bottom: how many of the most negative ones (negative curvature, saddles).
        tol: Lanczos residual tolerance relative to ``max |θ|``; eigenvalue errors
            are about ``tol² · |θ|² / gap`` (Parlett, *The Symmetric Eigenvalue
            Problem*, §11.7): ``1e-4`` gave relative errors below 1e-7 on MLP
            Hessians, for one or two products more than ``1e-3`` (whose worst error
            there was 9e-6).
        value_tol: also stop once every eigenvalue's error estimate is at most
            ``value_tol · |θ_i|``, relative to each eigenvalue (see
            :func:`~trainprobe.curvature.lanczos`): the setting to use when only the
            values matter (``1e-6``: a top-1 in 10–12 products on the float32 MLP
            Hessian of ``benchmarks/curvature.py``, error below 3e-7). Default None:
            ``tol`` only.
        max_iter: cap on Lanczos steps (default: 100 or 10 × wanted).
        warm_start: start from the previous measurement's eigenvectors (a few
            steps later they have barely turned: far fewer products).
        vectors: also record the eigenvectors (``P × k`` floats per measurement).
        data, batches, loss_fn, params, mode, engine, dtype, seed, schedule, name: see
            :class:`CurvatureProbe`.
    """

    name: str = "hessian"
    keys = (
        Key("hessian/eig_<i>", "the i-th largest Hessian eigenvalue"),
        Key("hessian/bottom_<i>", "the i-th most negative Hessian eigenvalue"),
        Key(
            "hessian/residual_<i>",
            "‖H y − θ y‖ of the i-th largest eigenpair; large: a rough eigenvalue",
        ),
        Key(
            "hessian/bottom_residual_<i>",
            "‖H y − θ y‖ of the i-th most negative eigenpair; large: a rough eigenvalue",
        ),
        Key("hessian/hvps", "Hessian-vector products spent"),
        Key(
            "hessian/fd_error",
            "the largest estimated relative error of the products when the finite-difference "
            "engine ran (a layer without a double backward; each product is checked and refused "
            "over 1e-2); absent for the exact engines",
        ),
        Key("hessian/converged", "1 when Lanczos converged, else 0"),
        Key("hessian/eigvecs", "[P, top + bottom] float32 eigenvectors"),
    )

    top: int = 1
    bottom: int = 0
    tol: float = 1e-4
    value_tol: float | None = None
    max_iter: int | None = None
    warm_start: bool = True
    vectors: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        top, bottom = self.top, self.bottom
        if top < 0 or bottom < 0 or top + bottom < 1:
            raise ValueError(f"HessianTop: need top + bottom >= 1, got top={top}, bottom={bottom}")

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        op = self.operator(ctx)
        pairs = self.eigenpairs(
            op,
            op.dim,
            ctx.step,
            warm=self.warm_start,
            top=self.top,
            bottom=self.bottom,
            tol=self.tol,
            value_tol=self.value_tol,
            max_iter=self.max_iter,
        )
        out: dict[str, Value] = {
            f"{self.name}/hvps": float(op.matvecs),
            **self.engine_record(op),
            f"{self.name}/converged": float(pairs.converged),
        }
        values, residuals = pairs.values.tolist(), pairs.residuals.tolist()
        for i in range(len(values)):
            kind, j = ("eig", i) if i < self.top else ("bottom", i - self.top)
            out[f"{self.name}/{kind}_{j}"] = values[i]
            prefix = "" if kind == "eig" else "bottom_"
            out[f"{self.name}/{prefix}residual_{j}"] = residuals[i]
        if self.vectors:
            out[f"{self.name}/eigvecs"] = pairs.vectors.to(torch.float32)  # [P, k]
        return out


@dataclass(frozen=True, kw_only=True, eq=False)
class HessianTrace(CurvatureProbe):
    """``tr(H)``, the sum of all curvatures, by Hutch++ (or Hutchinson).

    Keys: see ``keys``.

    Args:
        matvecs: Hessian-vector products per measurement (batched in one call).
        method: ``"hutch++"`` (Meyer et al. 2021; default, exact on low-rank parts) or
            ``"hutchinson"`` (Hutchinson 1989).
        data, batches, loss_fn, params, mode, engine, dtype, seed, schedule, name: see
            :class:`CurvatureProbe`.
    """

    name: str = "hessian_trace"
    keys = (
        Key("hessian_trace/trace", "the estimate of tr(H)"),
        Key("hessian_trace/stderr", "the standard error of the estimate"),
        Key("hessian_trace/hvps", "Hessian-vector products spent"),
        Key(
            "hessian_trace/fd_error",
            "the largest estimated relative error of the products when the finite-difference "
            "engine ran (a layer without a double backward; each product is checked and refused "
            "over 1e-2); absent for the exact engines",
        ),
    )

    matvecs: int = 100
    method: str = "hutch++"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ("hutch++", "hutchinson"):
            raise ValueError(
                f"HessianTrace: method must be 'hutch++' or 'hutchinson', got {self.method!r}"
            )

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        op = self.operator(ctx)
        estimator = hutch_plus_plus if self.method == "hutch++" else hutchinson
        estimate = estimator(op, op.dim, matvecs=self.matvecs, generator=self.generator(ctx.step))
        return {
            f"{self.name}/trace": estimate.value,
            f"{self.name}/stderr": estimate.stderr,
            f"{self.name}/hvps": float(op.matvecs),
            **self.engine_record(op),
        }


@dataclass(frozen=True, kw_only=True, eq=False)
class HessianDensity(CurvatureProbe):
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature
    (Ghorbani, Krishnan & Xiao 2019).

    Keys: see ``keys`` (the grid spans this step's spectrum, so it changes between steps).

    Args:
        probes: independent Lanczos runs (batched: one ``matmat`` per step).
        steps: Lanczos steps per run (``probes × steps`` products).
        points: grid size.
        data, batches, loss_fn, params, mode, engine, dtype, seed, schedule, name: see
            :class:`CurvatureProbe`.
    """

    name: str = "hessian_density"
    keys = (
        Key("hessian_density/grid", "[points] eigenvalues λ where the density is evaluated"),
        Key("hessian_density/density", "[points] density φ(λ), integrating to 1"),
        Key("hessian_density/hvps", "Hessian-vector products spent"),
        Key(
            "hessian_density/fd_error",
            "the largest estimated relative error of the products when the finite-difference "
            "engine ran (a layer without a double backward; each product is checked and refused "
            "over 1e-2); absent for the exact engines",
        ),
    )

    probes: int = 4
    steps: int = 40
    points: int = 200

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        op = self.operator(ctx)
        density = spectral_density(
            op,
            op.dim,
            probes=self.probes,
            steps=min(self.steps, op.dim),
            grid=self.points,
            generator=self.generator(ctx.step),
        )
        return {
            f"{self.name}/grid": density.grid,  # [G] float64 on the CPU
            f"{self.name}/density": density.density,  # [G]
            f"{self.name}/hvps": float(op.matvecs),
            **self.engine_record(op),
        }
