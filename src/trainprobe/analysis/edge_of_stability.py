"""Sharpness against the optimizer's stability threshold: the edge of stability and beyond it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import Run
from ._checks import check_below, check_count, check_fraction, check_positive, check_window
from ._loss_evidence import LossView, SpanEvidence, loss_view, span_evidence
from ._series import (
    finite_series,
    fmt,
    rolling_median,
    true_runs,
)
from .findings import Finding, Severity

NAME = "edge_of_stability"
LAMBDA = "sharpness/lambda_max"
THRESHOLD = "sharpness/threshold"
PRECONDITIONED = "sharpness/preconditioned"
LR = "sharpness/lr"


@dataclass(frozen=True)
class _Ratio:
    """``lambda_max / threshold`` at the steps that measured both (arrays are ``[n]``)."""

    steps: np.ndarray
    ratio: np.ndarray
    smooth: np.ndarray  # 3-point running median of ``ratio``: one-point excursions removed
    threshold: np.ndarray


RATIO = "sharpness/ratio"
AT_EDGE = 0.85
"""``λ_max / threshold`` from which a run is at (or past) the edge of stability (the
hover band's lower end, ``band_low``)."""
CATAPULT_END = 2.0
"""``λ_max / threshold`` where the catapult phase ends: for ``2/η < λ < 4/η`` gradient
descent spikes and comes back, beyond ``4/η`` it diverges (Lewkowycz et al. 2020)."""


def ratio_around(
    ratio: tuple[np.ndarray, np.ndarray], start: int, end: int, *, min_points: int = 1
) -> float | None:
    """Median of the ``(steps, λ_max / threshold)`` measurements in ``[start, end]`` when
    there are ``min_points`` or more; with none there and ``min_points == 1``, the last
    one measured before ``start``; else None."""
    steps, values = ratio
    inside = values[(steps >= start) & (steps <= end)]
    if inside.size >= min_points:
        return float(np.median(inside))
    before = values[steps < start]
    return float(before[-1]) if min_points == 1 and before.size else None


def at_edge(level: float | None) -> bool:
    """Whether ``λ_max / threshold`` is at the edge or in the catapult phase past it."""
    return level is not None and AT_EDGE <= level < CATAPULT_END


NEEDS = (LAMBDA, THRESHOLD)
"""Record keys it needs: the sharpness and its threshold (the loss, the learning rate and
``sharpness/preconditioned`` are read when present)."""


def detect_edge_of_stability(
    run: Run,
    *,
    start_below: float = 0.6,
    reach: float = 0.9,
    band_low: float = 0.85,
    band_high: float = 1.25,
    hover_points: int = 5,
    unstable_ratio: float = 1.5,
    above_points: int = 3,
    loss_window: int = 50,
    spike_z: float = 6.0,
    spike_rise: float = 0.5,
    swing_share: float = 0.8,
    swing_rise: float = 0.2,
    diverge_rise: float = 2.0,
    max_episodes: int = 3,
) -> list[Finding]:
    """Sharpness ``sharpness/lambda_max`` against the optimizer's ``sharpness/threshold``.

    Gradient descent with learning rate ``eta`` is stable along the top Hessian
    direction only while ``lambda_max < 2 / eta``; heavy-ball momentum ``beta``
    moves the threshold to ``(2 + 2 beta) / eta``, and for Adam the preconditioned
    sharpness ``lambda_max(P^-1 H)`` meets ``(2 + 2 beta1) / ((1 - beta1) eta)``.
    Training typically sharpens progressively until ``r = lambda_max / threshold``
    reaches 1, then hovers there while the loss keeps falling, non-monotonically:
    the edge of stability (Cohen et al. 2021, "Gradient descent on neural networks
    typically occurs at the edge of stability"; Cohen et al. 2022, "Adaptive
    gradient methods at the edge of stability"). Stretches are cut on the 3-point
    running median of ``r``, so one noisy eigenvalue estimate neither starts nor
    breaks one.

    *Edge of stability* (``INFO``, the first episode): ``r`` reached ``reach``
    after having been below ``start_below``, and from there it stays in
    ``[band_low, band_high]`` for ``hover_points`` measurements or more.

    *Above the threshold* (Gilmer et al. 2022, "A loss curvature perspective on
    training instability in deep learning"): ``r > band_high`` for
    ``above_points`` measurements or more with a median ``r >= unstable_ratio``
    (well past the overshoot that self-stabilisation corrects), *and* the loss
    (``scalars/loss``, else the first loss key) misbehaves in that stretch, which
    lasts until the next measurement (after the last one: one typical gap):

    - a spike: robust z-score above ``spike_z`` and ``spike_rise`` above the
      trailing median of ``loss_window`` points (the test of ``detect_loss_spikes``);
    - an oscillation: the step-to-step change flips sign at ``swing_share`` of at
      least 20 points (independent noise flips at 2/3), with a median swing of
      ``swing_rise`` or more;
    - a divergence: the median of its last 5 points ``diverge_rise`` above the
      trailing median where the stretch starts;
    - a NaN/Inf loss.

    ``WARNING``; ``CRITICAL`` when the loss diverged or turned non-finite.
    Sharpness above the threshold with a calm loss gives no finding: a mini-batch
    eigenvalue, gradient clipping or SGD noise make the nominal threshold inexact,
    and the loss shows that training is stable. A run without a threshold (an
    optimizer the probe does not know) gives no finding either.

    Args:
        run: the run to read.
        start_below: ``r`` the run must start below for a rise to count (default 0.6).
        reach: ``r`` at which the threshold counts as reached (default 0.9).
        band_low: lower edge of the hovering band (default 0.85).
        band_high: upper edge of the hovering band (default 1.25: the overshoot of
            a healthy edge-of-stability run stays inside it).
        hover_points: measurements in the band that make an episode (default 5).
        unstable_ratio: median ``r`` of an unstable stretch (default 1.5).
        above_points: measurements above ``band_high`` that make one (default 3).
        loss_window: points in the loss's trailing median (default 50, as for spikes).
        spike_z: robust z-score over that median that may be a spike (default 6).
        spike_rise: relative rise over it that is a spike (default 0.5, i.e. 1.5x).
        swing_share: share of sign flips that is an oscillation (default 0.8).
        swing_rise: least median relative step-to-step swing of one (default 0.2).
        diverge_rise: relative rise that is a divergence (default 2, i.e. 3x).
        max_episodes: most above-threshold findings, the highest ratios (default 3).

    Returns:
        At most one edge-of-stability finding and ``max_episodes`` above-threshold ones.

    Raises:
        ValueError: a non-positive threshold, levels not ordered ``start_below <
            reach``, ``band_low < band_high < unstable_ratio``, a share outside
            ``[0, 1)``, a count below 2 (``max_episodes`` below 1) or ``loss_window < 3``.
        TypeError: a count or window that is not an int.
    """
    thresholds = {
        "start_below": start_below,
        "reach": reach,
        "band_low": band_low,
        "band_high": band_high,
        "hover_points": hover_points,
        "unstable_ratio": unstable_ratio,
        "above_points": above_points,
        "loss_window": loss_window,
        "spike_z": spike_z,
        "spike_rise": spike_rise,
        "swing_share": swing_share,
        "swing_rise": swing_rise,
        "diverge_rise": diverge_rise,
    }
    _check(thresholds, max_episodes)
    ratio = _ratio(run)
    if ratio is None:
        return []
    edge = _edge(run, ratio, thresholds)
    loss = loss_view(run, loss_window)
    above = [] if loss is None else _above(run, ratio, loss, thresholds)
    above = sorted(above, key=lambda f: -f.evidence["ratio_median"])[:max_episodes]
    return ([] if edge is None else [edge]) + sorted(above, key=lambda f: f.start_step)


def _check(th: dict, max_episodes: int) -> None:
    for name in ("spike_z", "spike_rise", "swing_rise", "diverge_rise", "band_low"):
        check_positive(name, th[name])
    check_fraction("start_below", th["start_below"])
    check_fraction("swing_share", th["swing_share"])
    check_below("start_below", th["start_below"], "reach", th["reach"])
    check_below("band_low", th["band_low"], "band_high", th["band_high"])
    check_below("band_high", th["band_high"], "unstable_ratio", th["unstable_ratio"])
    check_count("hover_points", th["hover_points"], minimum=2, what="measurements in the band")
    check_count("above_points", th["above_points"], minimum=2, what="measurements above it")
    check_count("max_episodes", max_episodes, minimum=1, what="above-threshold findings")
    check_window("loss_window", th["loss_window"])


def _ratio(run: Run) -> _Ratio | None:
    lam_steps, lam = finite_series(run, LAMBDA)
    thr_steps, thr = finite_series(run, THRESHOLD)
    steps, at_lam, at_thr = np.intersect1d(lam_steps, thr_steps, return_indices=True)
    keep = thr[at_thr] > 0
    if np.count_nonzero(keep) < 3:
        return None
    ratio = lam[at_lam][keep] / thr[at_thr][keep]  # [n]
    smooth = ratio.copy()
    smooth[1:-1] = rolling_median(ratio, 3)
    return _Ratio(steps[keep], ratio, smooth, thr[at_thr][keep])


def _edge(run: Run, r: _Ratio, th: dict) -> Finding | None:
    """The first rise from below ``start_below`` to ``reach`` that then hovers in the band."""
    was_low = np.logical_or.accumulate(r.ratio < th["start_below"])  # [n]
    reached = np.flatnonzero((r.smooth[1:] >= th["reach"]) & was_low[:-1]) + 1
    if not reached.size:
        return None
    first = int(reached[0])
    start = float(r.ratio[:first].min())
    in_band = (r.smooth >= th["band_low"]) & (r.smooth <= th["band_high"])
    spans = [(max(a, first), b) for a, b in true_runs(in_band) if b >= first]
    spans = [(a, b) for a, b in spans if b - a + 1 >= th["hover_points"]]
    if not spans:
        return None
    a, b = spans[0]
    median, threshold = _medians(r, a, b)
    reach_step, end = int(r.steps[first]), int(r.steps[b])
    message = (
        f"{_subject(run)} rose from {fmt(start)}x to {fmt(float(r.ratio[first]))}x the "
        f"stability threshold by step {reach_step}, then hovered at a median {fmt(median)}x "
        f"the threshold {fmt(threshold)} over steps {int(r.steps[a])}-{end} ({b - a + 1} "
        "measurements): training runs at the edge of stability"
    )
    action = (
        "Nothing to fix: at the edge of stability the loss keeps decreasing, "
        "non-monotonically; if you want a smooth loss or a flatter path, lower the learning "
        "rate (or lengthen warmup) to keep the sharpness below the threshold."
    )
    evidence = {
        "start_ratio": start,
        "reach_step": reach_step,
        "hover_start": int(r.steps[a]),
        "hover_end": end,
        "hover_measurements": b - a + 1,
        "hover_median": median,
        "threshold_median": threshold,
        "episodes": len(spans),
        **th,
    }
    return Finding(
        NAME, Severity.INFO, reach_step, end, message, action, evidence, (LAMBDA, THRESHOLD)
    )


def _medians(r: _Ratio, first: int, last: int) -> tuple[float, float]:
    """Median ratio and median threshold over measurements ``first .. last``."""
    inside = slice(first, last + 1)
    return float(np.median(r.ratio[inside])), float(np.median(r.threshold[inside]))


def _above(run: Run, r: _Ratio, loss: LossView, th: dict) -> list[Finding]:
    """Stretches far above the threshold in which the loss spiked, oscillated or diverged."""
    runs = [
        (a, b)
        for a, b in true_runs(r.smooth > th["band_high"])
        if b - a + 1 >= th["above_points"] and np.median(r.ratio[a : b + 1]) >= th["unstable_ratio"]
    ]
    gap = float(np.median(np.diff(r.steps)))
    findings = []
    for a, b in runs:
        stop = r.steps[b + 1] - 1 if b + 1 < r.steps.size else r.steps[b] + gap
        seen = span_evidence(loss, int(r.steps[a]), float(stop), th)
        if seen.phrases:
            findings.append(_above_finding(run, r, (a, b), loss, seen, th))
    return findings


def _above_finding(
    run: Run, r: _Ratio, span: tuple[int, int], loss: LossView, seen: SpanEvidence, th: dict
) -> Finding:
    a, b = span
    (median, threshold), peak = _medians(r, a, b), float(r.ratio[a : b + 1].max())
    start, end = int(r.steps[a]), int(r.steps[b])
    message = (
        f"{_subject(run)} stayed above the stability threshold {fmt(threshold)} for "
        f"{b - a + 1} measurements (steps {start}-{end}) at a median {fmt(median)}x it "
        f"(peak {fmt(peak)}x), while {loss.key} {_and(seen.phrases)}"
    )
    evidence = {
        "ratio_median": median,
        "ratio_peak": peak,
        "measurements": b - a + 1,
        "threshold_median": threshold,
        **seen.evidence,
        **th,
    }
    return Finding(
        NAME,
        Severity.CRITICAL if seen.critical else Severity.WARNING,
        start,
        max(end, seen.last_step),
        message,
        _above_action(run, start, median, critical=seen.critical),
        evidence,
        (LAMBDA, THRESHOLD, loss.key),
    )


def _above_action(run: Run, start: int, factor: float, *, critical: bool) -> str:
    lr_steps, lrs = finite_series(run, LR)
    at = int(np.searchsorted(lr_steps, start, side="right")) - 1
    to = f" (to {fmt(float(lrs[at]) / factor)} or below)" if at >= 0 else ""
    adam = (
        ", or raise Adam's eps or lower its beta2 (e.g. 0.95) to damp the preconditioned sharpness"
        if _preconditioned(run)
        else ""
    )
    lower = f"at least {fmt(factor)}x{to}, since the threshold scales as 1/lr,"
    if critical:
        return (
            f"Restart from a checkpoint before step {start} with the learning rate lowered "
            f"{lower} or with a longer warmup{adam}."
        )
    return f"Lower the learning rate {lower} or add a longer warmup{adam}."


def _preconditioned(run: Run) -> bool:
    _, flags = finite_series(run, PRECONDITIONED)
    return flags.size > 0 and float(np.median(flags)) > 0.5


def _subject(run: Run) -> str:
    return f"{LAMBDA} (of the preconditioned Hessian)" if _preconditioned(run) else LAMBDA


def _and(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
