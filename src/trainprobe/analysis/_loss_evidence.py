"""What a logged loss did over a span of steps: spikes, oscillation, divergence, NaN/Inf.

Evidence for the ``edge_of_stability`` detector: sharpness above the stability
threshold is only an instability when the loss shows it. The spike test is the trailing
one ``detect_loss_spikes`` uses (robust z-score over a trailing window, and a relative
rise); its test of the first points, which have no trailing spread, is not applied here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import Run
from ._series import MAD_SCALE, fmt, loss_keys, trailing_median_mad
from .loss_spike import TINY

MIN_SWINGS = 20
"""Fewest finite loss points in a span for its oscillation to be judged: with fewer, the
share of sign flips of independent noise (2/3 on average) reaches 0.8 too often."""


@dataclass(frozen=True)
class LossView:
    """The run's first loss key on the scale its swings are judged in (arrays are ``[m]``)."""

    key: str
    steps: np.ndarray  # finite points
    values: np.ndarray  # finite values
    y: np.ndarray  # log x when every value is positive, else x / median |x|
    reference: np.ndarray  # trailing median of ``y`` (no look-ahead), NaN when too short
    z: np.ndarray  # robust z-score against it, as ``detect_loss_spikes`` computes it
    log: bool
    bad_steps: np.ndarray  # steps where the loss was NaN/Inf


def loss_view(run: Run, window: int) -> LossView | None:
    keys = loss_keys(run)
    if not keys:
        return None
    raw = run.series(keys[0])
    if raw.values.ndim != 1:
        return None
    finite = np.isfinite(raw.values)
    steps, values = raw.steps[finite], raw.values[finite]
    log = values.size > 0 and bool(np.all(values > 0))
    nonzero = np.abs(values[values != 0])
    y = np.log(values) if log else values / (float(np.median(nonzero)) if nonzero.size else 1.0)
    reference, mad = trailing_median_mad(y, window, min_periods=max(3, window // 5))
    with np.errstate(invalid="ignore"):
        z = np.nan_to_num((y - reference) / np.maximum(MAD_SCALE * mad, TINY), nan=-np.inf)
    return LossView(keys[0], steps, values, y, reference, z, log, raw.steps[~finite])


def beyond(delta: np.ndarray | float, ref: np.ndarray | float, rise: float, log: bool):
    """Whether ``delta`` is a relative rise of ``rise`` or more over a level ``ref``."""
    if log:
        return np.asarray(delta) >= np.log1p(rise)
    return np.asarray(delta) >= rise * np.maximum(np.abs(ref), 1.0)


@dataclass(frozen=True)
class SpanEvidence:
    """What the loss did in one above-threshold span."""

    phrases: list[str]  # one per kind of evidence; empty when the loss was calm
    evidence: dict[str, float | int]
    critical: bool  # diverged or non-finite
    last_step: int  # the step of the critical evidence (or the span's start)


def span_evidence(loss: LossView, lo: int, hi: float, th: dict) -> SpanEvidence:
    inside = (loss.steps >= lo) & (loss.steps <= hi)
    steps, values, y = loss.steps[inside], loss.values[inside], loss.y[inside]
    ref = loss.reference[inside]
    bad = loss.bad_steps[(loss.bad_steps >= lo) & (loss.bad_steps <= hi)]
    phrases, evidence = _spikes(loss, inside, th["spike_z"], th["spike_rise"])
    more, swings = _oscillation(y, loss.log, th["swing_share"], th["swing_rise"])
    phrases, evidence = phrases + more, {"loss_points": int(y.size), **evidence, **swings}
    known = np.flatnonzero(np.isfinite(ref))  # the first point with a trailing median
    tail = float(np.median(y[-5:])) if y.size >= 3 else np.nan
    diverged = known.size > 0 and bool(
        beyond(tail - ref[known[0]], ref[known[0]], th["diverge_rise"], loss.log)
    )
    last = lo
    if diverged:
        phrases.append(f"diverged (ending at {fmt(float(np.median(values[-5:])))})")
        last = int(steps[-1])
    if bad.size:
        phrases.append(f"turned non-finite at step {int(bad[0])}")
        evidence["nonfinite_step"] = int(bad[0])
        last = max(last, int(bad[0]))
    evidence["diverged"] = int(diverged)
    return SpanEvidence(phrases, evidence, diverged or bad.size > 0, last)


def _spikes(
    loss: LossView, inside: np.ndarray, z_threshold: float, rise: float
) -> tuple[list[str], dict[str, float | int]]:
    """Spike points inside the span, tested as ``detect_loss_spikes`` tests them."""
    y, ref, z = loss.y[inside], loss.reference[inside], loss.z[inside]  # [k]
    with np.errstate(invalid="ignore"):
        hit = (z > z_threshold) & np.isfinite(ref) & beyond(y - ref, ref, rise, loss.log)
    if not hit.any():
        return [], {"loss_spikes": 0}
    peak = int(np.flatnonzero(hit)[np.argmax(z[hit])])
    count, value, step = (
        int(hit.sum()),
        float(loss.values[inside][peak]),
        int(loss.steps[inside][peak]),
    )
    phrase = (
        f"spiked at {count} point{'s' if count > 1 else ''} (up to {fmt(value)} at step {step})"
    )
    return [phrase], {"loss_spikes": count, "spike_peak": value, "spike_step": step}


def _oscillation(
    y: np.ndarray, log: bool, share: float, rise: float
) -> tuple[list[str], dict[str, float]]:
    """Step-to-step changes that flip sign at ``share`` of the points with a large swing."""
    if y.size < MIN_SWINGS:
        return [], {}
    signs = np.sign(np.diff(y))  # [k - 1]
    flips = float(np.mean(signs[1:] * signs[:-1] < 0))
    swing = float(np.median(np.abs(np.diff(y))))
    level = float(np.median(np.abs(y)))
    relative = float(np.expm1(swing)) if log else swing / max(level, 1.0)
    evidence = {"sign_flip_share": flips, "median_swing": relative}
    if flips < share or not beyond(swing, level, rise, log):
        return [], evidence
    return [
        f"oscillated (direction flipped at {flips:.0%} of points, median swing {relative:.0%})"
    ], evidence
