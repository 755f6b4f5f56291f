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
"""Record keys it needs: the pairwise gradient cosines (``conflict/pcgrad_shift`` is read
when present)."""


def detect_gradient_conflict(
    run: Run,
    *,
    window: int = 5,
    conflict_cos: float = -0.1,
    critical_cos: float = -0.5,
    min_points: int = 5,
    critical_share: float = 0.5,
    top: int = 3,
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

    Args:
        run: the run to read.
        window: measurements per rolling median (default 5).
        conflict_cos: a rolling median below this is conflict (default -0.1).
        critical_cos: a stretch median at or below this can be critical (default -0.5).
        min_points: fewest measurements in a stretch (default 5).
        critical_share: share of the pair's measured steps a critical stretch covers.
        top: pairs named in the message.

    Returns:
        Up to two findings (critical, warning).

    Raises:
        ValueError: ``window`` or ``min_points`` below 3, ``top < 1``,
            ``critical_cos >= conflict_cos``, ``conflict_cos >= 0`` or a share outside
            ``[0, 1)``.
    """
    check_window("window", window)
    check_window("min_points", min_points)
    check_count("top", top, minimum=1, what="pairs named per finding")
    check_below("critical_cos", critical_cos, "conflict_cos", conflict_cos)
    check_below("conflict_cos", conflict_cos, "0", 0.0)
    check_fraction("critical_share", critical_share)
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
    critical = [e for e in episodes if e.median <= critical_cos and e.share >= critical_share]
    warning = [e for e in episodes if e not in critical]
    thresholds = {
        "window": window,
        "conflict_cos": conflict_cos,
        "critical_cos": critical_cos,
        "min_points": min_points,
        "critical_share": critical_share,
    }
    return [
        _finding(run, group, severity, top, thresholds)
        for group, severity in ((critical, Severity.CRITICAL), (warning, Severity.WARNING))
        if group
    ]


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
