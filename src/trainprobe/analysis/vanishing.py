"""Vanishing gradients: a fading first-to-last layer gradient ratio, or a stalled global norm."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_below, check_fraction, check_positive, check_window
from ._series import (
    GRAD_NORMS,
    LOSS_KEY,
    finite_series,
    fmt,
    param_order,
    rolling_median,
    true_runs,
    window_cover,
)
from .findings import Finding, Severity

NAME = "vanishing_gradients"
TOTAL = "norms/grad_total"


THROUGH_TIME = "grad_flow/ratio"

NEEDS = (f"{GRAD_NORMS}/* | {THROUGH_TIME}/*",)
"""Record keys it needs: per-tensor gradient norms, or GradientFlow's first/last ratios of
sequence modules (``norms/grad_total`` and the loss are read when present, for the
collapse test)."""


def detect_vanishing_gradients(
    run: Run,
    *,
    window: int = 20,
    low_ratio: float = 1e-3,
    high_ratio: float = 1e3,
    min_fraction: float = 0.5,
    collapse_ratio: float = 1e-3,
    converged_fraction: float = 0.5,
) -> list[Finding]:
    """Gradients that fade out before reaching the first layer, or stop altogether.

    *Through time*: with ``GradientFlow`` keys, ``grad_flow/ratio/<module>`` is
    ``||∂L/∂x_first|| / ||∂L/∂x_last||`` over a sequence module's input: the gradient
    reaching the first position of the sequence against the last. A recurrent net can
    lose it (1e-10) while its parameter gradients look normal (Bengio et al. 1994); a
    span where more than ``min_fraction`` of a window is below ``low_ratio`` is reported.

    *Depth ratio*: ``r_t = ||g_first||_t / ||g_last||_t`` for the first and last
    parameter tensors in model order (``run.meta["model"]["params"]``, preferring
    names ending in ``weight``, among those with a non-zero median gradient), at
    the steps both norms were measured, finite and ``> 0``. A span is
    reported where, in ``window``-point windows, more than ``min_fraction`` of the
    points have ``r_t < low_ratio`` (vanishing, as in deep sigmoid nets; Glorot &
    Bengio 2010) or ``r_t > high_ratio`` (first-layer explosion). *Collapse*: the
    rolling median of ``norms/grad_total`` falls below ``collapse_ratio`` times
    its median over the first ``max(3, window // 4)`` measurements while the
    median of ``scalars/loss`` over that span is still ``>= converged_fraction``
    of its early value (a converged loss has small gradients by right; without
    ``scalars/loss`` the collapse test is skipped). All findings are warnings.

    Args:
        run: the run to read.
        window: measurements per window (default 20).
        low_ratio: depth ratio below which gradients vanish (default 1e-3: layers
            of a healthy net differ by 10x, rarely by 1000x).
        high_ratio: depth ratio above which the first layer explodes (default 1e3).
        min_fraction: share of a window that must be out of band (default 0.5).
        collapse_ratio: global-norm collapse relative to its early value (1e-3).
        converged_fraction: loss share of its early value still "not converged".

    Returns:
        One finding per out-of-band span, per direction, and per collapse span.

    Raises:
        ValueError: ``window < 3``, a non-positive threshold, fractions outside
            ``[0, 1)`` or ``low_ratio >= high_ratio``.
    """
    check_window("window", window)
    for name, value in (
        ("low_ratio", low_ratio),
        ("high_ratio", high_ratio),
        ("collapse_ratio", collapse_ratio),
    ):
        check_positive(name, value)
    check_below("low_ratio", low_ratio, "high_ratio", high_ratio)
    check_fraction("min_fraction", min_fraction)
    check_fraction("converged_fraction", converged_fraction)
    findings: list[Finding] = []
    pair = end_tensors(run)
    if pair is not None:
        steps, ratio = _depth_ratio(run, *pair)
        for below, bound in ((True, low_ratio), (False, high_ratio)):
            findings += _ratio_spans(steps, ratio, pair, below, bound, window, min_fraction)
    if TOTAL in run and LOSS_KEY in run:
        findings += _collapse(run, window, collapse_ratio, converged_fraction)
    for module in run.layers(THROUGH_TIME):
        findings += _through_time(run, module, low_ratio, window, min_fraction)
    return findings


def _through_time(
    run: Run, module: str, low_ratio: float, window: int, min_fraction: float
) -> list[Finding]:
    """Spans where more than ``min_fraction`` of a window of ``module``'s first/last input
    gradient ratio is below ``low_ratio``."""
    key = f"{THROUGH_TIME}/{module}"
    steps, ratio = finite_series(run, key)  # 0: the first position's gradient underflowed
    keep = ratio >= 0
    steps, ratio = steps[keep], ratio[keep]
    mask = ratio < low_ratio
    width = min(window, ratio.shape[0])
    findings = []
    for a, b in out_of_band(mask, window, min_fraction):
        median = float(np.median(ratio[a : b + 1]))
        findings.append(
            Finding(
                NAME,
                Severity.WARNING,
                int(steps[a]),
                int(steps[b]),
                f"Gradients vanish through time in '{module}': the first position of its input "
                f"sequence gets {fmt(median)} of the gradient the last one gets (median over "
                f"{b - a + 1} measurements, below {fmt(low_ratio)}); what the early positions "
                "carry is not learned",
                "Shorten the path through time: a gated cell (LSTM/GRU) instead of a plain RNN, "
                "orthogonal or identity initialisation of the recurrent weights, attention or "
                "skip connections across time, or shorter sequences.",
                {
                    "median_ratio": median,
                    "fraction_out_of_band": float(np.mean(mask[a : b + 1])),
                    "module": module,
                    "low_ratio": low_ratio,
                    "window": width,
                    "min_fraction": min_fraction,
                },
                (key,),
            )
        )
    return findings


def end_tensors(run: Run) -> tuple[str, str] | None:
    """First and last parameter with a live ``norms/grad/<param>`` series, weights preferred.

    *Live*: the median of its finite gradient norms is ``> 0``. A tensor that never
    gets a gradient (an unused pooler or head, a frozen embedding that still has
    a zero ``.grad``) says nothing about gradient flow and would make the ratio
    infinite or zero.
    """
    recorded = set(run.layers(GRAD_NORMS))
    params = [p for p in param_order(run) if p in recorded]
    weights = [p for p in params if p.endswith("weight")]
    for pool in (weights, params):
        first = next((p for p in pool if _live(run, p)), None)
        last = next((p for p in reversed(pool) if _live(run, p)), None)
        if first is not None and first != last:
            return first, last
    return None


def _live(run: Run, param: str) -> bool:
    _, norms = finite_series(run, f"{GRAD_NORMS}/{param}")
    return bool(norms.size) and float(np.median(norms)) > 0


def _depth_ratio(run: Run, first: str, last: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``[n]`` and ``||g_first|| / ||g_last||`` ``[n]`` where both norms are finite, > 0."""
    a, b = run.series(f"{GRAD_NORMS}/{first}"), run.series(f"{GRAD_NORMS}/{last}")
    steps, ia, ib = np.intersect1d(a.steps, b.steps, return_indices=True)
    num, den = a.values[ia], b.values[ib]
    keep = np.isfinite(num) & np.isfinite(den) & (num > 0) & (den > 0)
    return steps[keep], num[keep] / den[keep]


def out_of_band(mask: np.ndarray, window: int, min_fraction: float) -> list[tuple[int, int]]:
    """``(first, last)`` indices of the flagged points of each stretch where more than
    ``min_fraction`` of a ``window``-point window (fewer for a short series) is flagged."""
    n = mask.shape[0]
    if n < 3:
        return []
    width = min(window, n)
    share = np.convolve(mask.astype(np.float64), np.ones(width) / width, mode="valid")  # [n-w+1]
    spans = []
    for lo, hi in true_runs(window_cover(share > min_fraction, width, n)):
        inside = lo + np.flatnonzero(mask[lo : hi + 1])
        spans.append((int(inside[0]), int(inside[-1])))
    return spans


def _ratio_spans(
    steps: np.ndarray,
    ratio: np.ndarray,
    pair: tuple[str, str],
    below: bool,
    bound: float,
    window: int,
    min_fraction: float,
) -> list[Finding]:
    """Spans where more than ``min_fraction`` of a window is below (or above) ``bound``."""
    mask = ratio < bound if below else ratio > bound  # [n]
    width = min(window, ratio.shape[0])
    findings = []
    for a, b in out_of_band(mask, window, min_fraction):
        findings.append(
            _ratio_finding(
                steps,
                ratio,
                mask,
                (a, b),
                pair,
                (below, bound),
                {"window": width, "min_fraction": min_fraction},
            )
        )
    return findings


def _ratio_finding(
    steps: np.ndarray,
    ratio: np.ndarray,
    mask: np.ndarray,
    span: tuple[int, int],
    pair: tuple[str, str],
    side: tuple[bool, float],
    extra: dict,
) -> Finding:
    a, b = span
    below, bound = side
    median = float(np.median(ratio[a : b + 1]))
    share = float(np.mean(mask[a : b + 1]))
    if below:
        seen = f"is below {fmt(bound)}: gradients vanish before reaching '{pair[0]}'"
        action = (
            "Improve gradient flow to the early layers: use ReLU/GELU instead of "
            "sigmoid/tanh, Kaiming initialisation, normalisation or residual connections."
        )
    else:
        seen = f"is above {fmt(bound)}: the first layer's gradients explode"
        action = (
            "Normalise the inputs to unit variance and check the first layer's "
            "initialisation, or give it a lower learning rate."
        )
    return Finding(
        NAME,
        Severity.WARNING,
        int(steps[a]),
        int(steps[b]),
        f"Gradient-norm ratio '{pair[0]}' / '{pair[1]}' (median {fmt(median)}, "
        f"{share:.0%} of {b - a + 1} measurements) {seen}",
        action,
        {
            "median_ratio": median,
            "fraction_out_of_band": share,
            "first_tensor": pair[0],
            "last_tensor": pair[1],
            ("low_ratio" if below else "high_ratio"): bound,
            **extra,
        },
        (f"{GRAD_NORMS}/{pair[0]}", f"{GRAD_NORMS}/{pair[1]}"),
    )


def _collapse(run: Run, window: int, collapse_ratio: float, converged: float) -> list[Finding]:
    steps, norms = finite_series(run, TOTAL)
    loss_steps, loss = finite_series(run, LOSS_KEY)
    head = max(3, window // 4)
    width = min(window, norms.shape[0] - head)
    if width < 3 or loss.shape[0] < 3:
        return []
    early = float(np.median(norms[:head]))
    early_loss = loss[loss_steps <= steps[head - 1]]
    early_loss = float(np.median(early_loss if early_loss.size else loss[:3]))
    if early <= 0 or early_loss <= 0:
        return []
    low = norms < collapse_ratio * early
    findings = []
    for lo, hi in true_runs(rolling_median(norms[head:], width) < collapse_ratio * early):
        inside = head + lo + np.flatnonzero(low[head + lo : head + hi + width])
        s0, s1 = int(steps[inside[0]]), int(steps[inside[-1]])
        span_loss = loss[(loss_steps >= s0) & (loss_steps <= s1)]
        if not span_loss.size or np.median(span_loss) < converged * early_loss:
            continue
        level, stuck_loss = float(np.median(norms[inside])), float(np.median(span_loss))
        findings.append(
            Finding(
                NAME,
                Severity.WARNING,
                s0,
                s1,
                f"{TOTAL} collapsed to a median of {fmt(level)} ({fmt(level / early)}x its early "
                f"median {fmt(early)}) while {LOSS_KEY} stayed at {fmt(stuck_loss)} "
                f"({stuck_loss / early_loss:.0%} of its early {fmt(early_loss)})",
                "Training has stalled: check for dead ReLUs or saturated activations (lower the "
                "learning rate, use LeakyReLU/GELU) and for a detach() cutting the loss off.",
                {
                    "median_norm": level,
                    "early_norm": early,
                    "loss": stuck_loss,
                    "early_loss": early_loss,
                    "collapse_ratio": collapse_ratio,
                    "converged_fraction": converged,
                    "window": width,
                },
                (TOTAL, LOSS_KEY),
            )
        )
    return findings
