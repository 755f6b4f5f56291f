"""Loss divergence: a loss whose rolling median climbs well above its best level and stays."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..store import Run
from ._checks import check_positive, check_window
from ._series import finite_series, fmt, loss_keys, rolling_median, true_runs
from .findings import Finding, Severity

NAME = "loss_divergence"
MIN_WINDOW = 5
"""Fewest points per rolling median; a series shorter than 4 such windows is not judged."""
_HELD_OUT = ("val", "valid", "eval", "test")


@dataclass(frozen=True)
class _Curve:
    """One loss curve's rolling median against its running minimum (arrays are ``[m]``)."""

    key: str
    steps: np.ndarray  # [n] steps of the scored points
    width: int  # points per rolling median
    median: np.ndarray  # rolling median in loss units, window j = points j .. j + width - 1
    best: np.ndarray  # running minimum of ``median``
    diverged: np.ndarray  # bool: far enough above ``best``


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
    first window's median (a loss that reached 1e-4 and wanders to 5e-4 has not
    diverged). Diverged windows must follow one another for ``window`` more points
    (the rise is sustained, not a burst). ``CRITICAL`` when the last window is
    still diverged (no recovery by the end of the run), else ``WARNING``. As for
    spikes, exact zeros of a non-negative loss are inactive steps and skipped.

    The defaults stay silent on healthy curves: noisy decay and cosine schedules
    never rise; warm-up bumps and learning-rate restarts rise by 1.2-2x, not 3x;
    a plateau does not rise at all.

    Args:
        run: the run to read.
        window: points per rolling median (default 50, fewer on short series:
            a quarter of the points, at least 5).
        factor: how far above its best the median must be (default 3).
        min_rise: the rise as a share of the first window's median (default 0.1).

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
    smooth = rolling_median(np.log(values) if positive else values, width)  # [n - width + 1]
    median = np.exp(smooth) if positive else smooth
    best = np.minimum.accumulate(median)
    rise = median - best
    if positive:
        far = median >= factor * best
    else:
        scale = float(np.median(np.abs(values[values != 0])))
        far = rise >= (factor - 1.0) * np.maximum(np.abs(best), scale)
    material = rise >= min_rise * abs(float(median[0]))
    return _Curve(key, steps, width, median, best, far & material)


def _finding(c: _Curve, runs: list[tuple[int, int]], factor: float, min_rise: float) -> Finding:
    centre = (c.width - 1) // 2  # a window's median is reported at its centre step
    first, last = runs[0][0], runs[-1][1]
    low = int(np.argmin(c.median[: first + 1]))
    inside = np.concatenate([np.arange(a, b + 1) for a, b in runs])
    peak = int(inside[np.argmax(c.median[inside] - c.best[inside])])
    stuck = bool(c.diverged[-1])
    low_step, peak_step = int(c.steps[low + centre]), int(c.steps[peak + centre])
    lowest, top, final = float(c.median[low]), float(c.median[peak]), float(c.median[-1])
    end_step = int(c.steps[-1]) if stuck else int(c.steps[last + centre])
    message = (
        f"{c.key} diverged: its {c.width}-point rolling median rose from a minimum of "
        f"{fmt(lowest)} at step {low_step} to {fmt(top)} at step {peak_step} "
        f"({_times(top, lowest)})"
        + (
            f" and ends the run at {fmt(final)}, with no recovery"
            if stuck
            else f", then came back to {fmt(final)}"
        )
    )
    evidence = {
        "min_median": lowest,
        "min_step": low_step,
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
        low_step,
        end_step,
        message,
        _action(c.key, low_step),
        evidence,
        (c.key,),
    )


def _times(top: float, lowest: float) -> str:
    return f"{fmt(top / lowest)}x" if lowest > 0 else f"{fmt(top - lowest)} higher"


def _action(key: str, step: int) -> str:
    name = key.removeprefix("scalars/")
    if any(part in name.split("_") for part in _HELD_OUT):
        return (
            f"The model overfits after step {step}: keep the checkpoint from there (early "
            "stopping) or regularise more (weight decay, dropout, augmentation, more data)."
        )
    return (
        f"Lower the learning rate (or add a decay schedule) and enable gradient clipping "
        f"(torch.nn.utils.clip_grad_norm_), restarting from a checkpoint near step {step}."
    )
