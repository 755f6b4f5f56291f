"""Update-to-weight ratios far outside the healthy band around 1e-3."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

import numpy as np

from ..store import Run
from ._checks import check_below, check_count, check_fraction, check_positive, check_window
from ._series import finite_series, fmt, step_windows, window_medians
from .edge_of_stability import RATIO, at_edge, ratio_around
from .findings import Finding, Severity

NAME = "update_ratio"
PREFIX = "updates/ratio"
WEIGHTS = "norms/weight"
HEALTHY = 1e-3
"""Karpathy's rule of thumb for ||dw|| / ||w|| per step (CS231n, "Neural Networks Part 3")."""


@dataclass(frozen=True)
class _Layer:
    """One layer out of band: its level and the steps that showed it."""

    name: str
    level: float  # peak windowed median (too large) or overall median (too small)
    deviation: float  # how far out of band, >= 1
    start_step: int
    end_step: int


NEEDS = (f"{PREFIX}/*",)
"""Record keys it needs: per-tensor update/weight ratios (``norms/weight/<param>`` is read
when present, to skip a tensor's initial transient)."""


def detect_update_ratio(
    run: Run,
    *,
    window_steps: int = 200,
    min_points: int = 5,
    high: float = 1e-1,
    critical: float = 1.0,
    blowup: float = 10.0,
    low: float = 1e-6,
    min_weight_share: float = 0.05,
    skip_start: float = 0.05,
    growth: float = 4.0,
    skip: tuple[str, ...] = (),
    top: int = 5,
) -> list[Finding]:
    """Layers whose relative update ``||w_after - w_before|| / ||w_before||`` is far off 1e-3.

    *Too large*: the median of ``updates/ratio/<param>`` over some window of
    ``window_steps`` steps (at least ``min_points`` measurements, so dense and
    sparse schedules judge the same stretch of training) exceeds ``high``
    (``WARNING``) or ``critical`` (``CRITICAL``: each step rewrites the layer).
    *Too small*: the median over all its measurements is below ``low`` (``INFO``:
    the layer barely moves, so its learning rate is too low or it is dead). One
    finding per direction lists the layers, most out of band first.

    *Blow-up*: one measurement past the transient where the ratio is ``>= blowup``
    (``CRITICAL``: one step moved the tensor ten times its own norm; a parameter blown up
    within a few steps leaves no window to take a median of).

    A too-large finding is ``INFO`` when the run's sharpness sat at the edge of stability
    over its span (``sharpness/ratio`` median in [0.85, 2), the edge and the catapult
    phase past it): the updates are the oscillation gradient descent settles into there,
    not a learning rate to lower.

    The too-large and blow-up tests ignore a tensor's initial transient. The probe writes
    ``||dw|| / (||w|| + 1e-12)``, so a zero- or tiny-initialised tensor (LayerScale
    gamma, LoRA B, zero-init BatchNorm gamma) starts near 1e9 and decays like
    ``1/t`` while ``||w||`` grows: healthy, and over by the time the tensor has a
    norm. With ``norms/weight/<param>`` recorded, measurements where ``||w||`` (the
    latest measured at or before the step) is below ``min_weight_share`` of that
    tensor's median weight norm over the run are skipped; without it, the first
    ``skip_start`` of the series' steps are. They also ignore a tensor that is small
    by design, read from its norms rather than its name: its median ``||w||`` is below
    ``min_weight_share`` of the median over the model's tensors (a zero-initialised
    gate or bias that stays small moves by a large share of its own tiny norm while its
    updates are ordinary in size). Non-finite ratios (a non-finite
    training step, reported by ``detect_nonfinite``) are dropped.

    *Growing into its scale*: a small tensor that grows by a large factor (an output
    bias starting at 0.1 that settles at 1.6) moves by a large share of its norm exactly
    while that norm climbs, and the share falls as it grows: its updates stay the same
    size while ``||w||`` catches up with them. A learning rate too high for a tensor
    keeps ``||dw||`` comparable to ``||w||`` without that growth (the tensor oscillates)
    or with it (the tensor blows up, and its ratio stays high). So, from
    ``norms/weight/<param>``: where the tensor's settled norm ``S`` (the median ``||w||``
    over the last quarter of its measurements) is ``growth`` times its norm at the step
    or more, and its settled ratio (the median ratio over the last quarter of the
    ratio's measurements) is at most ``high``, the step's update is judged against the
    scale the tensor grows into: ``||dw|| / S`` (the ratio times ``||w|| / S``). In
    the corpus, the tensors whose 200-step ratio median passes 0.1 grow at most 2.8x
    afterwards (a bias at the edge of stability); the holdout's tiny-batch output bias
    grows 12.9x (median norm 0.12 over its flagged window, settled 1.58, settled ratio
    0.008), and a blow-up (``explode_geometric``: 2e8x) keeps a settled ratio of 2.1, so
    it stays flagged.

    Args:
        run: the run to read.
        window_steps: steps per median (default 200: 20 measurements at the
            default every-10 schedule, 200 when measured every step).
        min_points: fewest measurements per median (default 5; shorter series use
            all their points).
        high: warning level (default 1e-1, 100x the healthy 1e-3).
        critical: critical level (default 1: the update is as large as the weights).
        blowup: single-measurement level of a blow-up (default 10).
        low: barely-moving level (default 1e-6, 1000x below healthy).
        min_weight_share: ``||w||`` share of its run median below which a tensor is
            still in its initial transient (default 0.05: the ratio there is at most
            20x its settled value).
        skip_start: share of the series' steps skipped when ``norms/weight`` is
            missing (default 0.05).
        growth: factor between a tensor's settled norm and its norm at a step from
            which that step's update is judged against the settled norm (default 4: the
            corpus's flagged tensors grow at most 2.8x, the holdout's growing bias 12.9x).
        skip: fnmatch patterns of parameter names to ignore (default none: small
            tensors are recognised by their norms).
        top: layers named in the message and the evidence.

    Returns:
        Up to two findings: too large, too small.

    Raises:
        ValueError: ``window_steps < 1``, ``min_points < 3``, ``top < 1``, a
            non-positive level, levels not ordered ``low < high < critical``, a
            share outside ``[0, 1)``, or ``growth <= 1``.
        TypeError: ``skip`` is a bare string instead of a tuple of patterns, or a
            window or count is not an int.
    """
    if isinstance(skip, str):
        raise TypeError(
            f"skip must be a tuple of fnmatch patterns such as ('*bias',), got the string {skip!r}"
        )
    check_count("window_steps", window_steps, minimum=1, what="steps per median")
    check_window("min_points", min_points)
    check_count("top", top, minimum=1, what="layers named per finding")
    for name, value in (("high", high), ("critical", critical), ("low", low)):
        check_positive(name, value)
    check_below("low", low, "high", high)
    check_below("high", high, "critical", critical)
    check_below("critical", critical, "blowup", blowup)
    check_fraction("min_weight_share", min_weight_share)
    check_fraction("skip_start", skip_start)
    if not (isinstance(growth, int | float) and 1.0 < growth < float("inf")):
        raise ValueError(
            f"growth must be a finite factor > 1 (settled norm over the norm at a step), "
            f"got {growth!r}; pass growth=4 for the default"
        )
    large: list[_Layer] = []
    small: list[_Layer] = []
    blown: list[_Layer] = []
    layers = [layer for layer in run.layers(PREFIX) if not any(fnmatchcase(layer, p) for p in skip)]
    tiny = _small_by_design(run, layers, min_weight_share)
    for layer in layers:
        steps, ratios = finite_series(run, f"{PREFIX}/{layer}")
        if ratios.shape[0] < 3:
            continue
        small += _too_small(layer, steps, ratios, low)
        if layer in tiny:
            continue
        settled = _settled(run, layer, steps, min_weight_share, skip_start)
        blown += _blown_up(layer, steps[settled], ratios[settled], blowup)
        if np.count_nonzero(settled) >= 3:
            judged = _against_scale(run, layer, steps[settled], ratios[settled], growth, high)
            large += _too_large(layer, steps[settled], judged, (window_steps, min_points), high)
    thresholds = {
        "window_steps": window_steps,
        "min_points": min_points,
        "high": high,
        "critical": critical,
        "blowup": blowup,
        "low": low,
        "growth": growth,
        "healthy": HEALTHY,
    }
    findings = []
    if blown:
        findings.append(_blowup_finding(blown, top, thresholds))
    if large:
        worst = max(layer.level for layer in large)
        finding = _finding(
            large, Severity.CRITICAL if worst > critical else Severity.WARNING, top, thresholds
        )
        findings.append(_at_the_edge(run, finding))
    if small:
        findings.append(_finding(small, Severity.INFO, top, thresholds))
    return findings


def _settled(
    run: Run, layer: str, steps: np.ndarray, min_weight_share: float, skip_start: float
) -> np.ndarray:
    """``[n]`` bool: measurements past the tensor's initial (zero- or tiny-init) transient."""
    weight_steps, weights = finite_series(run, f"{WEIGHTS}/{layer}")
    if weights.size:
        at = np.clip(np.searchsorted(weight_steps, steps, side="right") - 1, 0, None)  # [n]
        return weights[at] >= min_weight_share * float(np.median(weights))
    return steps >= steps[0] + skip_start * (steps[-1] - steps[0])


def _against_scale(
    run: Run, layer: str, steps: np.ndarray, ratios: np.ndarray, growth: float, high: float
) -> np.ndarray:
    """``[n]`` ratios, those of a tensor growing into its scale judged against that scale.

    Where the settled norm ``S`` (median ``||w||`` over the last quarter of the weight
    norm's measurements) is ``>= growth`` times ``||w||`` at the step and the settled
    ratio (median over the last quarter of ``ratios``) is ``<= high``, the ratio becomes
    ``||dw|| / S = ratio * ||w|| / S``; elsewhere it is unchanged.
    """
    weight_steps, weights = finite_series(run, f"{WEIGHTS}/{layer}")
    if weights.size < 4 or np.median(ratios[_last_quarter(steps)]) > high:
        return ratios
    scale = float(np.median(weights[_last_quarter(weight_steps)]))
    at = np.clip(np.searchsorted(weight_steps, steps, side="right") - 1, 0, None)  # [n]
    growing = scale >= growth * weights[at]  # [n]
    return np.where(growing, ratios * weights[at] / scale, ratios)


def _last_quarter(steps: np.ndarray) -> np.ndarray:
    """``[n]`` bool: the measurements in the last quarter of the steps spanned."""
    return steps >= steps[-1] - 0.25 * (steps[-1] - steps[0])


def _at_the_edge(run: Run, finding: Finding) -> Finding:
    """``finding`` as ``INFO`` when the run's sharpness (``sharpness/ratio``, 3
    measurements or more) sat at the edge of stability over its span, or in the catapult
    phase past it (:func:`~.edge_of_stability.at_edge`): there gradient descent oscillates
    along the top Hessian direction, so each step moves the weights a lot while they go
    back and forth (Cohen et al. 2021); the loss still falls."""
    level = ratio_around(
        finite_series(run, RATIO), finding.start_step, finding.end_step, min_points=3
    )
    if not at_edge(level):
        return finding
    return replace(
        finding,
        severity=Severity.INFO,
        message="At the edge of stability: " + finding.message + f"; λ_max / threshold "
        f"{fmt(level)} there, so the steps oscillate",
        action="Nothing to fix while the loss falls: large per-step updates are the "
        "oscillation along the sharpest direction at the edge of stability.",
        evidence={**finding.evidence, "sharpness_ratio_median": level},
        keys=(*finding.keys, RATIO),
    )


def _small_by_design(run: Run, layers: list[str], share: float) -> set[str]:
    """The tensors whose median ``||w||`` is below ``share`` of the median over tensors."""
    medians = {}
    for layer in layers:
        _, weights = finite_series(run, f"{WEIGHTS}/{layer}")
        if weights.size:
            medians[layer] = float(np.median(weights))
    if not medians:
        return set()
    model = float(np.median(list(medians.values())))
    return {layer for layer, median in medians.items() if median < share * model}


def _blown_up(name: str, steps: np.ndarray, ratios: np.ndarray, blowup: float) -> list[_Layer]:
    over = np.flatnonzero(ratios >= blowup)
    if not over.size:
        return []
    peak = float(ratios[over].max())
    return [_Layer(name, peak, peak / blowup, int(steps[over[0]]), int(steps[over[-1]]))]


def _blowup_finding(layers: list[_Layer], top: int, thresholds: dict) -> Finding:
    layers = sorted(layers, key=lambda layer: -layer.level)
    shown = ", ".join(
        f"'{layer.name}' ({fmt(layer.level)} at step {layer.start_step})" for layer in layers[:top]
    )
    more = f" and {len(layers) - top} more" if len(layers) > top else ""
    return Finding(
        NAME,
        Severity.CRITICAL,
        min(layer.start_step for layer in layers),
        max(layer.end_step for layer in layers),
        f"Parameter blow-up: one optimizer step moved {_count(layers).replace('layer', 'tensor')} "
        f"by {fmt(thresholds['blowup'])}x its norm or more: {shown}{more} (healthy ~1e-3)",
        "Lower the learning rate (or warm it up), enable gradient clipping, and look for a "
        f"bad batch at step {min(layer.start_step for layer in layers)}.",
        {
            "tensors": len(layers),
            **thresholds,
            **{f"peak[{layer.name}]": layer.level for layer in layers[:top]},
        },
        tuple(f"{PREFIX}/{layer.name}" for layer in layers),
    )


def _too_large(
    name: str, steps: np.ndarray, ratios: np.ndarray, window: tuple[int, int], high: float
) -> list[_Layer]:
    """The windows whose median ratio exceeds ``high``, as one finding-to-be (or none).

    A window's median can exceed ``high`` only if at least half of its values do
    (``ceil(width / 2)``), so only those windows, counted with a cumulative sum, get their
    median computed: in a healthy run none, which makes this O(n) instead of O(n·width).
    """
    starts, ends = step_windows(steps, *window)  # [m], [m]
    above = np.concatenate([[0], np.cumsum(ratios > high)])  # [n + 1]
    candidates = np.flatnonzero(above[ends] - above[starts] >= -(-(ends - starts) // 2))
    if not candidates.size:
        return []
    medians = window_medians(ratios, starts[candidates], ends[candidates])  # [c]
    over = candidates[medians > high]
    if not over.size:
        return []
    peak = float(medians.max())  # a window left out has a median <= high < this
    return [
        _Layer(name, peak, peak / high, int(steps[starts[over[0]]]), int(steps[ends[over[-1]] - 1]))
    ]


def _too_small(name: str, steps: np.ndarray, ratios: np.ndarray, low: float) -> list[_Layer]:
    median = float(np.median(ratios))
    if median >= low:
        return []
    under = np.flatnonzero(ratios < low)
    deviation = low / median if median > 0 else float("inf")
    return [_Layer(name, median, deviation, int(steps[under[0]]), int(steps[under[-1]]))]


def _finding(layers: list[_Layer], severity: Severity, top: int, thresholds: dict) -> Finding:
    layers = sorted(layers, key=lambda layer: -layer.deviation)
    shown = ", ".join(f"'{layer.name}' ({fmt(layer.level)})" for layer in layers[:top])
    more = f" and {len(layers) - top} more" if len(layers) > top else ""
    if severity is Severity.INFO:
        message = (
            f"{_count(layers)} barely move: median update/weight ratio below "
            f"{fmt(thresholds['low'])} (healthy ~1e-3) in {shown}{more}"
        )
        action = (
            "Raise the learning rate for these layers, or check that they receive "
            "gradients (dead units, detached branches, a zero learning-rate group)."
        )
        level = "median"
    else:
        message = (
            f"{_count(layers)} update too fast: update/weight ratio median over "
            f"{thresholds['window_steps']} steps up to {shown}{more} (healthy ~1e-3, "
            f"warning above {fmt(thresholds['high'])})"
        )
        action = (
            "Lower the learning rate (or give these layers their own, smaller one) "
            "until ||dw|| / ||w|| is near 1e-3 per step."
        )
        if severity is Severity.CRITICAL:
            message = "Learning rate too high for these layers: " + message
        level = "peak_median"
    evidence = {
        "layers": len(layers),
        **thresholds,
        **{f"{level}[{layer.name}]": layer.level for layer in layers[:top]},
    }
    return Finding(
        NAME,
        severity,
        min(layer.start_step for layer in layers),
        max(layer.end_step for layer in layers),
        message,
        action,
        evidence,
        tuple(f"{PREFIX}/{layer.name}" for layer in layers),
    )


def _count(layers: list[_Layer]) -> str:
    return f"{len(layers)} layer{'s' if len(layers) > 1 else ''}"
