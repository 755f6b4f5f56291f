"""Loss spikes: points far above the trailing median of the loss, robust to mini-batch noise,
and the gradient-norm spike that gave warning of each, when one did."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import Run
from . import _grad_precursor as grad_precursor
from ._checks import check_count, check_positive, check_window
from ._series import (
    LOSS_PATTERN,
    finite_series,
    fmt,
    held_level,
    loss_keys,
    trailing_z,
    true_runs,
)
from .findings import Finding, Severity

NAME = "loss_spike"
TINY = 1e-9
"""Spread floor, relative to the loss's own scale: a window varying less than this is flat."""
SHOWN_STEPS = 5
"""Spike steps a recurrent-spike summary lists (the evidence stays small)."""
PERIODIC_SHARE = 0.6
"""Share of the gaps between recurrent spikes that must agree for them to be periodic."""


@dataclass(frozen=True)
class _Scored:
    """One loss curve scored against its trailing reference (arrays are ``[n]``)."""

    key: str
    steps: np.ndarray
    values: np.ndarray
    reference: np.ndarray  # trailing median in the loss's own units
    z: np.ndarray  # robust z-score (log space when the loss is positive); inf at the start
    margin: np.ndarray  # a spike exceeds it; a recovered loss's later median stays under it
    early: int  # leading points judged against the points before them (no trailing spread)


@dataclass(frozen=True)
class _Span:
    """One run of consecutive spike points (indices into the scored arrays)."""

    first: int
    last: int
    peak: int
    post: float | None  # median of the points after it, None at the end of the series
    stuck: bool  # that median stays above the margin: no recovery


NEEDS = (LOSS_PATTERN,)
"""Record keys it reads: the loss keys (``_series.is_loss_key`` narrows the pattern);
``norms/grad_total`` is read when present, for the gradient-norm spike before a loss spike."""


def detect_loss_spikes(
    run: Run,
    *,
    window: int = 50,
    z_threshold: float = 6.0,
    min_rel_increase: float = 0.5,
    min_level_share: float = 0.1,
    recovery_window: int = 50,
    recurrent_count: int = 5,
    max_per_key: int = 5,
    start_factor: float = 4.0,
) -> list[Finding]:
    """Spikes in ``scalars/loss`` and the other loss keys (see ``is_loss_key``).

    Each point ``x_i`` is compared with the ``window`` points before it (no
    look-ahead), in ``y = log x`` when every value is positive (a decaying loss
    becomes a gentle line and noise becomes relative), else in ``y = x``:
    ``z_i = (y_i - med_i) / max(1.4826 * MAD_i, 1e-9 * s)`` (Hampel's robust
    z-score, Rousseeuw & Croux 1993), ``s`` the loss's own scale (1 in log space,
    the median ``|x|`` of its non-zero points in linear space). ``x_i`` is a spike
    point when ``z_i > z_threshold`` and ``x_i > (1 + min_rel_increase) * exp(med_i)``
    (linear space: ``y_i - med_i > min_rel_increase * max(|med_i|, s)``); the
    second test keeps tiny wiggles of a flat, near-noiseless loss (MAD ~ 0) from
    counting, and its floor ``s`` keeps a trailing median of exactly 0 from
    making every positive point a spike. A spike must also matter at the run's own
    scale: ``x_i - ref_i >= min_level_share * L_i``, ``L_i`` the highest trailing
    median the loss has held up to ``i`` (usually its starting level), so a loss of
    1e-3 near the end of training that doubles, 0.04% of a starting 2.3, is noise of a
    fit model, not a spike, while a spike back to a tenth of the starting loss is one.
    A non-negative loss with exact zeros (a triplet or hinge loss whose margin is met,
    a KL term not yet switched on) is scored on its non-zero points only (zeros are
    inactive steps), once a full ``window`` of them precedes the point, in ``y = sqrt x``
    with the margin
    ``(1 + min_rel_increase) * med_i^2``: its active values are skewed from zero
    (half-normal to exponential), which a square root makes nearly symmetric
    (an exponential becomes a Rayleigh variable), where ``log`` would stretch the
    near-zero tail and hide 20x spikes and ``x`` would flag the skewed tail.

    Consecutive spike points form a span: a ``WARNING``, ``CRITICAL`` when the
    median of the ``recovery_window`` points after it stays above the margin
    (the loss did not recover). A key with ``recurrent_count`` spans or more gets
    one ``CRITICAL`` summary instead (count, worst spike, first steps), which
    says when the spikes are periodic (most gaps equal: an epoch boundary). At
    most ``max_per_key`` findings per key, the largest z first. Non-finite
    points are left to ``detect_nonfinite``.

    *Warning from the gradient norm*: when the run records ``norms/grad_total``, each span's
    evidence says whether the global gradient norm spiked first (OLMo 2, Team OLMo 2024,
    watches gradient-norm spikes as the mark of such instability). The norm ``g`` is scored
    like a positive loss, ``log g`` against its own ``window`` measurements before it: a
    grad-norm spike is a run of points over ``(1 + min_rel_increase)`` times their trailing
    median of which one or more pass ``z_threshold``, from the first of those (its onset),
    so that a sustained rise that dips under the z test for a point is one spike. An onset
    counts when it lies in the steps the loss's trailing reference covers before the span,
    up to the span's first step (at least one spacing of the norm's measurements, and after
    the previous span on the key); the latest gives the step, its size (x its trailing
    median) and the lead in steps (0: the same step), exact to within the spacing of the
    measurements (the norm is recorded every 10 steps by default, the loss every step). A
    spike begun before those steps and lasting into them is no onset: the evidence gives the
    steps it began and lasted to. A recurrent summary counts the spikes that had one. In the
    corpus and holdout (norm every 10 steps) the norm spiked 1-7 steps before 3 of the 16
    loss spikes of sick runs it could judge, and had been high for 100 steps before one
    more. Its 66 healthy runs hold 3 onsets in 34,000 steps: one falls in a 50-step window
    by chance about once in 200.

    *At the start*: the first ``max(3, window // 5)`` points of a positive loss have too
    few points before them for a spread, so there they are judged from the second point
    on against the median of the points before them, with no z-score: a spike point is
    ``start_factor`` times that median or more (and the level test above). Only spans
    the loss comes back from count (the median of the ``recovery_window`` points after
    them is under the margin): the first updates overshot, as when weights start 20x
    too large (the loss 3.7e3 at step 0, 3.5e4 at step 1, then 1-30 for the rest of the
    run: a run with no calm stretch for the trailing test to compare with). A loss term
    that climbs from its first values and stays up (a VAE's KL leaving the prior) is
    left to ``detect_loss_divergence``. Why a fixed factor works without a spread: at
    initialisation the model has learned nothing, so the per-example losses are alike
    and mini-batches barely move their mean. The first ten points of the corpus's 46
    healthy runs never exceed 1.22x the median before them (a BatchNorm CNN's step 1);
    the holdout's healthy runs reach 2.11x (RMSprop's first update, about 10x its later
    ones since the squared-gradient average starts at 0) and its tiny-batch run 1.12x
    (the same run's batch losses swing 10x later, once most examples are fit); the
    sick runs 9.4x (weights 20x the default) and 2e6x (Adam at lr 0.5). The default 4 is
    about twice the largest healthy overshoot.

    Args:
        run: the run to read.
        window: trailing points in the reference (default 50: long enough for a
            stable median, short enough to follow a decaying loss).
        z_threshold: robust z-score above which a point may be a spike (default
            6: about one false point in 10^9 under Gaussian noise).
        min_rel_increase: relative margin above the trailing median (default 0.5,
            i.e. 1.5x; ordinary mini-batch noise stays well inside it).
        min_level_share: smallest rise, as a share of the highest level the loss has
            held (default 0.1).
        recovery_window: points after a span whose median decides recovery.
        recurrent_count: spans on one key from which they are summarised as
            recurrent and critical (default 5).
        max_per_key: most findings per key (default 5).
        start_factor: rise over the median of the points before it that makes one of
            the first points a spike (default 4; see *At the start*).

    Returns:
        One finding per span (at most ``max_per_key``), or one recurrent summary,
        per loss key. With ``norms/grad_total`` recorded, the evidence adds ``grad_norm``
        (a sentence) and, once judged, ``grad_spike_before`` and ``grad_lookback_steps``;
        with an onset ``grad_spike_step``, ``grad_spike_ratio``, ``grad_lead_steps`` and
        ``grad_lead_resolution`` (a summary: ``grad_spikes_before`` of
        ``grad_spikes_judged``, ``grad_lead_median``/``_min``/``_max``); with a spike begun
        before, ``grad_spike_began`` and ``grad_spike_lasted_to``.

    Raises:
        ValueError: a window below 3 points, a non-positive threshold or count, or
            ``start_factor <= 1``.
        TypeError: a window or count that is not an int.
    """
    check_window("window", window)
    check_count("recovery_window", recovery_window, minimum=1, what="points after a spike")
    check_count("recurrent_count", recurrent_count, minimum=2, what="spikes on one key")
    check_count("max_per_key", max_per_key, minimum=1, what="findings per loss key")
    check_positive("z_threshold", z_threshold)
    check_positive("min_rel_increase", min_rel_increase)
    check_positive("min_level_share", min_level_share)
    if not (isinstance(start_factor, int | float) and 1.0 < start_factor < float("inf")):
        raise ValueError(
            f"start_factor must be a finite factor > 1 (a rise over the points before), got "
            f"{start_factor!r}; pass start_factor=4 for the default"
        )
    thresholds = {
        "window": window,
        "z_threshold": z_threshold,
        "min_rel_increase": min_rel_increase,
        "min_level_share": min_level_share,
        "recovery_window": recovery_window,
        "recurrent_count": recurrent_count,
        "start_factor": start_factor,
    }
    findings: list[Finding] = []
    grad_norm = grad_precursor.grad_norm(run, window, (z_threshold, min_rel_increase))
    for key in loss_keys(run):
        scored = _score(run, key, window, (min_rel_increase, start_factor))
        if scored is None:
            continue
        level = held_level(scored.values, window)  # [n]
        rise = scored.values - np.nan_to_num(scored.reference)
        hit = (scored.z > z_threshold) & (scored.values > scored.margin)
        hit &= rise >= min_level_share * level
        spans = [_span(scored, span, recovery_window) for span in true_runs(hit)]
        # an early rise the loss does not come back from is a term climbing, not a spike
        spans = [
            sp for sp in spans if sp.first >= scored.early or (sp.post is not None and not sp.stuck)
        ]
        grads = [
            grad_precursor.precursor(
                grad_norm, scored.steps, sp.first, window, spans[k - 1].last if k else None
            )
            for k, sp in enumerate(spans)
        ]
        if len(spans) >= recurrent_count:
            findings.append(_recurrent_finding(scored, spans, thresholds, grads))
            continue
        worst = sorted(range(len(spans)), key=lambda k: -scored.z[spans[k].peak])[:max_per_key]
        findings += [
            _finding(scored, spans[k], len(spans), thresholds, grads[k]) for k in sorted(worst)
        ]
    return findings


def _score(run: Run, key: str, window: int, factors: tuple[float, float]) -> _Scored | None:
    rel, start_factor = factors
    steps, values = finite_series(run, key)
    zeros = values == 0
    sparse = bool(zeros.any()) and bool(np.all(values >= 0))
    if sparse:  # inactive steps of a hinge-like or switched-off loss
        steps, values = steps[~zeros], values[~zeros]
    min_periods = window if sparse else max(3, window // 5)
    if values.shape[0] <= min_periods:
        return None
    log_space = not sparse and bool(np.all(values > 0))
    y = np.log(values) if log_space else np.sqrt(values) if sparse else values
    scale = 1.0 if log_space else float(np.median(np.abs(y[y != 0])))
    med, z = trailing_z(y, window, min_periods=min_periods, floor=TINY * scale)
    if log_space or sparse:
        reference = np.exp(med) if log_space else med**2
        margin = reference * (1.0 + rel)
    else:
        reference = med
        margin = med + rel * np.maximum(np.abs(med), scale)
    early = min_periods if log_space else 0
    for i in range(1, early):  # the first points: against the points before them
        reference[i] = float(np.exp(np.median(y[:i])))
        margin[i], z[i] = start_factor * reference[i], np.inf
    return _Scored(key, steps, values, reference, z, margin, early)


def _span(s: _Scored, span: tuple[int, int], recovery: int) -> _Span:
    first, last = span
    peak = first + int(np.argmax(s.values[first : last + 1]))
    after = s.values[last + 1 : last + 1 + recovery]
    post = float(np.median(after)) if after.size else None
    return _Span(first, last, peak, post, post is not None and post > s.margin[first])


def _versus(s: _Scored, i: int) -> str:
    """``"5x the trailing median 0.3, robust z 40"`` for point ``i``."""
    ref, value = float(s.reference[i]), float(s.values[i])
    versus = f"{fmt(value / ref)}x" if ref > 0 else f"{fmt(value - ref)} above"
    if i == 1:
        return f"{versus} the first value {fmt(ref)}"
    if i < s.early:
        return f"{versus} the median {fmt(ref)} of the {i} points before it"
    return f"{versus} the trailing median {fmt(ref)}, robust z {fmt(float(s.z[i]))}"


def _peak_evidence(s: _Scored, sp: _Span) -> dict[str, float | int]:
    evidence = {
        "peak": float(s.values[sp.peak]),
        "peak_step": int(s.steps[sp.peak]),
        "trailing_median": float(s.reference[sp.first]),
    }
    if sp.first < s.early:  # no spread yet: where the loss began and where it settles
        settled = float(
            np.median(s.values[s.steps >= s.steps[-1] - 0.25 * (s.steps[-1] - s.steps[0])])
        )
        return {**evidence, "first_loss": float(s.values[0]), "settled_level": settled}
    return {**evidence, "z_score": float(s.z[sp.peak])}


def _finding(
    s: _Scored, sp: _Span, count: int, thresholds: dict, grad: grad_precursor.Precursor | None
) -> Finding:
    message = (
        f"{s.key} spiked to {fmt(float(s.values[sp.peak]))} at step {int(s.steps[sp.peak])} "
        f"({_versus(s, sp.peak)})"
        + (f" and did not recover (median {fmt(sp.post)} afterwards)" if sp.stuck else "")
    )
    evidence = {
        **_peak_evidence(s, sp),
        "points": sp.last - sp.first + 1,
        "spikes_on_key": count,
        **thresholds,
    }
    if sp.post is not None:
        evidence["median_after"] = sp.post
    evidence |= grad_precursor.evidence(grad)
    start = int(s.steps[sp.first])
    action = (
        _stuck_action(start)
        if sp.stuck
        else (
            f"Inspect the batches around step {start} for bad data, and lower the learning rate "
            "or enable gradient clipping if spikes recur."
        )
    ) + grad_precursor.warning_action([grad])
    if sp.first < s.early:
        message = f"At the start of training, {message}: the first updates overshoot"
        action = (
            "Lower the initial learning rate or warm it up, and check the initialisation's "
            f"scale: the loss began at {fmt(evidence['first_loss'])} and settles at "
            f"{fmt(evidence['settled_level'])}."
        )
    return Finding(
        NAME,
        Severity.CRITICAL if sp.stuck else Severity.WARNING,
        start,
        int(s.steps[sp.last]),
        message,
        action,
        evidence,
        (s.key,),
    )


def _recurrent_finding(
    s: _Scored,
    spans: list[_Span],
    thresholds: dict,
    grads: list[grad_precursor.Precursor | None],
) -> Finding:
    """One summary for a key that keeps spiking: count, worst spike, first steps, period."""
    peaks = s.steps[[sp.peak for sp in spans]]  # [k]
    worst = max(spans, key=lambda sp: s.z[sp.peak])
    stuck = next((sp for sp in spans if sp.stuck), None)
    period = spike_period(peaks)
    shown = ", ".join(str(int(p)) for p in peaks[:SHOWN_STEPS])
    shown += ", ..." if peaks.size > SHOWN_STEPS else ""
    message = (
        f"{s.key} spiked {len(spans)} times (steps {shown}); the worst reached "
        f"{fmt(float(s.values[worst.peak]))} at step {int(s.steps[worst.peak])} "
        f"({_versus(s, worst.peak)})"
        + (f"; the spikes are periodic, every {period} steps" if period else "")
        + (f"; the loss did not recover after step {int(s.steps[stuck.first])}" if stuck else "")
    )
    evidence = {
        **_peak_evidence(s, worst),
        "spikes_on_key": len(spans),
        "spike_steps": shown,
        **({"period": period} if period else {}),
        **thresholds,
        **grad_precursor.summary(grads),
    }
    if stuck is not None:
        action = _stuck_action(int(s.steps[stuck.first]))
    elif period:
        action = (
            f"The loss spikes every {period} steps, as at an epoch boundary: check the "
            "epoch's last batch (a tiny remainder batch; use DataLoader(drop_last=True)) "
            "and the data order (shuffling, sorted or repeated shards)."
        )
    else:
        action = (
            "Lower the learning rate or enable gradient clipping "
            "(torch.nn.utils.clip_grad_norm_), since the loss keeps spiking."
        )
    action += grad_precursor.warning_action(grads)
    return Finding(
        NAME,
        Severity.CRITICAL,
        int(s.steps[spans[0].first]),
        int(s.steps[spans[-1].last]),
        message,
        action,
        evidence,
        (s.key,),
    )


def spike_period(peaks: np.ndarray, *, share: float = PERIODIC_SHARE) -> int | None:
    """The common gap between spike steps, when at least ``share`` of the gaps agree.

    Gaps agree within ``max(1, 2%)`` steps of each other; at least 3 must agree.

    Args:
        peaks: ``[k]`` increasing steps of the spikes.
        share: the fraction of the ``k - 1`` gaps that must share one period.

    Returns:
        The period in steps (median of the agreeing gaps), or None.
    """
    gaps = np.sort(np.diff(peaks).astype(np.float64))  # [k - 1]
    if gaps.size < 3:
        return None
    tol = np.maximum(1.0, 0.02 * gaps)
    counts = np.searchsorted(gaps, gaps + tol, side="right") - np.searchsorted(
        gaps, gaps - tol, side="left"
    )  # [k - 1]
    best = int(np.argmax(counts))
    if counts[best] < max(3, share * gaps.size):
        return None
    return round(float(np.median(gaps[np.abs(gaps - gaps[best]) <= tol[best]])))


def _stuck_action(step: int) -> str:
    return (
        f"Restart from a checkpoint before step {step} with a lower learning rate (or "
        "longer warmup) and gradient clipping (torch.nn.utils.clip_grad_norm_)."
    )
