"""Numeric kernels over stored series shared by the detectors (numpy only)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..store import Run

MAD_SCALE = 1.4826
"""Makes the median absolute deviation a consistent estimate of a Gaussian's sigma."""

_CHUNK = 4096


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
            block = windows[lo:lo + _CHUNK]  # [b, window]
            centre = np.median(block, axis=1)  # [b]
            med[window + lo:window + lo + block.shape[0]] = centre
            mad[window + lo:window + lo + block.shape[0]] = np.median(
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


def param_order(run: Run) -> list[str]:
    """Trainable parameter names in model order.

    ``run.meta["model"]["params"]`` when the run recorded it, else the recording
    order of the ``norms/grad/<param>`` keys.
    """
    model = run.meta.get("model")
    params = model.get("params") if isinstance(model, dict) else None
    if isinstance(params, list) and all(isinstance(p, str) for p in params):
        return list(params)
    return run.layers("norms/grad")


def fmt(value: float) -> str:
    """A number for a message: 4 significant digits, scientific when far from 1."""
    return f"{value:.4g}"
