"""Loss divergence: a loss whose rolling median climbs well above its best level and stays."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..store import Run
from ._checks import check_positive, check_window
from ._series import (
    LOSS_PATTERN,
    MAD_SCALE,
    finite_series,
    fmt,
    held_level,
    loss_keys,
    rolling_median,
    true_runs,
)
from .findings import Finding, Severity

NAME = "loss_divergence"
NEEDS = (LOSS_PATTERN,)
"""Record keys it reads: the loss keys (``_series.is_loss_key`` narrows the pattern)."""
MIN_WINDOW = 5
"""Fewest points per rolling median; a series shorter than 4 such windows is not judged."""
BAND = 2.0
"""The noise band above the level, in noise sigmas, that a rise must clear to count."""
_HELD_OUT = ("val", "valid", "eval", "test")


@dataclass(frozen=True)
class _Curve:
    """One loss curve's rolling median against its running minimum (arrays are ``[m]``)."""

    key: str
    steps: np.ndarray  # [n] steps of the scored points
    y: np.ndarray  # [n] the scored points: log x for a positive loss, else x
    width: int  # points per rolling median
    smooth: np.ndarray  # rolling median of ``y``, window j = points j .. j + width - 1
    median: np.ndarray  # ``smooth`` in loss units
    best: np.ndarray  # running minimum of ``median``
    diverged: np.ndarray  # bool: far enough above ``best``


@dataclass(frozen=True)
class _Departure:
    """Where the loss left its level: the first point of the sustained rise."""

    index: int  # into the scored points
    noise: float  # sigma of the points around the rolling median, in ``y`` units
    band: float  # the noise band above the level, in ``y`` units


def detect_loss_divergence(
    run: Run, *, window: int = 50, factor: float = 3.0, min_rise: float = 0.1
) -> list[Finding]:
    """Losses that rise well above their best level and stay there (smooth divergence).

    A spike detector compares each point with a trailing median, which follows
    a steady rise; this one compares the rolling median ``m_j`` of ``window``
    points with its running minimum ``b_j = min_{k <= j} m_k``. A window is
    *diverged* when ``m_j >= factor * b_j`` (positive losses: on the log scale;
    signed losses: ``m_j - b_j >= (factor - 1) * max(|b_j|, s)``, ``s`` the
    median ``|x|``) and the rise ``m_j - b_j`` is at least ``min_rise`` times the
    highest level the loss held (the highest trailing median of its values: its
    starting level, as a rule) (a loss that reached 1e-4 and wanders to 5e-4 has not
    diverged). Diverged windows must follow one another for ``window`` more points
    (the rise is sustained, not a burst). ``CRITICAL`` when the last window is
    still diverged (no recovery by the end of the run), else ``WARNING``. As for
    spikes, exact zeros of a non-negative loss are inactive steps and skipped.

    The span starts where the loss leaves its level, not at the minimum of the
    rolling median (on a noisy plateau that minimum is wherever the noise dipped,
    often a hundred steps before the rise). In the scored units ``y`` (``log x``
    for a positive loss, else ``x``), let ``L`` be the lowest rolling median
    before the first diverged window, ``sigma = 1.4826 * median_i |y_i - m(i)|``
    the loss's own noise (its points around the centred rolling median ``m(i)``,
    up to that window) and ``k = 2 sigma`` the noise band above the level. From
    the minimum's centre point on, the excess over the band is summed as in Page's
    one-sided CUSUM (Page 1954, "Continuous inspection schemes"):
    ``S_i = max(0, S_{i-1} + y_i - L - k)``, up to the *alarm*, the last point of
    the first diverged window (where the divergence is first known). The span
    starts at the first point after the last ``S_i = 0``: from there on the loss's
    excess over its noise band never cancels out again before it diverges. So a
    jump starts at its first point (a noise excursion above the band just before
    it can pull the start a few points earlier: below the band the sum falls by
    about ``k`` a point), a gradual rise of ``a`` per point starts about ``k / a``
    points after it turned (once it clears the band), and the start is never
    before the minimum's centre nor after the alarm. The evidence keeps the
    minimum (``min_median``, ``min_step``) and adds ``rise_step`` (the start),
    ``noise`` (``sigma``) and ``band`` (``k``), both in ``y`` units.

    The defaults stay silent on healthy curves: noisy decay and cosine schedules
    never rise; warm-up bumps and learning-rate restarts rise by 1.2-2x, not 3x;
    a plateau does not rise at all.

    Args:
        run: the run to read.
        window: points per rolling median (default 50, fewer on short series:
            a quarter of the points, at least 5).
        factor: how far above its best the median must be (default 3).
        min_rise: the rise as a share of the highest level the loss held (default 0.1).

    Returns:
        At most one finding per loss key.

    Raises:
        ValueError: ``window < 5``, ``factor <= 1`` or a non-positive ``min_rise``.
        TypeError: ``window`` is not an int.
    """
    check_window("window", window, minimum=MIN_WINDOW)
    if not (isinstance(factor, int | float) and math.isfinite(factor) and factor > 1):
        raise ValueError(
            f"factor must be a finite number > 1 (how many times its minimum the "
            f"loss must rise to), got {factor!r}"
        )
    check_positive("min_rise", min_rise)
    findings = []
    for key in loss_keys(run):
        curve = _curve(run, key, window, factor, min_rise)
        if curve is None:
            continue
        runs = [(a, b) for a, b in true_runs(curve.diverged) if b - a + 1 >= curve.width]
        if runs:
            findings.append(_finding(curve, runs, factor, min_rise))
    return findings


def _curve(run: Run, key: str, window: int, factor: float, min_rise: float) -> _Curve | None:
    steps, values = finite_series(run, key)
    zeros = values == 0
    if zeros.any() and np.all(values >= 0):  # inactive steps of a hinge-like loss
        steps, values = steps[~zeros], values[~zeros]
    width = min(window, values.shape[0] // 4)
    if width < MIN_WINDOW:
        return None
    positive = bool(np.all(values > 0))
    y = np.log(values) if positive else values  # [n]
    smooth = rolling_median(y, width)  # [n - width + 1]
    median = np.exp(smooth) if positive else smooth
    best = np.minimum.accumulate(median)
    rise = median - best
    if positive:
        far = median >= factor * best
    else:
        scale = float(np.median(np.abs(values[values != 0])))
        far = rise >= (factor - 1.0) * np.maximum(np.abs(best), scale)
    # the rise must matter at the run's scale: a share of the highest level the loss held
    # before (its start, as a rule), not of a first window that may already be low: a
    # learning-rate restart lifting a fit loss from 0.007 to 0.03 is not a divergence
    held = held_level(values, window)[width - 1 :]  # [n - width + 1], at each window's end
    material = rise >= min_rise * held
    return _Curve(key, steps, y, width, smooth, median, best, far & material)


def _departure(c: _Curve, low: int, first: int) -> _Departure:
    """The first point of the sustained rise above the level ``smooth[low]`` (see above)."""
    centre = (c.width - 1) // 2  # a window's median belongs to its centre point
    upto = max(first, c.width)  # windows whose centre points give the noise, at least a window
    residual = c.y[centre : centre + upto + 1] - c.smooth[: upto + 1]  # [upto + 1]
    noise = MAD_SCALE * float(np.median(np.abs(residual)))
    level, band = float(c.smooth[low]), BAND * noise
    begin, alarm = low + centre, first + c.width - 1  # the alarm: divergence first known
    excess = np.cumsum(c.y[begin : alarm + 1] - level - band)  # [alarm - begin + 1]
    total = np.concatenate(([0.0], excess))  # S_i = total_i - min_{j <= i} total_j
    at_level = np.flatnonzero(total == np.minimum.accumulate(total))  # S = 0, never empty
    return _Departure(min(begin + int(at_level[-1]), alarm), noise, band)


def _finding(c: _Curve, runs: list[tuple[int, int]], factor: float, min_rise: float) -> Finding:
    centre = (c.width - 1) // 2  # a window's median is reported at its centre step
    first, last = runs[0][0], runs[-1][1]
    low = int(np.argmin(c.median[: first + 1]))
    departure = _departure(c, low, first)
    inside = np.concatenate([np.arange(a, b + 1) for a, b in runs])
    peak = int(inside[np.argmax(c.median[inside] - c.best[inside])])
    stuck = bool(c.diverged[-1])
    low_step, peak_step = int(c.steps[low + centre]), int(c.steps[peak + centre])
    rise_step = int(c.steps[departure.index])
    lowest, top, final = float(c.median[low]), float(c.median[peak]), float(c.median[-1])
    end_step = int(c.steps[-1]) if stuck else int(c.steps[last + centre])
    message = (
        f"{c.key} diverged: it left its level at step {rise_step}, and its {c.width}-point "
        f"rolling median rose from a minimum of {fmt(lowest)} (step {low_step}) to "
        f"{fmt(top)} at step {peak_step} ({_times(top, lowest)})"
        + (
            f" and ends the run at {fmt(final)}, with no recovery"
            if stuck
            else f", then came back to {fmt(final)}"
        )
    )
    evidence = {
        "min_median": lowest,
        "min_step": low_step,
        "rise_step": rise_step,
        "noise": departure.noise,
        "band": departure.band,
        "peak_median": top,
        "peak_step": peak_step,
        "final_median": final,
        "factor": factor,
        "min_rise": min_rise,
        "window": c.width,
    }
    return Finding(
        NAME,
        Severity.CRITICAL if stuck else Severity.WARNING,
        rise_step,
        end_step,
        message,
        _action(c.key, rise_step),
        evidence,
        (c.key,),
    )


def _times(top: float, lowest: float) -> str:
    return f"{fmt(top / lowest)}x" if lowest > 0 else f"{fmt(top - lowest)} higher"


def _action(key: str, step: int) -> str:
    name = key.removeprefix("scalars/")
    if any(part in name.split("_") for part in _HELD_OUT):
        return (
            f"The model overfits from step {step}: keep the checkpoint from before it (early "
            "stopping) or regularise more (weight decay, dropout, augmentation, more data)."
        )
    return (
        f"Lower the learning rate (or add a decay schedule) and enable gradient clipping "
        f"(torch.nn.utils.clip_grad_norm_), restarting from a checkpoint saved before step {step}."
    )
