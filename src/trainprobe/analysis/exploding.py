"""Exploding gradients: jumps and sustained growth of the global gradient norm."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_count, check_positive, check_window
from ._series import finite_series, fmt, rolling_median, trailing_median_mad, true_runs
from .findings import Finding, Severity

NAME = "exploding_gradients"
TOTAL = "norms/grad_total"

_CLIP = "enable gradient clipping (torch.nn.utils.clip_grad_norm_)"


NEEDS = (TOTAL,)
"""Record keys it reads: the global gradient norm."""


def detect_exploding_gradients(
    run: Run,
    *,
    window: int = 20,
    jump_factor: float = 10.0,
    level_factor: float = 3.0,
    growth_decades: float = 2.0,
    max_jumps: int = 5,
) -> list[Finding]:
    """Jumps and sustained growth of the global gradient norm ``norms/grad_total``.

    *Jump*: ``g_i > jump_factor * med_i``, with ``med_i`` the median of the (up to)
    ``window`` measurements before ``i`` (no look-ahead; from the second measurement, so
    that gradients exploding at once are seen), and ``g_i > level_factor *
    L_i``, ``L_i`` the highest trailing median the norm has held before ``i`` (usually
    its early-training level): a norm of 0.015 near convergence that jumps to 1.4 is
    91x its trailing median but below what the run handled early on, a fit model's
    noise rather than an explosion. A jump span is ``CRITICAL`` when the median of the
    next ``window`` points stays above both ``jump_factor * med`` and ``level_factor *
    L`` (stuck above anything the run held), else ``WARNING``. Consecutive jump points
    form a span. *Growth*: the rolling median of ``log10 g`` over ``window`` points
    climbs by ``>= growth_decades`` from its lowest earlier value, to ``level_factor``
    times the highest median it held before that low or more; ``CRITICAL`` from
    ``2 * growth_decades``. Growth is not
    reported when a jump inside it accounts for half of the climb or more
    (``log10(ratio) >= climb / 2``): a step change is a jump, not a trend. At most
    ``max_jumps`` jump findings are returned, the largest ratios, in step order;
    each carries the total count as ``jumps_on_key``.

    Args:
        run: the run to read.
        window: measurements per median (default 20: 200 steps at every-10 scheduling).
        jump_factor: jump threshold over the trailing median (default 10; healthy
            gradient norms fluctuate by 2-3x between mini-batches).
        level_factor: jump threshold over the highest level held before (default 3).
        growth_decades: orders of magnitude of sustained growth (default 2: the
            late-training drift of a healthy norm is a few x, not 100x).
        max_jumps: most jump findings returned (default 5).

    Returns:
        One finding per jump span (at most ``max_jumps``), and one for growth.

    Raises:
        ValueError: ``window < 3``, a non-positive threshold or ``max_jumps < 1``.
        TypeError: ``window`` or ``max_jumps`` is not an int.
    """
    check_window("window", window)
    check_count("max_jumps", max_jumps, minimum=1, what="jump findings")
    check_positive("jump_factor", jump_factor)
    check_positive("level_factor", level_factor)
    check_positive("growth_decades", growth_decades)
    steps, norms = finite_series(run, TOTAL)
    keep = norms > 0
    steps, norms = steps[keep], norms[keep]
    if norms.shape[0] < 4:
        return []
    jumps = _jumps(steps, norms, window, (jump_factor, level_factor))
    growth = _growth(steps, norms, window, (growth_decades, level_factor))
    findings = sorted(
        sorted(jumps, key=lambda f: -f.evidence["ratio"])[:max_jumps], key=lambda f: f.start_step
    )
    if growth is not None and not any(_explains(jump, growth) for jump in jumps):
        findings.append(growth)
    return findings


def is_jump(finding: Finding) -> bool:
    """Whether a finding of this detector is a jump (not sustained growth)."""
    return finding.detector == NAME and "ratio" in finding.evidence


def _explains(jump: Finding, growth: Finding) -> bool:
    """Whether ``jump`` overlaps ``growth`` and makes up half of its climb or more."""
    overlaps = jump.start_step <= growth.end_step and jump.end_step >= growth.start_step
    return overlaps and np.log10(jump.evidence["ratio"]) >= 0.5 * growth.evidence["decades"]


def _jumps(
    steps: np.ndarray, norms: np.ndarray, window: int, factors: tuple[float, float]
) -> list[Finding]:
    factor, level_factor = factors
    # from the second measurement on: a run whose gradients explode at once has no other
    # baseline than its first point (a norm of 0.13, then 8e4 ten steps later)
    med, _ = trailing_median_mad(norms, window, min_periods=1)
    # the highest level held so far, from medians of 3 or more points (from the fourth
    # point on): one large first gradient (common) is not a level
    level = np.maximum.accumulate(np.concatenate([np.zeros(min(3, med.size)), med[3:]]))
    with np.errstate(invalid="ignore"):
        hit = (norms > factor * med) & (norms > level_factor * level)
    findings = []
    spans = true_runs(hit)
    for first, last in spans:
        peak = first + int(np.argmax(norms[first : last + 1]))
        after = norms[last + 1 : last + 1 + window]
        post = float(np.median(after)) if after.size else float("nan")
        # stuck: it stays far above where it was *and* above anything the run held before
        # (a run settling at a new, ordinary level, as gradient descent reaching the edge of
        # stability does, is not stuck)
        stuck = after.size > 0 and post > max(factor * med[first], level_factor * level[first])
        ratio = float(norms[peak] / med[first])
        findings.append(
            Finding(
                NAME,
                Severity.CRITICAL if stuck else Severity.WARNING,
                int(steps[first]),
                int(steps[last]),
                f"{TOTAL} jumped to {fmt(norms[peak])} at step {int(steps[peak])}, {fmt(ratio)}x "
                f"its trailing median {fmt(med[first])}"
                + (f", and stayed high (median {fmt(post)} afterwards)" if stuck else ""),
                f"Lower the learning rate or {_CLIP}, and inspect the batches around step "
                f"{int(steps[first])}.",
                {
                    "peak": float(norms[peak]),
                    "peak_step": int(steps[peak]),
                    "trailing_median": float(med[first]),
                    "ratio": ratio,
                    "jump_factor": factor,
                    "level_held": float(level[first]),
                    "level_factor": level_factor,
                    "window": window,
                    "jumps_on_key": len(spans),
                    **({"median_after": post} if after.size else {}),
                },
                (TOTAL,),
            )
        )
    return findings


def _growth(
    steps: np.ndarray, norms: np.ndarray, window: int, levels: tuple[float, float]
) -> Finding | None:
    decades, level_factor = levels
    smooth = rolling_median(np.log10(norms), window)  # [n - window + 1]
    if smooth.shape[0] < 2:
        return None
    rise = smooth - np.minimum.accumulate(smooth)
    top = int(np.argmax(rise))
    low = int(np.argmin(smooth[: top + 1]))
    climb = float(rise[top])
    if climb < decades:
        return None
    # growth that only climbs back toward the level the run held before its low (a norm
    # at the float32 floor, 1e-20 -> 1e-17, after starting near 1) is not an explosion
    held = float(smooth[: low + 1].max())
    if smooth[top] < held + np.log10(level_factor):
        return None
    start, end = float(10 ** smooth[low]), float(10 ** smooth[top])
    return Finding(
        NAME,
        Severity.CRITICAL if climb >= 2 * decades else Severity.WARNING,
        int(steps[low]),
        int(steps[top + window - 1]),
        f"{TOTAL} grew by {fmt(climb)} orders of magnitude without settling, its "
        f"{window}-point median rising from {fmt(start)} to {fmt(end)}",
        f"Lower the learning rate (or lengthen warmup) and {_CLIP} before the growth turns "
        "into a divergence.",
        {
            "median_start": start,
            "median_end": end,
            "decades": climb,
            "growth_decades": decades,
            "window": window,
        },
        (TOTAL,),
    )
