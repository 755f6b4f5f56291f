"""Update-to-weight ratios far outside the healthy band around 1e-3."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from ..store import Run
from ._checks import check_below, check_positive, check_window
from ._series import finite_series, fmt, rolling_median
from .findings import Finding, Severity

NAME = "update_ratio"
PREFIX = "updates/ratio"
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


def detect_update_ratio(
    run: Run,
    *,
    window: int = 20,
    high: float = 1e-1,
    critical: float = 1.0,
    low: float = 1e-6,
    skip: tuple[str, ...] = ("*bias",),
    top: int = 5,
) -> list[Finding]:
    """Layers whose relative update ``||w_after - w_before|| / ||w_before||`` is far off 1e-3.

    *Too large*: the median of ``updates/ratio/<param>`` over some ``window``
    consecutive measurements exceeds ``high`` (``WARNING``) or ``critical``
    (``CRITICAL``: each step rewrites the layer). *Too small*: the median over
    all its measurements is below ``low`` (``INFO``: the layer barely moves, so
    its learning rate is too low or it is dead). Non-finite ratios (a zero
    ``||w_before||``) are dropped. One finding per direction lists the layers,
    most out of band first.

    Args:
        run: the run to read.
        window: measurements per median (default 20; shorter series use all).
        high: warning level (default 1e-1, 100x the healthy 1e-3).
        critical: critical level (default 1: the update is as large as the weights).
        low: barely-moving level (default 1e-6, 1000x below healthy).
        skip: fnmatch patterns of parameter names to ignore (default biases: they
            start at zero, so their ratio is huge by construction).
        top: layers named in the message and the evidence.

    Returns:
        Up to two findings: too large, too small.

    Raises:
        ValueError: ``window < 3``, ``top < 1``, a non-positive level, or levels
            not ordered ``low < high < critical``.
        TypeError: ``skip`` is a bare string instead of a tuple of patterns.
    """
    if isinstance(skip, str):
        raise TypeError(f"skip must be a tuple of fnmatch patterns such as ('*bias',), got "
                        f"the string {skip!r}")
    check_window("window", window)
    check_window("top", top, minimum=1)
    for name, value in (("high", high), ("critical", critical), ("low", low)):
        check_positive(name, value)
    check_below("low", low, "high", high)
    check_below("high", high, "critical", critical)
    large: list[_Layer] = []
    small: list[_Layer] = []
    for layer in run.layers(PREFIX):
        if any(fnmatchcase(layer, pattern) for pattern in skip):
            continue
        steps, ratios = finite_series(run, f"{PREFIX}/{layer}")
        if ratios.shape[0] < 3:
            continue
        large += _too_large(layer, steps, ratios, min(window, ratios.shape[0]), high)
        small += _too_small(layer, steps, ratios, low)
    thresholds = {"window": window, "high": high, "critical": critical, "low": low,
                  "healthy": HEALTHY}
    findings = []
    if large:
        worst = max(layer.level for layer in large)
        findings.append(_finding(large, Severity.CRITICAL if worst > critical
                                 else Severity.WARNING, top, thresholds))
    if small:
        findings.append(_finding(small, Severity.INFO, top, thresholds))
    return findings


def _too_large(name: str, steps: np.ndarray, ratios: np.ndarray, width: int,
               high: float) -> list[_Layer]:
    medians = rolling_median(ratios, width)  # [n - width + 1]
    over = np.flatnonzero(medians > high)
    if not over.size:
        return []
    peak = float(medians.max())
    return [_Layer(name, peak, peak / high, int(steps[over[0]]),
                   int(steps[over[-1] + width - 1]))]


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
        message = (f"{_count(layers)} barely move: median update/weight ratio below "
                   f"{fmt(thresholds['low'])} (healthy ~1e-3) in {shown}{more}")
        action = ("Raise the learning rate for these layers, or check that they receive "
                  "gradients (dead units, detached branches, a zero learning-rate group).")
        level = "median"
    else:
        message = (f"{_count(layers)} update too fast: update/weight ratio median over "
                   f"{thresholds['window']} measurements up to {shown}{more} (healthy ~1e-3, "
                   f"warning above {fmt(thresholds['high'])})")
        action = ("Lower the learning rate (or give these layers their own, smaller one) "
                  "until ||dw|| / ||w|| is near 1e-3 per step.")
        if severity is Severity.CRITICAL:
            message = "Learning rate too high for these layers: " + message
        level = "peak_median"
    evidence = {"layers": len(layers), **thresholds,
                **{f"{level}[{layer.name}]": layer.level for layer in layers[:top]}}
    return Finding(NAME, severity, min(layer.start_step for layer in layers),
                   max(layer.end_step for layer in layers), message, action, evidence,
                   tuple(f"{PREFIX}/{layer.name}" for layer in layers))


def _count(layers: list[_Layer]) -> str:
    return f"{len(layers)} layer{'s' if len(layers) > 1 else ''}"
