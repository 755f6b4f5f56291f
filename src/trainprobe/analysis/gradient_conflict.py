"""Persistent gradient conflict between tasks or user-defined groups of the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import Run
from ._checks import check_below, check_count, check_fraction, check_window
from ._series import finite_series, fmt, rolling_median, true_runs
from .findings import Finding, Severity

NAME = "gradient_conflict"
PREFIX = "conflict/cos"
NORM = "conflict/norm"
PCGRAD = "conflict/pcgrad_shift"
APPLIED_COS = "conflict/applied_cos"
APPLIED_OFFSET = "conflict/applied_offset"
NOT_TASKS = ("class_", "micro_")
"""Group-name prefixes this detector leaves alone. Per-class gradients are strongly
anti-aligned in healthy classification (each class pushes its own logit up and the
others down: cosines near −0.9 in a balanced binary problem), so class pairs are judged
by :func:`~trainprobe.analysis.detect_class_competition` on evidence of harm instead;
random micro-batches disagree when the gradient is noise-dominated, which is
:func:`~trainprobe.analysis.detect_noise_scale`'s subject."""


@dataclass(frozen=True)
class _Episode:
    """One pair's longest stretch of conflict."""

    pair: tuple[str, str]
    median: float  # median cosine over the stretch's measurements
    worst: float  # lowest windowed median in it
    start_step: int
    end_step: int
    points: int  # measurements in the stretch
    share: float  # of the pair's measured span, in steps
    weaker_loses: bool  # the summed update raises the weaker task's loss (or norms unknown)


NEEDS = (f"{PREFIX}/*",)
"""Record keys it needs: the pairwise gradient cosines (``conflict/norm/*``,
``conflict/pcgrad_shift`` and ``conflict/applied_*`` are read when present)."""


def detect_gradient_conflict(
    run: Run,
    *,
    window: int = 5,
    conflict_cos: float = -0.1,
    critical_cos: float = -0.5,
    min_points: int = 5,
    critical_share: float = 0.5,
    top: int = 3,
    resolved_cos: float = -0.01,
    resolved_offset: float = 0.5,
) -> list[Finding]:
    """Tasks (or user groups) whose gradients point against each other for a long stretch.

    Reads ``conflict/cos/<a>__<b>`` from :class:`~trainprobe.probes.GradConflict`
    with ``by="task"`` or per-example group ids (class and micro-batch pairs are left
    to other detectors; see :data:`NOT_TASKS`). A negative cosine means a step that
    lowers one loss raises the other to first order (Yu et al. 2020, "Gradient Surgery
    for Multi-Task Learning", who call it conflict). One noisy negative reading is not
    a finding: a pair's stretch of conflict is a run of measurements whose rolling
    median over ``window`` measurements is below ``conflict_cos``, lasting at least
    ``min_points`` measurements, where the conflict harms: the summed update ``g_a +
    g_b`` changes task ``a``'s loss by ``-(‖g_a‖² + ‖g_a‖‖g_b‖ cos)``, which is an
    increase only when ``cos < -‖g_a‖/‖g_b‖``. So, with the groups' gradient norms
    recorded (``conflict/norm/<group>``), a stretch counts where the rolling median of
    ``cos + min/max`` of the two norms is below 0 (the weaker task loses ground: the
    magnitude-plus-conflict case PCGrad addresses) or the cosine is at most
    ``critical_cos`` (so opposed that the update all but cancels) over ``critical_share``
    of the run. Mildly negative
    cosines of tasks of similar magnitude, which both still descend, are not conflict.

    Severity by magnitude and duration: ``CRITICAL`` when the stretch's median cosine
    is at most ``critical_cos`` and the stretch covers at least ``critical_share`` of
    the pair's measured steps (the tasks fight for most of training), else
    ``WARNING``. One finding per severity lists its pairs, most negative first, with
    PCGrad's shift of the update (``conflict/pcgrad_shift``) when recorded.

    A conflict the training loop already resolves is ``INFO``, not advice to do what the
    loop does: with the gradient handed to the optimizer recorded
    (``conflict/applied_cos/<group>``, ``conflict/applied_offset``), a stretch is resolved
    when, over its measurements, the median of the lower of the two groups' cosines with
    that gradient is at least ``resolved_cos`` (no task's loss rises under the step taken)
    and the median distance of that gradient from the plain sum is at least
    ``resolved_offset`` times PCGrad's median shift (the update is not the plain sum: it
    was projected or reweighted). A PCGrad step meets both exactly (its cosines are >= 0,
    its offset equals the shift); a summed update has offset 0.

    Args:
        run: the run to read.
        window: measurements per rolling median (default 5).
        conflict_cos: a rolling median below this is conflict (default -0.1).
        critical_cos: a stretch median at or below this can be critical (default -0.5).
        min_points: fewest measurements in a stretch (default 5).
        critical_share: share of the pair's measured steps a critical stretch covers.
        top: pairs named in the message.
        resolved_cos: least median cosine of the step taken with each group, for a
            resolved stretch.
        resolved_offset: least median offset of the step taken from the plain sum, as a
            fraction of PCGrad's median shift, for a resolved stretch.

    Returns:
        Up to three findings (critical, warning, info for resolved conflict).

    Raises:
        ValueError: ``window`` or ``min_points`` below 3, ``top < 1``,
            ``critical_cos >= conflict_cos``, ``conflict_cos >= 0``, a share outside
            ``[0, 1)``, ``resolved_cos`` outside ``[-1, 1]`` or ``resolved_offset`` outside
            ``(0, 1]``.
    """
    check_window("window", window)
    check_window("min_points", min_points)
    check_count("top", top, minimum=1, what="pairs named per finding")
    check_below("critical_cos", critical_cos, "conflict_cos", conflict_cos)
    check_below("conflict_cos", conflict_cos, "0", 0.0)
    check_fraction("critical_share", critical_share)
    if not -1.0 <= resolved_cos <= 1.0:
        raise ValueError(f"resolved_cos must be a cosine in [-1, 1], got {resolved_cos!r}")
    if not 0.0 < resolved_offset <= 1.0:
        raise ValueError(f"resolved_offset must be in (0, 1], got {resolved_offset!r}")
    episodes = []
    for name in run.layers(PREFIX):
        pair = tuple(name.split("__", 1))
        if len(pair) != 2 or any(g.startswith(NOT_TASKS) for g in pair):
            continue
        steps, cos = finite_series(run, f"{PREFIX}/{name}")
        steps, cos, margin = _weaker_task_margin(run, pair, steps, cos)
        episode = _longest_conflict(
            pair, (steps, cos, margin), window, (conflict_cos, critical_cos), min_points
        )
        lasting = episode is not None and episode.share >= critical_share
        if episode is not None and (episode.weaker_loses or lasting):
            episodes.append(episode)  # strong but short and harmless to the weaker: noise
    resolved = [e for e in episodes if _resolved(run, e, resolved_cos, resolved_offset)]
    episodes = [e for e in episodes if e not in resolved]
    critical = [e for e in episodes if e.median <= critical_cos and e.share >= critical_share]
    warning = [e for e in episodes if e not in critical]
    thresholds = {
        "window": window,
        "conflict_cos": conflict_cos,
        "critical_cos": critical_cos,
        "min_points": min_points,
        "critical_share": critical_share,
    }
    levels = ((critical, Severity.CRITICAL), (warning, Severity.WARNING))
    out = [_finding(run, group, severity, top, thresholds) for group, severity in levels if group]
    if resolved:
        thresholds |= {"resolved_cos": resolved_cos, "resolved_offset": resolved_offset}
        out.append(_finding(run, resolved, Severity.INFO, top, thresholds))
    return out


def _in_span(run: Run, key: str, episode: _Episode) -> np.ndarray:
    """``key``'s finite values at the episode's steps (``[m]``, empty when absent)."""
    steps, values = finite_series(run, key)
    return values[(steps >= episode.start_step) & (steps <= episode.end_step)]


def _applied(run: Run, episode: _Episode) -> tuple[float, float] | None:
    """The medians, over the episode, of the lower of the two groups' cosines with the
    gradient handed to the optimizer and of that gradient's offset from the plain sum;
    None when not recorded."""
    a_steps, a = finite_series(run, f"{APPLIED_COS}/{episode.pair[0]}")
    b_steps, b = finite_series(run, f"{APPLIED_COS}/{episode.pair[1]}")
    common, i, j = np.intersect1d(a_steps, b_steps, return_indices=True)
    inside = (common >= episode.start_step) & (common <= episode.end_step)
    offset = _in_span(run, APPLIED_OFFSET, episode)
    if not inside.any() or not offset.size:
        return None
    return float(np.median(np.minimum(a[i], b[j])[inside])), float(np.median(offset))


def _resolved(run: Run, episode: _Episode, least_cos: float, least_offset: float) -> bool:
    """Whether the loop's own update already resolves the episode's conflict (see
    :func:`detect_gradient_conflict`)."""
    applied = _applied(run, episode)
    shift = _in_span(run, PCGRAD, episode)
    if applied is None or not shift.size:
        return False
    cos, offset = applied
    return cos >= least_cos and offset >= least_offset * float(np.median(shift)) > 0


def _weaker_task_margin(
    run: Run, pair: tuple[str, str], steps: np.ndarray, cos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``cos + min(‖g_a‖, ‖g_b‖) / max(‖g_a‖, ‖g_b‖)`` at the steps both norms were
    measured (``[n]``), or None without ``conflict/norm/<group>``: below 0, the summed
    update raises the weaker task's loss to first order."""
    a_steps, a = finite_series(run, f"{NORM}/{pair[0]}")
    b_steps, b = finite_series(run, f"{NORM}/{pair[1]}")
    if not a.size or not b.size:
        return steps, cos, None
    common, i, j = np.intersect1d(steps, a_steps, return_indices=True)
    common, k, m = np.intersect1d(common, b_steps, return_indices=True)
    lo, hi = np.minimum(a[j][k], b[m]), np.maximum(a[j][k], b[m])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(hi > 0, lo / hi, 1.0)
    return common, cos[i][k], cos[i][k] + ratio


def _longest_conflict(
    pair: tuple[str, str],
    series: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    window: int,
    levels: tuple[float, float],
    min_points: int,
) -> _Episode | None:
    """The pair's longest stretch of conflict that harms: rolling medians of the cosine
    below ``levels[0]``, and either below ``levels[1]`` (strong) or with the summed update
    raising the weaker task's loss (``margin`` below 0; without norms, any)."""
    steps, cos, margin = series
    below, strong = levels
    if cos.size < max(window, min_points):
        return None
    medians = rolling_median(cos, window)  # [n - window + 1], window j = cos[j:j + window]
    weaker_loses = True if margin is None else rolling_median(margin, window) < 0
    harms = (medians <= strong) | weaker_loses
    best = None
    for first, last in true_runs((medians < below) & harms):
        lo, hi = first, last + window - 1  # the measurements these windows cover
        if hi - lo + 1 >= min_points and (best is None or hi - lo > best[1] - best[0]):
            best = (lo, hi, float(medians[first : last + 1].min()))
    if best is None:
        return None
    lo, hi, worst = best
    span = max(int(steps[-1] - steps[0]), 1)
    loses = margin is None or float(np.median(margin[lo : hi + 1])) < 0
    return _Episode(
        pair,
        float(np.median(cos[lo : hi + 1])),
        worst,
        int(steps[lo]),
        int(steps[hi]),
        hi - lo + 1,
        float(steps[hi] - steps[lo]) / span,
        loses,
    )


def _finding(
    run: Run, episodes: list[_Episode], severity: Severity, top: int, thresholds: dict
) -> Finding:
    episodes = sorted(episodes, key=lambda e: e.median)
    shown = ", ".join(
        f"{a} vs {b} (median cos {fmt(e.median)} over {e.points} measurements, "
        f"steps {e.start_step}-{e.end_step})"
        for e in episodes[:top]
        for a, b in [e.pair]
    )
    more = f" and {len(episodes) - top} more pairs" if len(episodes) > top else ""
    start = min(e.start_step for e in episodes)
    end = max(e.end_step for e in episodes)
    evidence: dict[str, float | int | str] = {"pairs": len(episodes), **thresholds}
    for e in episodes[:top]:
        label = "__".join(e.pair)
        evidence[f"median_cos[{label}]"] = e.median
        evidence[f"worst_window_cos[{label}]"] = e.worst
        evidence[f"span_share[{label}]"] = e.share
    shift_steps, shift = finite_series(run, PCGRAD)
    inside = shift[(shift_steps >= start) & (shift_steps <= end)]
    if inside.size:
        evidence["median_pcgrad_shift"] = float(np.median(inside))
    for e in episodes[:top]:
        applied = _applied(run, e)
        if applied is not None:
            label = "__".join(e.pair)
            evidence[f"median_applied_min_cos[{label}]"] = applied[0]
            evidence[f"median_applied_offset[{label}]"] = applied[1]
    if severity is Severity.INFO:
        return Finding(
            NAME,
            severity,
            start,
            end,
            f"Gradient conflict the update already resolves: {shown}{more}; the gradient "
            "handed to the optimizer is not their plain sum and no task's loss rises under "
            "it to first order",
            "Nothing to project: the update already does (PCGrad or a reweighting); if a task "
            "still stalls, give the tasks separate capacity (task-specific heads or layers).",
            evidence,
            tuple(f"{PREFIX}/{'__'.join(e.pair)}" for e in episodes),
        )
    strength = "Strong, lasting" if severity is Severity.CRITICAL else "Persistent"
    return Finding(
        NAME,
        severity,
        start,
        end,
        f"{strength} gradient conflict: {shown}{more}; a step that lowers one of these "
        "losses raises the other",
        "Resolve the conflict: project conflicting gradients (PCGrad, Yu et al. 2020) or "
        "reweight the losses (e.g. GradNorm or uncertainty weighting), and check that the "
        "tasks do not need separate capacity (task-specific heads or layers).",
        evidence,
        tuple(f"{PREFIX}/{'__'.join(e.pair)}" for e in episodes),
    )
