"""Dead ReLUs: layers whose outputs have gone (almost) all exactly zero."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_below, check_fraction, check_window
from ._series import finite_series, fmt, rolling_median
from .findings import Finding, Severity

NAME = "dead_units"
PREFIX = "activations/zero_frac"

NEEDS = (f"{PREFIX}/*",)
"""Record keys it reads: the zero fraction of each ReLU-family module's outputs."""


def detect_dead_units(
    run: Run,
    *,
    window: int = 5,
    dead: float = 0.95,
    all_dead: float = 0.999,
    top: int = 5,
) -> list[Finding]:
    """ReLU-family layers whose outputs stay exactly zero for almost every input.

    A ReLU unit whose pre-activation is negative on every input outputs 0 and gets no
    gradient: it is dead and stays dead (Lu et al. 2019, "Dying ReLU and
    Initialization"); a large learning rate or a large negative bias kills many at
    once. ``activations/zero_frac/<module>`` is the share of exactly-zero outputs; a
    healthy ReLU layer sits around 0.5, sparser late in training, rarely above 0.9. A
    module is reported when the ``window``-point rolling median of its zero fraction
    is ``>= dead`` from some measurement through the end of the run (it did not come
    back): ``WARNING``, ``CRITICAL`` when ``>= all_dead`` at the end (the layer passes
    no signal, so nothing before it learns). One finding lists the modules, the most
    dead first.

    Args:
        run: the run to read.
        window: measurements per rolling median (default 5).
        dead: zero fraction from which most of a layer is dead (default 0.95).
        all_dead: zero fraction of a layer that passes no signal (default 0.999).
        top: modules named in the message and the evidence.

    Returns:
        At most one finding.

    Raises:
        ValueError: ``window < 3``, thresholds outside ``[0, 1)`` or not ordered
            ``dead < all_dead``, or ``top < 1``.
    """
    check_window("window", window)
    check_fraction("dead", dead)
    check_fraction("all_dead", all_dead)
    check_below("dead", dead, "all_dead", all_dead)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1 (modules named), got {top!r}")
    layers = []
    for module in run.layers(PREFIX):
        steps, zeros = finite_series(run, f"{PREFIX}/{module}")
        if zeros.size < window:
            continue
        level = rolling_median(zeros, window)  # [n - window + 1], at each window's end
        below = np.flatnonzero(level < dead)
        first = 0 if below.size == 0 else int(below[-1]) + 1
        if first >= level.size:
            continue
        layers.append((module, float(level[-1]), int(steps[first + window - 1]), int(steps[-1])))
    if not layers:
        return []
    layers.sort(key=lambda layer: -layer[1])
    shown = layers[:top]
    worst = shown[0][1]
    named = ", ".join(f"{m} ({fmt(100 * z)}% zero)" for m, z, _, _ in shown)
    more = f" and {len(layers) - top} more" if len(layers) > top else ""
    start, end = min(s for _, _, s, _ in layers), max(e for _, _, _, e in layers)
    evidence: dict[str, float | int | str] = {
        "modules": len(layers),
        "dead": dead,
        "all_dead": all_dead,
        "window": window,
    }
    for module, zero, since, _ in shown:
        evidence[f"zero_frac[{module}]"] = zero
        evidence[f"dead_since[{module}]"] = since
    return [
        Finding(
            NAME,
            Severity.CRITICAL if worst >= all_dead else Severity.WARNING,
            start,
            end,
            f"Dead ReLUs: {named}{more} output exactly zero for almost every input, through "
            "the end of the run; those units get no gradient and do not come back",
            "Lower the learning rate (or lengthen warmup), check for large negative biases or "
            "inputs far from zero mean, or use LeakyReLU/GELU in those layers.",
            evidence,
            tuple(f"{PREFIX}/{m}" for m, _, _, _ in shown),
        )
    ]
