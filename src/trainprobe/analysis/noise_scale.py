"""The batch size against the gradient noise scale (McCandlish et al. 2018)."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_fraction, check_positive, check_window
from ._series import finite_series, fmt
from .findings import Finding, Severity

NAME = "noise_scale"
TRACE = "grad_noise/trace_cov"
SIGNAL = "grad_noise/grad_sq"
BATCH = "grad_noise/batch_size"


NEEDS = (TRACE, SIGNAL, BATCH)
"""Record keys it needs: the noise-scale estimators and the batch size."""


def detect_noise_scale(
    run: Run, *, far: float = 10.0, tail: float = 0.25, min_points: int = 5
) -> list[Finding]:
    """``INFO`` when the batch size is far from the gradient noise scale late in training.

    The simple noise scale ``B_simple = tr(Σ) / ‖G‖²`` (McCandlish et al. 2018, "An
    Empirical Model of Large-Batch Training") predicts the critical batch size: well
    below it, doubling the batch nearly halves the steps to a given loss (each step is
    noise-limited); well above it, extra examples per step buy almost nothing. It grows
    as the loss falls, so the detector reads the last ``tail`` of the measured steps (at
    least ``min_points`` measurements) and estimates it as a ratio of means,
    ``mean(grad_noise/trace_cov) / mean(grad_noise/grad_sq)``: both are unbiased per
    step, their per-step ratio is not (see :class:`~trainprobe.probes.GradNoise`).

    Fires when ``B_simple >= far · B`` (batch far below the noise scale) or
    ``B_simple <= B / far`` (far above), with ``B`` the median recorded batch size; a
    non-positive mean ``‖G‖²`` (the gradient signal is below one batch's noise) counts
    as far below.

    Args:
        run: the run to read (``grad_noise/trace_cov``, ``grad_noise/grad_sq``,
            ``grad_noise/batch_size``).
        far: factor between the batch size and the noise scale that makes a finding.
        tail: share of the measured steps, at the end, that is read (default 0.25).
        min_points: fewest measurements read (default 5).

    Returns:
        At most one finding.

    Raises:
        ValueError: ``far <= 1``, ``tail`` outside ``(0, 1)`` or ``min_points < 3``.
    """
    check_positive("far", far)
    if far <= 1:
        raise ValueError(f"far must be > 1 (a factor between two sizes), got {far!r}")
    check_fraction("tail", tail)
    if tail <= 0:
        raise ValueError(f"tail must be a share of the run in (0, 1), got {tail!r}")
    check_window("min_points", min_points)
    steps, trace = finite_series(run, TRACE)
    signal_steps, signal = finite_series(run, SIGNAL)
    batch_steps, batch = finite_series(run, BATCH)
    steps, pick_t, pick_s = np.intersect1d(steps, signal_steps, return_indices=True)
    if steps.size < min_points or batch.size == 0:
        return []
    trace, signal = trace[pick_t], signal[pick_s]
    first = min(steps.size - min_points, int(np.searchsorted(steps, _cut(steps, tail))))
    trace, signal, steps = trace[first:], signal[first:], steps[first:]
    recent = batch[batch_steps >= steps[0]]
    size = float(np.median(recent if recent.size else batch))
    mean_trace, mean_signal = float(trace.mean()), float(signal.mean())
    scale = mean_trace / mean_signal if mean_signal > 0 else float("inf")
    if size / far < scale < far * size:
        return []
    evidence = {
        "batch_size": size,
        "mean_trace_cov": mean_trace,
        "mean_grad_sq": mean_signal,
        "points": int(steps.size),
        "far": far,
        "tail": tail,
    }
    if np.isfinite(scale):  # else: the signal is below one batch's noise (mean_grad_sq <= 0)
        evidence["noise_scale"] = scale
    return [_finding(scale, size, int(steps[0]), int(steps[-1]), evidence)]


def _cut(steps: np.ndarray, tail: float) -> float:
    return float(steps[-1] - tail * (steps[-1] - steps[0]))


def _finding(scale: float, size: float, start: int, end: int, evidence: dict) -> Finding:
    shown = fmt(scale) if np.isfinite(scale) else "inf (the signal is below one batch's noise)"
    if scale > size:
        message = (
            f"Batch size {fmt(size)} is far below the gradient noise scale "
            f"B_simple = {shown}: each step is dominated by gradient noise"
        )
        action = (
            "If steps (not examples) are the bottleneck, raise the batch size toward "
            "the noise scale and scale the learning rate with it; training will need "
            "proportionally fewer steps."
        )
    else:
        message = (
            f"Batch size {fmt(size)} is far above the gradient noise scale "
            f"B_simple = {shown}: most examples per step add little"
        )
        action = (
            "Lower the batch size toward the noise scale: the same loss then needs "
            "fewer examples, and so less compute."
        )
    return Finding(NAME, Severity.INFO, start, end, message, action, evidence, (TRACE, SIGNAL))
