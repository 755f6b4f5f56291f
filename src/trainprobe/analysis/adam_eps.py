"""Adam ε domination: ``ε`` at or above ``√v̂`` for most weights, so Adam's normalised step
has shrunk to a fraction of what the learning rate intends (Everett et al. 2024)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..store import Run
from ._checks import check_count, check_positive
from ._series import finite_series, fmt, true_runs
from .findings import Finding, Severity

NAME = "adam_eps_domination"
TOTAL_KEY = "adam/eps_shrink_total"
TENSOR_PREFIX = "adam/eps_shrink"
SHARE_KEY = "adam/eps_share_total"

LIMIT = 0.2
"""The default step factor read as dominated (see :func:`detect_adam_eps_domination`)."""
SHOWN_TENSORS = 3
"""Most-shrunk tensors the evidence names."""

NEEDS = (TOTAL_KEY,)
"""Record keys it needs: ``AdamHealth``'s step factor over every tensor (its per-tensor
factors and the ε-dominated share are read when present, as evidence)."""


def detect_adam_eps_domination(
    run: Run, *, limit: float = LIMIT, min_points: int = 3
) -> list[Finding]:
    """Adam steps shrunk by ``ε``: the optimiser runs as SGD with momentum at ``lr / ε``.

    Adam moves each weight by ``lr · m̂ / (√v̂ + ε)``. Where the gradients' RMS ``√v̂`` is
    well above ``ε`` the step is normalised, about ``lr`` per weight whatever the
    gradient's scale; where ``√v̂`` falls to ``ε`` or below, the step becomes
    ``lr · m̂ / ε``: proportional to the gradient, i.e. SGD at the rate ``lr / ε``,
    which nobody chose. It happens when gradients are small against ``ε`` — wide layers
    (Everett et al. 2024, *Scaling Exponents Across Parameterizations and Optimizers*,
    §4; Wortsman et al. 2023, §3.4), a loss scaled down by mistake (a sum divided by a
    large constant twice) — or when ``ε`` is large.

    ``AdamHealth`` records ``adam/eps_shrink_total``, the RMS of Adam's step with ``ε``
    over its RMS without, over the weights with ``v̂ > 0``. Reported (``WARNING``) where
    it stays at or below ``limit`` for ``min_points`` consecutive measurements or more:
    the steps are at least ``1 / limit`` times smaller than the learning rate intends.

    Thresholds from the detector corpus (``benchmarks/corpus/transformer_cases.py``, 3
    seeds each): on decoders learning a Markov chain with AdamW 3e-3, ``ε`` = 1e-3 shrinks
    the steps to 0.37-0.38 and the loss scaled by 1e-4 to 0.77-0.80, both with the loss
    unharmed; ``ε`` = 1e-2 gives 0.07-0.08, ``ε`` = 0.1 and the loss scaled by 1e-7
    0.012-0.016, each ending at a higher loss than the same seed with a small ``ε``. On a
    library encoder learning to copy, with Adam 1e-3, ``ε`` = 1e-3 gives 0.54 and solves
    the copy; ``ε`` = 0.1 (0.03) and the loss scaled by 1e-6 (0.11) leave it unsolved. The
    limit sits between the harmed runs' largest (0.12) and the unharmed runs' smallest
    (0.37) factors.

    Args:
        run: the run to read.
        limit: the step factor at or below which the steps count as dominated (default
            0.2: steps five times smaller than the learning rate intends).
        min_points: consecutive measurements at or below ``limit`` (default 3).
    """
    check_positive("limit", limit)
    check_count("min_points", min_points, minimum=1, what="consecutive measurements")
    steps, values = finite_series(run, TOTAL_KEY)
    if values.size < min_points:
        return []
    spans = [(a, b) for a, b in true_runs(values <= limit) if b - a + 1 >= min_points]
    if not spans:
        return []
    first, last = max(spans, key=lambda span: span[1] - span[0])  # the longest stretch
    start, end = int(steps[first]), int(steps[last])
    inside = values[first : last + 1]
    typical = float(np.median(inside))
    evidence: dict[str, float | int | str] = {
        "median_step_factor": typical,
        "lowest_step_factor": float(inside.min()),
        "limit": limit,
        "measurements": int(inside.size),
        "dominated_stretches": len(spans),
    }
    keys = [TOTAL_KEY]
    share = _median_within(run, SHARE_KEY, start, end)
    if share is not None:
        evidence["eps_dominated_share"] = share
        keys.append(SHARE_KEY)
    tensors = _most_shrunk(run, start, end)
    if tensors:
        evidence["most_shrunk"] = ", ".join(f"{name} ({fmt(v)})" for name, v in tensors)
        keys.extend(f"{TENSOR_PREFIX}/{name}" for name, _ in tensors)
    eps, lr = _adam_settings(run)
    rate = ""
    if eps is not None:
        evidence["eps"] = eps
        if lr is not None:
            evidence["lr_over_eps"] = lr / eps
            rate = f" (lr / ε = {fmt(lr / eps)} with ε = {fmt(eps)})"
    said = f"; ε ≥ √v̂ for {share:.0%} of the weights" if share is not None else ""
    return [
        Finding(
            detector=NAME,
            severity=Severity.WARNING,
            start_step=start,
            end_step=end,
            message=(
                f"Adam's steps were {fmt(typical)}× the normalised step (median over "
                f"{inside.size} measurements, steps {start}-{end}): ε dominates the "
                f"gradients' RMS, and Adam is running as SGD with momentum{rate}{said}"
            ),
            action=(
                "lower Adam's eps below the gradients' RMS (e.g. 1e-12 or less), or find "
                "what makes the gradients tiny: a loss scaled down (a sum divided by a "
                "large constant twice, a small loss weight) or very wide layers"
            ),
            evidence=evidence,
            keys=tuple(keys),
        )
    ]


def _median_within(run: Run, key: str, start: int, end: int) -> float | None:
    if key not in run:
        return None
    steps, values = finite_series(run, key)
    inside = values[(steps >= start) & (steps <= end)]
    return float(np.median(inside)) if inside.size else None


def _most_shrunk(run: Run, start: int, end: int) -> list[tuple[str, float]]:
    """The tensors with the smallest median step factor within ``[start, end]``."""
    medians = []
    prefix = f"{TENSOR_PREFIX}/"
    for key in run.keys():  # noqa: SIM118 (a Run is not a mapping)
        if key.startswith(prefix):
            value = _median_within(run, key, start, end)
            if value is not None:
                medians.append((value, key[len(prefix) :]))
    return [(name, value) for value, name in sorted(medians)[:SHOWN_TENSORS]]


def _adam_settings(run: Run) -> tuple[float | None, float | None]:
    """``(eps, lr)`` of the optimizer's parameter groups when every group has the same
    ones (the run's metadata, written by ``watch(optimizer=...)``), else ``None``s."""
    optimizer: Any = run.meta.get("optimizer") or {}
    groups = optimizer.get("param_groups") or []
    eps = {g.get("eps") for g in groups}
    lr = {g.get("lr") for g in groups}
    one_eps = next(iter(eps)) if len(eps) == 1 else None
    one_lr = next(iter(lr)) if len(lr) == 1 else None
    if not isinstance(one_eps, (int, float)) or not one_eps > 0:
        return None, None
    return float(one_eps), float(one_lr) if isinstance(one_lr, (int, float)) else None
