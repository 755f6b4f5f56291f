"""The local-complexity phases: linear regions crowd around the data, then migrate away."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_fraction, check_window
from ._series import finite_series, fmt, rolling_median
from .findings import Finding, Severity

NAME = "region_migration"
PREFIX = "regions"
SETS = ("train", "test", "random")
TOTAL = "total"


NEEDS = (f"{PREFIX}/*/{TOTAL}",)
"""Record keys it needs: a set's total local complexity."""


def detect_region_migration(
    run: Run, *, ascent: float = 0.2, descent: float = 0.2, window: int = 3, min_points: int = 6
) -> list[Finding]:
    """The double descent of local complexity (Humayun, Balestriero & Baraniuk 2024, "Deep
    networks always grok and here is why").

    Reads ``regions/<set>/total`` of :class:`~trainprobe.probes.LocalComplexity` (``set``:
    train, then test, then random: the first present), smoothed by a running median of
    ``window`` measurements. The paper's phases: an early descent, an ascent to a peak
    (regions crowd around the training points while the network fits them), then a
    second descent as regions migrate away from the data (the phase that comes with
    delayed generalisation and robustness). One ``INFO`` finding when, after the minimum
    that precedes the peak, the count rose by ``ascent`` (relative) to the peak and then
    fell ``descent`` below it; its evidence gives the steps of the minimum, the peak and
    the first measurement clearly below the peak. No finding while the count keeps
    rising (or has not fallen enough yet).

    Args:
        run: the run to read.
        ascent: relative rise from the minimum to the peak.
        descent: relative fall below the peak that counts as migration.
        window: running-median width (odd, at least 3).
        min_points: fewest measurements.

    Returns:
        At most one finding.

    Raises:
        ValueError: ``ascent`` or ``descent`` outside ``(0, 1)``, ``window`` or
            ``min_points`` below 3.
    """
    for name, value in (("ascent", ascent), ("descent", descent)):
        check_fraction(name, value)
        if value <= 0:
            raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
    check_window("window", window)
    check_window("min_points", min_points)
    key = next((k for k in (f"{PREFIX}/{s}/{TOTAL}" for s in SETS) if k in run), None)
    if key is None:
        return []
    steps, count = finite_series(run, key)
    if steps.size < max(min_points, window):
        return []
    half = window // 2
    smooth = rolling_median(count, window)  # [n - window + 1], centred on steps[half:]
    at = steps[half : half + smooth.size]
    peak = int(np.argmax(smooth))
    low = int(np.argmin(smooth[: peak + 1]))
    if smooth[low] <= 0 or smooth[peak] < (1 + ascent) * smooth[low]:
        return []
    below = np.flatnonzero(smooth[peak:] <= (1 - descent) * smooth[peak])
    if not below.size:
        return []
    fall = peak + int(below[0])
    evidence = {
        "minimum_step": int(at[low]),
        "minimum": float(smooth[low]),
        "peak_step": int(at[peak]),
        "peak": float(smooth[peak]),
        "descent_step": int(at[fall]),
        "after_descent": float(smooth[fall]),
        "final": float(smooth[-1]),
        "ascent": ascent,
        "descent": descent,
    }
    early = float(smooth[0]) > float(smooth[low])
    phases = "an early descent, " if early else ""
    return [
        Finding(
            NAME,
            Severity.INFO,
            int(at[low]),
            int(at[fall]),
            f"Linear regions migrating away from the data ({key}): {phases}an ascent from "
            f"{fmt(smooth[low])} at step {int(at[low])} to a peak of {fmt(smooth[peak])} at step "
            f"{int(at[peak])}, then a descent to {fmt(smooth[fall])} by step {int(at[fall])}",
            "The second descent of local complexity usually comes with delayed generalisation "
            "and robustness: check held-out accuracy and adversarial robustness from here on.",
            evidence,
            (key,),
        )
    ]
