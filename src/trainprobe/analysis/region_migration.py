"""The local-complexity phases: linear regions crowd around the data, then migrate away."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_fraction, check_positive, check_window
from ._series import MAD_SCALE, finite_series, fmt, rolling_median
from .findings import Finding, Severity

NAME = "region_migration"
PREFIX = "regions"
SETS = ("train", "test", "random")
TOTAL = "total"


NEEDS = (f"{PREFIX}/*/{TOTAL}",)
"""Record keys it needs: a set's total local complexity."""


def detect_region_migration(
    run: Run,
    *,
    ascent: float = 0.2,
    descent: float = 0.1,
    noise_multiple: float = 4.0,
    window: int = 3,
    min_points: int = 6,
) -> list[Finding]:
    """The double descent of local complexity (Humayun, Balestriero & Baraniuk 2024, "Deep
    networks always grok and here is why").

    Reads ``regions/<set>/total`` of :class:`~trainprobe.probes.LocalComplexity` (``set``:
    train, then test, then random: the first present), smoothed by a running median of
    ``window`` measurements. The paper's phases: an early descent, an ascent to a peak
    (regions crowd around the training points while the network fits them), then a
    second descent as regions migrate away from the data (the phase that comes with
    delayed generalisation and robustness). One ``INFO`` finding when the smoothed count
    has a peak that it never exceeds again, which it reached rising by ``a`` (relative)
    from the lowest value before it, and below which it then fell by ``d``:

    ``a = max(ascent, noise_multiple · σ)``, ``d = max(descent, noise_multiple · σ)``,

    with ``σ`` the count's relative measurement noise (:func:`relative_noise`). Its
    evidence gives the steps of the minimum, the peak and the first measurement ``d``
    below the peak. No finding while the count keeps rising, has not fallen enough yet,
    or when it rises again above the peak (a dip while the network is still fitting).

    Calibration (``benchmarks/corpus/regions_cases.py`` has the corpus cases): 16 small
    ReLU MLPs (2-D moons and rings, 10-D blobs, 64-D digits; AdamW, weight decay 0.1-1,
    256 training points), each cut at 300, 1000, 2000 and 3000 steps and read on two
    schedules, 128 series; the truth from four frames over all 256 points: 87 series
    end at most 6% below the count's peak after the fit (no migration), 19 at least 15%
    below (migration). The count of one frame over the same 256 points falls, smoothed
    and from its peak, by at most 0.07 without migration and by at least 0.14 with it:
    ``descent = 0.1`` keeps 3-4 points each side and finds the reported 17% descent
    (the former 0.2 found 75% of the migrating series). ``σ`` is 0.003-0.03 on a fixed
    set of points (the trend's curvature, mostly), 0.025-0.055 on 128 fresh points a
    step and 0.06-0.14 on 32; without migration such noisy counts fall by up to 4.4 σ
    (32 points) and 4.9 σ (128) by chance, hence ``noise_multiple = 4``: false findings
    0%, 0.6% and 0.3% (256 fixed, 128 and 32 fresh points), findings on migrating series
    100%, 91% and 43% (on the noisiest counts only large descents show). On Gaussian
    noise alone over 100 measurements: 0.4% false findings at 4, 11% at 3. A fixed
    subset biases the trend: 128 of the 256 points fall up to 0.18 without migration
    (1.9% false findings), 64 up to 0.31 (7.9%); measure all the training points, up to
    a few hundred. ``window = 3``: 5 and 7 miss 5% and 24% of the migrating series (a
    full window's median lags a descent at the end of the run). ``ascent = 0.2``: the
    migrating runs rose 0.44-1.37 to their peak.

    Args:
        run: the run to read.
        ascent: least relative rise from the minimum to the peak.
        descent: least relative fall below the peak that counts as migration.
        noise_multiple: both the rise and the fall must also exceed this many times the
            relative noise ``σ``.
        window: running-median width (odd, at least 3).
        min_points: fewest measurements.

    Returns:
        At most one finding.

    Raises:
        ValueError: ``ascent`` or ``descent`` outside ``(0, 1)``, ``noise_multiple`` not
            a finite number > 0, ``window`` even or below 3, ``min_points`` below 3.
        TypeError: ``window`` or ``min_points`` not an int.
    """
    _check_options(ascent, descent, noise_multiple, window, min_points)
    key = next((k for k in (f"{PREFIX}/{s}/{TOTAL}" for s in SETS) if k in run), None)
    if key is None:
        return []
    steps, count = finite_series(run, key)
    if steps.size < max(min_points, window) or not np.any(count > 0):
        return []
    half = window // 2
    smooth = rolling_median(count, window)  # [n - window + 1], centred on steps[half:]
    at = steps[half : half + smooth.size]
    noise = relative_noise(count)
    rise = max(ascent, noise_multiple * noise)
    fall = max(descent, noise_multiple * noise)
    phases = migration_phases(smooth, rise=rise, fall=fall)
    if phases is None:
        return []
    low, peak, below = phases
    evidence = {
        "minimum_step": int(at[low]),
        "minimum": float(smooth[low]),
        "peak_step": int(at[peak]),
        "peak": float(smooth[peak]),
        "descent_step": int(at[below]),
        "after_descent": float(smooth[below]),
        "final": float(smooth[-1]),
        "relative_descent": float(1 - smooth[peak:].min() / smooth[peak]),
        "noise": noise,
        "ascent": rise,
        "descent": fall,
    }
    early = float(smooth[0]) > float(smooth[low])
    phases_text = "an early descent, " if early else ""
    return [
        Finding(
            NAME,
            Severity.INFO,
            int(at[low]),
            int(at[below]),
            f"Linear regions migrating away from the data ({key}): {phases_text}an ascent from "
            f"{fmt(smooth[low])} at step {int(at[low])} to a peak of {fmt(smooth[peak])} at step "
            f"{int(at[peak])}, then a descent to {fmt(smooth[below])} by step {int(at[below])}",
            "The second descent of local complexity usually comes with delayed generalisation "
            "and robustness: check held-out accuracy and adversarial robustness from here on.",
            evidence,
            (key,),
        )
    ]


def relative_noise(count: np.ndarray) -> float:
    """The relative measurement noise ``σ`` of a count series, robust to its trend.

    ``σ = 1.4826 · median_i |(x_{i−1} − 2 x_i + x_{i+1}) / x_i| / √6`` over the points
    with ``x_i > 0``: the second difference removes a locally linear trend, and for
    independent noise of relative spread ``σ`` its variance is ``6 σ²``; the median
    absolute deviation (scaled to a Gaussian's ``σ``) ignores the few points where the
    trend bends. A count on a fixed set of points moves smoothly (``σ`` of a few
    thousandths); one on each step's mini-batch carries the sampling noise of its
    points (``σ ≈ 0.6 / √points`` on the corpus' MLPs).

    Args:
        count: ``[n]`` finite counts.

    Returns:
        ``σ`` (0 with fewer than 3 points or no positive count in the middle).

    Examples:
        >>> relative_noise(np.array([10.0, 11.0, 12.0, 13.0]))
        0.0
        >>> round(relative_noise(np.array([10.0, 11.0, 10.0, 11.0, 10.0])), 3)
        0.11
    """
    if count.shape[0] < 3:
        return 0.0
    middle = count[1:-1]  # [n - 2]
    second = count[:-2] - 2 * middle + count[2:]  # [n - 2]
    keep = middle > 0
    if not keep.any():
        return 0.0
    return float(MAD_SCALE * np.median(np.abs(second[keep] / middle[keep])) / np.sqrt(6.0))


def migration_phases(
    smooth: np.ndarray, *, rise: float, fall: float
) -> tuple[int, int, int] | None:
    """The minimum, the peak and the first point ``fall`` below the peak, as indices.

    The peak is the highest point ``p`` that the series never exceeds afterwards
    (``s_p >= max(s[p:])``), that rose from the lowest value before it,
    ``s_low = min(s[:p+1]) > 0``, by ``s_p >= (1 + rise) s_low``, and that the series
    later falls below, ``min(s[p:]) <= (1 − fall) s_p``.

    Args:
        smooth: ``[m]`` smoothed counts.
        rise: least relative rise.
        fall: least relative fall.

    Returns:
        ``(low, peak, below)``, or None when no point qualifies.

    Examples:
        >>> migration_phases(np.array([5.0, 4.0, 6.0, 8.0, 7.0, 6.0]), rise=0.2, fall=0.2)
        (1, 3, 5)
        >>> migration_phases(np.array([5.0, 4.0, 6.0, 8.0, 7.0, 9.0]), rise=0.2, fall=0.1) is None
        True
    """
    floor_before = np.minimum.accumulate(smooth)  # [m]
    floor_after = np.minimum.accumulate(smooth[::-1])[::-1]  # [m]
    top_after = np.maximum.accumulate(smooth[::-1])[::-1]  # [m]
    peaks = np.flatnonzero(
        (smooth >= top_after)
        & (floor_before > 0)
        & (smooth >= (1 + rise) * floor_before)
        & (floor_after <= (1 - fall) * smooth)
    )
    if not peaks.size:
        return None
    peak = int(peaks[0])  # the suffix maxima fall with the index: the first is the highest
    low = int(np.argmin(smooth[: peak + 1]))
    below = peak + int(np.flatnonzero(smooth[peak:] <= (1 - fall) * smooth[peak])[0])
    return low, peak, below


def _check_options(
    ascent: float, descent: float, noise_multiple: float, window: int, min_points: int
) -> None:
    for name, value in (("ascent", ascent), ("descent", descent)):
        check_fraction(name, value)
        if value <= 0:
            raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
    check_positive("noise_multiple", noise_multiple)
    check_window("window", window)
    if window % 2 == 0:
        raise ValueError(
            f"window must be odd (a running median centred on a measurement), got {window}; "
            f"pass window={window + 1}"
        )
    check_window("min_points", min_points)
