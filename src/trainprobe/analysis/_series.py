"""Numeric kernels over stored series shared by the detectors (numpy only)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..store import Run

MAD_SCALE = 1.4826
"""Makes the median absolute deviation a consistent estimate of a Gaussian's sigma."""

_CHUNK = 4096

SCALARS = "scalars/"
"""Prefix of the scalars a user logs (``s.log(name=...)``)."""
LOSS_KEY = "scalars/loss"
"""The loss key read first (and the one the vanishing-gradient collapse test reads)."""
LOSS_PATTERN = "scalars/*loss*"
"""The glob the loss detectors declare in ``NEEDS``; :func:`is_loss_key` narrows it."""
GRAD_NORMS = "norms/grad"
"""Prefix of the per-tensor gradient norms, ``norms/grad/<param>``."""


def finite_series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``[n]`` and values ``[n]`` of scalar ``key`` with NaN/Inf points dropped.

    A key the run lacks, or an array-valued key, gives two empty arrays (the
    detectors read scalars and return nothing for a missing series).
    """
    if key not in run:
        return np.empty(0, dtype=np.int64), np.empty(0)
    series = run.series(key)
    values = np.asarray(series.values, dtype=np.float64)
    if values.ndim != 1:
        return np.empty(0, dtype=np.int64), np.empty(0)
    keep = np.isfinite(values)
    return series.steps[keep], values[keep]


def trailing_median_mad(
    x: np.ndarray, window: int, *, min_periods: int
) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD of the points *before* each point, with no look-ahead.

    For point ``i`` the reference is ``x[max(0, i - window):i]`` (``x[i]`` excluded):
    ``med_i = median(ref)``, ``mad_i = median(|ref - med_i|)``.

    Args:
        x: ``[n]`` finite values.
        window: the most points a reference holds.
        min_periods: fewer points than this give NaN.

    Returns:
        ``med [n]`` and ``mad [n]``, NaN where the reference is too short.
    """
    n = x.shape[0]
    med = np.full(n, np.nan)
    mad = np.full(n, np.nan)
    for i in range(min(min_periods, n), min(window, n)):
        ref = x[:i]
        med[i] = np.median(ref)
        mad[i] = np.median(np.abs(ref - med[i]))
    if n > window:
        windows = sliding_window_view(x[:-1], window)  # [n - window, window]
        for lo in range(0, windows.shape[0], _CHUNK):
            block = windows[lo : lo + _CHUNK]  # [b, window]
            centre = np.median(block, axis=1)  # [b]
            med[window + lo : window + lo + block.shape[0]] = centre
            mad[window + lo : window + lo + block.shape[0]] = np.median(
                np.abs(block - centre[:, None]), axis=1
            )
    return med, mad


def rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Median of each full window ``x[j:j + window]``, ``j = 0 .. n - window``.

    Returns:
        ``[n - window + 1]`` medians, empty when ``n < window``.
    """
    if x.shape[0] < window:
        return np.empty(0)
    return np.median(sliding_window_view(x, window), axis=1)


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Index spans ``(first, last)`` (inclusive) of consecutive ``True`` entries of ``mask``."""
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))  # starts at even, stops at odd positions
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def window_cover(flagged: np.ndarray, window: int, n: int) -> np.ndarray:
    """``[n]`` bool: points inside any window ``[j, j + window)`` with ``flagged[j]``."""
    delta = np.zeros(n + 1, dtype=np.int64)
    starts = np.flatnonzero(flagged)
    np.add.at(delta, starts, 1)
    np.add.at(delta, np.minimum(starts + window, n), -1)
    return np.cumsum(delta[:n]) > 0


def is_loss_key(key: str) -> bool:
    """Whether ``key`` is a loss the loss detectors read.

    The rule: a ``scalars/`` key whose name contains ``loss`` but not ``scale``
    (case-insensitive). ``scalars/loss_scale`` and ``scalars/scaled_loss`` carry a
    mixed-precision loss scale (``torch.cuda.amp.GradScaler``, DeepSpeed), which
    doubles every few hundred steps and halves on overflow by design: scored as a
    loss it would be a string of false spikes and divergences.
    """
    name = key.lower()
    return fnmatchcase(name, LOSS_PATTERN) and "scale" not in name[len(SCALARS) :]


def loss_keys(run: Run) -> list[str]:
    """``scalars/loss`` first, then the other loss keys (:func:`is_loss_key`) in recording order."""
    keys = [k for k in run.keys(SCALARS) if is_loss_key(k)]
    return sorted(keys, key=lambda k: k != LOSS_KEY)


def step_windows(steps: np.ndarray, span: int, min_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``span`` steps over a measured series: ``[start, end)`` index pairs.

    Window ``j`` starts at point ``j`` and holds the points with steps in
    ``[steps[j], steps[j] + span)``, widened to at least ``min_points`` points so a
    sparse schedule still gives a median worth the name. Windows run until the
    first one that reaches the last point (later ones would be parts of it); a
    series shorter than ``min_points`` gives one window over all of it.

    Args:
        steps: ``[n]`` increasing steps.
        span: window length in steps.
        min_points: fewest points in a window.

    Returns:
        ``starts [m]`` and ``ends [m]`` (exclusive); empty when ``n == 0``.
    """
    n = steps.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if n < min_points:
        return np.zeros(1, dtype=np.int64), np.full(1, n, dtype=np.int64)
    ends = np.maximum(
        np.searchsorted(steps, steps + span, side="left"), np.arange(n) + min_points
    )  # [n]
    last = int(np.flatnonzero(ends >= n)[0])  # the first window that reaches the end
    ends = np.minimum(ends[: last + 1], n)
    return np.arange(last + 1, dtype=np.int64), ends.astype(np.int64)


def window_medians(x: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``[m]`` medians of ``x[starts[k]:ends[k]]``, vectorised per window width."""
    medians = np.empty(starts.shape[0])
    widths = ends - starts
    for width in np.unique(widths):
        rows = np.flatnonzero(widths == width)
        view = sliding_window_view(x, int(width))  # [n - width + 1, width]
        for lo in range(0, rows.shape[0], _CHUNK):
            chunk = rows[lo : lo + _CHUNK]
            medians[chunk] = np.median(view[starts[chunk]], axis=1)
    return medians


def param_order(run: Run) -> list[str]:
    """Trainable parameter names in model order.

    ``run.meta["model"]["params"]`` when the run recorded it, else the recording
    order of the ``norms/grad/<param>`` keys.
    """
    return run.param_names() or run.layers(GRAD_NORMS)


def fmt(value: float) -> str:
    """A number for a message: 4 significant digits, scientific when far from 1."""
    return f"{value:.4g}"


def held_level(values: np.ndarray, window: int) -> np.ndarray:
    """``[n]``: the highest trailing median of ``|values|`` (over up to ``window`` points
    before each point, from the first point on) held so far: a loss's starting level, as a
    rule. The scale against which a rise must matter: a loss of 1e-3 near the end of
    training that doubles is a fit model's noise, not a spike."""
    med, _ = trailing_median_mad(np.abs(values), window, min_periods=1)
    return np.maximum.accumulate(np.nan_to_num(med))


def trailing_z(
    y: np.ndarray, window: int, *, min_periods: int, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Trailing median and robust z-score of each point against the points before it.

    ``z_i = (y_i - med_i) / max(1.4826 * MAD_i, floor)`` over the (up to) ``window``
    points before ``i`` (:func:`trailing_median_mad`, no look-ahead): Hampel's robust
    z-score (Rousseeuw & Croux 1993). The loss-spike test scores the loss with it, and the
    global gradient norm before a loss spike the same way.

    Args:
        y: ``[n]`` finite values (``log x`` for a positive series).
        window: the most points a reference holds.
        min_periods: fewer points before ``i`` than this leave ``z_i = -inf``.
        floor: the smallest spread: a reference varying less than this is flat.

    Returns:
        ``med [n]`` (NaN where the reference is too short) and ``z [n]`` (``-inf`` there).
    """
    med, mad = trailing_median_mad(y, window, min_periods=min_periods)
    with np.errstate(invalid="ignore"):
        z = (y - med) / np.maximum(MAD_SCALE * mad, floor)
    return med, np.nan_to_num(z, nan=-np.inf)
