"""Loss spikes: points far above the trailing median of the loss, robust to mini-batch noise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from ..store import Run
from ._checks import check_positive, check_window
from ._series import MAD_SCALE, finite_series, fmt, trailing_median_mad, true_runs
from .findings import Finding, Severity

NAME = "loss_spike"
LOSS_PATTERN = "scalars/*loss*"


@dataclass(frozen=True)
class _Scored:
    """One loss curve scored against its trailing reference (arrays are ``[n]``)."""

    key: str
    steps: np.ndarray
    values: np.ndarray
    reference: np.ndarray  # trailing median in the loss's own units
    z: np.ndarray  # robust z-score (log space when the loss is positive)
    margin: np.ndarray  # a spike exceeds it; a recovered loss's later median stays under it


def detect_loss_spikes(
    run: Run,
    *,
    window: int = 50,
    z_threshold: float = 6.0,
    min_rel_increase: float = 0.5,
    recovery_window: int = 50,
    recurrent_count: int = 5,
) -> list[Finding]:
    """Spikes in ``scalars/loss`` and every other ``scalars/*loss*`` key.

    Each point ``x_i`` is compared with the ``window`` points before it (no
    look-ahead), in ``y = log x`` when every value is positive (a decaying loss
    becomes a gentle line and noise becomes relative), else in ``y = x``:
    ``z_i = (y_i - med_i) / (1.4826 * MAD_i)`` (Hampel's robust z-score,
    Rousseeuw & Croux 1993). ``x_i`` is a spike point when ``z_i > z_threshold``
    and ``x_i > (1 + min_rel_increase) * exp(med_i)`` (linear space:
    ``y_i - med_i > min_rel_increase * |med_i|``); the second test keeps tiny
    wiggles of a converged, near-noiseless loss (MAD ~ 0) from counting.
    Consecutive spike points form one span: a ``WARNING``, ``CRITICAL`` when the
    median of the ``recovery_window`` points after it stays above that margin
    (the loss did not recover) or when one key spikes ``recurrent_count`` times.
    Non-finite points are left to :func:`detect_nonfinite`.

    Args:
        run: the run to read.
        window: trailing points in the reference (default 50: long enough for a
            stable median, short enough to follow a decaying loss).
        z_threshold: robust z-score above which a point may be a spike (default
            6: about one false point in 10^9 under Gaussian noise).
        min_rel_increase: relative margin above the trailing median (default 0.5,
            i.e. 1.5x; ordinary mini-batch noise stays well inside it).
        recovery_window: points after a span whose median decides recovery.
        recurrent_count: spans on one key from which every span is critical.

    Returns:
        One finding per span, per loss key.

    Raises:
        ValueError: a window below 3 points, a non-positive threshold or count.
    """
    check_window("window", window)
    check_window("recovery_window", recovery_window, minimum=1)
    check_window("recurrent_count", recurrent_count, minimum=2)
    check_positive("z_threshold", z_threshold)
    check_positive("min_rel_increase", min_rel_increase)
    thresholds = {"window": window, "z_threshold": z_threshold,
                  "min_rel_increase": min_rel_increase, "recovery_window": recovery_window,
                  "recurrent_count": recurrent_count}
    findings: list[Finding] = []
    for key in loss_keys(run):
        scored = _score(run, key, window, min_rel_increase)
        if scored is None:
            continue
        hit = (scored.z > z_threshold) & (scored.values > scored.margin)
        spans = true_runs(hit)
        recurrent = len(spans) >= recurrent_count
        for number, span in enumerate(spans, start=1):
            findings.append(_finding(scored, span, (number, len(spans)), recurrent, thresholds))
    return findings


def loss_keys(run: Run) -> list[str]:
    """``scalars/loss`` first, then the other ``scalars/*loss*`` keys in recording order."""
    keys = [k for k in run.keys("scalars/") if fnmatchcase(k, LOSS_PATTERN)]
    return sorted(keys, key=lambda k: k != "scalars/loss")


def _score(run: Run, key: str, window: int, rel: float) -> _Scored | None:
    steps, values = finite_series(run, key)
    min_periods = max(3, window // 5)
    if values.shape[0] <= min_periods:
        return None
    log_space = bool(np.all(values > 0))
    y = np.log(values) if log_space else values
    med, mad = trailing_median_mad(y, window, min_periods=min_periods)
    scale = np.maximum(MAD_SCALE * mad, 1e-12 * np.maximum(1.0, np.abs(med)))
    with np.errstate(invalid="ignore"):
        z = (y - med) / scale
    if log_space:
        reference = np.exp(med)
        margin = reference * (1.0 + rel)
    else:
        reference = med
        margin = med + rel * np.abs(med)
    return _Scored(key, steps, values, reference, np.nan_to_num(z, nan=-np.inf), margin)


def _finding(s: _Scored, span: tuple[int, int], count: tuple[int, int], recurrent: bool,
             thresholds: dict) -> Finding:
    first, last = span
    peak = first + int(np.argmax(s.values[first:last + 1]))
    after = s.values[last + 1:last + 1 + thresholds["recovery_window"]]
    post = float(np.median(after)) if after.size else math.nan
    stuck = after.size > 0 and post > s.margin[first]
    severity = Severity.CRITICAL if stuck or recurrent else Severity.WARNING
    ref, peak_value = float(s.reference[first]), float(s.values[peak])
    message = (
        f"{s.key} spiked to {fmt(peak_value)} at step {int(s.steps[peak])} "
        f"({f'{fmt(peak_value / ref)}x' if ref > 0 else f'{fmt(peak_value - ref)} above'} "
        f"the trailing median {fmt(ref)}, robust z {fmt(float(s.z[peak]))})"
        + (f" and did not recover (median {fmt(post)} afterwards)" if stuck else "")
        + (f"; spike {count[0]} of {count[1]} on this curve" if recurrent else "")
    )
    evidence = {
        "peak": peak_value, "peak_step": int(s.steps[peak]), "trailing_median": ref,
        "z_score": float(s.z[peak]), "points": last - first + 1,
        "spikes_on_key": count[1], **thresholds,
    }
    if after.size:
        evidence["median_after"] = post
    return Finding(NAME, severity, int(s.steps[first]), int(s.steps[last]), message,
                   _action(stuck, recurrent, int(s.steps[first])), evidence, (s.key,))


def _action(stuck: bool, recurrent: bool, step: int) -> str:
    if stuck:
        return (f"Restart from a checkpoint before step {step} with a lower learning rate (or "
                "longer warmup) and gradient clipping (torch.nn.utils.clip_grad_norm_).")
    if recurrent:
        return ("Lower the learning rate or enable gradient clipping "
                "(torch.nn.utils.clip_grad_norm_), since the loss keeps spiking.")
    return (f"Inspect the batches around step {step} for bad data, and lower the learning rate "
            "or enable gradient clipping if spikes recur.")
