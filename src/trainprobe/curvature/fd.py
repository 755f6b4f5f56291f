"""Hessian-vector products by central differences of first-order gradients, each one
with its own error estimate.

``Hv ≈ D(h) = (∇L(w + hv) − ∇L(w − hv)) / 2h`` needs only a backward pass, so it runs
through fused kernels and custom ``autograd.Function`` layers marked
``@once_differentiable`` that the exact engines refuse. Its error has three sources, and
none of them is the same in every direction:

- truncation, ``(h²/6) ∇⁴L[v, v, v]``: large along directions the loss is most curved
  in, which are the directions Lanczos converges to;
- rounding, ``O(ε / h)`` of the gradient's own rounding;
- kinks: where ``h v`` carries a ReLU, max-pool or ``abs`` across its kink, the gradient
  jumps by ``J`` and ``D(h)`` is off by ``J / 2h``, an error that grows as ``h`` shrinks.

So every product is taken at ``h`` and ``2h`` (four gradients) and its error estimated
from the difference, ``‖D(h) − D(2h)‖``: three times the truncation error of ``D(h)``,
about its rounding error, and half a kink's ``J / 2h`` (a kink crossed at ``h`` is
crossed at ``2h``, at half the weight). The estimate is relative to the larger of
``‖D(h)‖`` and ``σ ‖v‖``, with ``σ`` the largest accepted ``‖D(h)‖ / ‖v‖`` so far (a lower
bound of ``‖H‖``): the errors of a product that matter to an eigenvalue are those against
the operator's scale. A product over ``tol`` is taken again at a quarter of the step (the
kink remedy) up to twice; one still over it raises :class:`FiniteDifferenceError`, which
names the estimate and the ways out. ``D(h)`` is returned, and ``error`` holds the
largest estimate of any returned product.

The step, ``h ‖v‖ = c ε^(1/3) (rms(w) + ‖w ⊙ v/‖v‖‖)``, starts from the size of the
weights that ``v`` moves: a direction spread over all ``P`` weights moves each by about
``ε^(1/3) rms(w) / √P``, one concentrated on a few weights moves those by about
``ε^(1/3)`` of their size. (``ε^(1/3) (1 + ‖w‖)``, the textbook rule for a few
variables, moved single weights of an 11M-parameter transformer by thousands of times
their size along Lanczos vectors: λ1 71% off, on the GPU check of ``benchmarks/gpu.py``.)
The power of two ``c`` (``2⁻²..2⁴``) is calibrated once per operator where the estimate
is least (:meth:`CentralDifferences.calibrate`, 22 gradients): the weights' size says
nothing of how far the loss stays quadratic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

FD_TOL = 1e-2
"""Default largest estimated relative error of a finite-difference product."""
RETRIES = 2
"""Times a product over the tolerance is taken again, each at a quarter of the step."""
SHRINK = 4.0
LADDER = (-2, -1, 0, 1, 2, 3, 4)
"""Powers of two of the rule's step that :meth:`CentralDifferences.calibrate` tries."""


class FiniteDifferenceError(FloatingPointError):
    """A finite-difference Hessian-vector product whose estimated error stays over the
    tolerance at every step tried."""


class CentralDifferences:
    """``H V`` column by column from ``gradient_at(w) -> ∇L(w) [P]`` (module doc).

    ``reduce`` (or None) combines the two differences of every column over processes
    before the estimate, so every rank takes the same decisions."""

    def __init__(
        self,
        gradient_at: Callable[[Tensor], Tensor],
        point: Tensor,
        *,
        tol: float = FD_TOL,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not tol > 0:
            raise ValueError(f"fd_tol must be positive, got {tol}")
        self.gradient_at, self.point, self.tol, self.reduce = gradient_at, point, tol, reduce
        self.eps = torch.finfo(point.dtype).eps
        self.rms = point.norm() / point.numel() ** 0.5  # 0-d
        self.scale = 0.0  # σ: the largest accepted ‖D(h)‖ / ‖v‖, a lower bound of ‖H‖
        self.error = 0.0  # the largest estimate of any product returned
        self.multiplier = 1.0  # of the rule's step, set by calibrate

    def step(self, vs: Tensor) -> Tensor:
        """``[k]`` steps ``h`` for the non-zero columns of ``vs [P, k]`` (module doc)."""
        norms = vs.norm(dim=0)  # [k]
        moved = (self.point[:, None] * vs).norm(dim=0) / norms  # [k] ‖w ⊙ v/‖v‖‖
        size = self.rms + moved
        size = torch.where(size > 0, size, torch.ones_like(size))  # all-zero weights: 1
        return self.multiplier * self.eps ** (1 / 3) * size / norms

    def _difference(self, v: Tensor, h: Tensor) -> Tensor:
        return (self.gradient_at(self.point + h * v) - self.gradient_at(self.point - h * v)) / (
            2 * h
        )

    def _pairs(self, vs: Tensor, steps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``D(h)`` and ``D(2h)`` ``[P, k]`` for the columns of ``vs`` and their steps,
        combined over processes (one collective for both)."""
        near = torch.stack([self._difference(v, h) for v, h in zip(vs.T, steps, strict=True)], 1)
        far = torch.stack([self._difference(v, 2 * h) for v, h in zip(vs.T, steps, strict=True)], 1)
        if self.reduce is not None:
            both = self.reduce(torch.cat([near, far], 1))  # [P, 2k]
            near, far = both[:, : vs.shape[1]], both[:, vs.shape[1] :]
        return near, far

    def calibrate(self, v: Tensor, iterations: int = 2) -> None:
        """Set the scale ``σ`` and the step's multiplier, from ``v [P]``.

        ``iterations`` power steps from ``v`` at the rule's step give ``σ`` (a random
        ``v``'s ``‖Hv‖ / ‖v‖`` is far below ``‖H‖`` in a large model, and errors against it
        would refuse sound products) and a direction ``u`` like those Lanczos converges
        to; there the step is taken on the ladder ``2^k`` times the rule's,
        ``k = −2..4``, where ``‖D(2^k h) − D(2^(k+1) h)‖`` is least: the rule knows the
        weights' size, not how far the loss stays quadratic (an MLP's loss is smooth over
        steps many times the rule's, and its rounding error falls with them). Raises
        :class:`FiniteDifferenceError` where the power steps stay over ``tol``."""
        shrink = 1.0
        for _ in range(RETRIES + 1):
            u, ratios, differences = v / v.norm(), [], []
            for _ in range(iterations):
                near, far = self._pairs(u[:, None], [self.step(u[:, None])[0] / shrink])
                ratios.append(near.norm())
                differences.append((near - far).norm())
                u = near[:, 0] / near.norm().clamp_min(_tiny(u))
            scale = float(torch.stack(ratios).max())  # deliberate sync, once
            estimate = float(torch.stack(differences).max()) / max(scale, _tiny(v))
            if estimate <= self.tol:
                break
            shrink *= SHRINK
        else:
            raise FiniteDifferenceError(self._refusal(estimate))
        self.scale = scale
        h = self.step(u[:, None])[0] / shrink
        ladder = torch.stack([self._difference(u, h * 2.0**k) for k in LADDER], 1)
        if self.reduce is not None:
            ladder = self.reduce(ladder)  # [P, len(LADDER)]
        errors = ((ladder[:, :-1] - ladder[:, 1:]).norm(dim=0) / max(scale, _tiny(v))).tolist()
        best = min(range(len(errors)), key=lambda i: (math.isnan(errors[i]), errors[i]))
        if errors[best] <= estimate:  # else the rule's step (a NaN ladder, say)
            self.multiplier = 2.0 ** LADDER[best] / shrink
            estimate = errors[best]
        else:
            self.multiplier = 1 / shrink
        self.error = max(self.error, estimate)

    def products(self, vs: Tensor) -> Tensor:
        """``[P, k]`` products; zero columns give zero. Raises
        :class:`FiniteDifferenceError` when a column stays over ``tol``."""
        out = torch.zeros_like(vs)
        norms = vs.norm(dim=0)
        pending = [i for i, n in enumerate(norms.tolist()) if n > 0]  # deliberate sync
        steps = dict(zip(pending, self.step(vs[:, pending]).unbind(0), strict=True))
        worst = 0.0
        for _ in range(RETRIES + 1):
            if not pending:
                break
            near, far = self._pairs(vs[:, pending], [steps[i] for i in pending])
            size = torch.maximum(near.norm(dim=0), self.scale * norms[pending])  # [k]
            estimates = ((near - far).norm(dim=0) / size.clamp_min(_tiny(vs))).tolist()  # sync
            ratios = (near.norm(dim=0) / norms[pending]).tolist()
            accepted, worst = [], 0.0
            for j, (i, estimate) in enumerate(zip(pending, estimates, strict=True)):
                if estimate <= self.tol:  # NaN compares false: retried, then refused
                    out[:, i] = near[:, j]
                    self.error = max(self.error, estimate)
                    self.scale = max(self.scale, ratios[j])
                    accepted.append(i)
                else:
                    worst = estimate if math.isnan(estimate) or estimate > worst else worst
                    steps[i] = steps[i] / SHRINK
            pending = [i for i in pending if i not in accepted]
        if pending:
            raise FiniteDifferenceError(self._refusal(worst))
        return out

    def _refusal(self, estimate: float) -> str:
        return (
            f"a finite-difference Hessian-vector product has an estimated relative error of "
            f"{estimate:.2g}, over fd_tol={self.tol:g}, at the step and at "
            f"{SHRINK**RETRIES:g} times smaller: the loss is not smooth at this scale "
            f"(a ReLU, max-pool or abs kink within the step) or {self.point.dtype} rounds "
            "the gradients too coarsely. Ways out: an exact engine (engine='graph' or "
            "'jvp') where every layer has the derivative it needs, dtype=torch.float64 "
            "(steps some 800 times smaller than float32's), or a larger fd_tol to accept the error"
        )


def _tiny(like: Tensor) -> float:
    return torch.finfo(like.dtype).tiny
