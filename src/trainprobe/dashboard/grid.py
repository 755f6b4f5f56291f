"""Layer x step grids for the heatmaps: ordering, alignment, display binning, log ticks.

Everything here is numpy over values already read from a :class:`~trainprobe.store.Run`;
nothing is written back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainprobe.store import Run, Series

MAX_COLUMNS = 1200
"""Heatmaps with more steps than this are bin-averaged for display (about the plot's width
in pixels on a large screen: more columns than pixels are not seen, only paid for)."""
MAX_CELLS = 160_000
"""Cells per heatmap: with many rows, fewer columns (never fewer than :data:`MIN_COLUMNS`).
Each redraw of the page (zoom, pan) repaints every cell of every heatmap."""
MIN_COLUMNS = 400


def column_budget(rows: int) -> int:
    """Most columns for a heatmap of ``rows`` rows: ``MAX_CELLS // rows`` within
    ``[MIN_COLUMNS, MAX_COLUMNS]``."""
    return min(MAX_COLUMNS, max(MIN_COLUMNS, MAX_CELLS // max(rows, 1)))


def ordered_layers(run: Run, prefix: str) -> list[str]:
    """Layer names under ``prefix``: in the model's parameter order where the run knows it.

    :meth:`Run.param_names` (when not empty) orders the names it lists; the
    others follow in recording order, as do all of them when it is empty.
    """
    names = run.layers(prefix)
    rank = {name: i for i, name in enumerate(run.param_names())}
    if not rank:
        return names
    recorded = {name: i for i, name in enumerate(names)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), recorded[name]))


def layer_matrix(series: Sequence[Series]) -> tuple[np.ndarray, np.ndarray]:
    """Align per-layer series on the union of their steps.

    Returns:
        ``(steps [T] int64, values [L, T] float64)``, NaN where a layer has no
        value at a step.
    """
    steps = np.unique(np.concatenate([s.steps for s in series]))  # [T]
    values = np.full((len(series), steps.size), np.nan)  # [L, T]
    for row, s in enumerate(series):
        values[row, np.searchsorted(steps, s.steps)] = s.values
    return steps, values


def bin_columns(
    steps: np.ndarray, values: np.ndarray, *, max_columns: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Average groups of ``w`` neighbouring columns so that at most ``max_columns`` remain
    (default: :func:`column_budget` of the number of rows).

    ``w = ceil(T / max_columns)``; a bin's value is the mean of its finite
    values (NaN if none), its step the mean of its steps. For display only.

    Args:
        steps: ``[T]`` steps.
        values: ``[L, T]`` values.
        max_columns: the most columns to keep (default: :func:`column_budget`).

    Returns:
        ``(steps [T'] float64, values [L, T'] float64, w)`` with ``T' <= max_columns``.
    """
    n = steps.size
    if max_columns is None:
        max_columns = column_budget(values.shape[0])
    width = max(1, math.ceil(n / max_columns))
    if width == 1:
        return steps.astype(np.float64), values, 1
    pad = (-n) % width
    padded = np.pad(values, ((0, 0), (0, pad)), constant_values=np.nan)
    blocks = padded.reshape(values.shape[0], -1, width)  # [L, T', w]
    finite = np.isfinite(blocks)
    counts = finite.sum(axis=2)
    sums = np.where(finite, blocks, 0.0).sum(axis=2)
    means = np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
    step_blocks = np.pad(steps.astype(np.float64), (0, pad), constant_values=np.nan)
    centres = np.nanmean(step_blocks.reshape(-1, width), axis=1)  # [T']
    return centres, means, width


def safe_log10(values: np.ndarray) -> np.ndarray:
    """``log10`` of the positive finite entries; NaN elsewhere (no warnings)."""
    out = np.full(values.shape, np.nan)
    good = np.isfinite(values) & (values > 0)
    np.log10(values, out=out, where=good)
    return out


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Colourbar ticks for log10 data in ``[lo, hi]``, labelled with the real values.

    Whole decades (``1e-3``) when the range spans two or more; otherwise
    1-2-5 steps within the decades (``2e-3``), or just the ends.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [], []
    decades = list(range(math.ceil(lo), math.floor(hi) + 1))
    if len(decades) >= 2:
        stride = max(1, math.ceil(len(decades) / 8))
        vals = [float(d) for d in decades[::stride]]
    else:
        cands = [
            d + math.log10(m) for d in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
        ]
        vals = [v for v in cands if lo - 1e-9 <= v <= hi + 1e-9]
        if len(vals) < 2:
            vals = [lo, hi] if hi > lo else [lo]
    return vals, [real_label(v) for v in vals]


AXIS_TICKS = 3
"""The fewest labelled ticks a log y-axis is given (:func:`axis_log_ticks`)."""


def axis_log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]] | None:
    """Labelled ticks for a log y-axis over positive data in ``[lo, hi]``, or ``None``
    where plotly's own ticks label it well.

    Plotly labels a log axis at powers of ten only (its ``D`` modes add bare leading
    digits, a small "5" for 0.5, that do not read as values), so a row whose data hold
    fewer than :data:`AXIS_TICKS` powers of ten shows one label or none (a loss going from
    0.9 to 0.3). Such a row keeps its log scale, so that a curve's shape reads the same on
    every row (equal ratios, equal heights), and gets ticks chosen here, all inside
    ``[lo, hi]``, so each is on screen whatever margin autorange adds:

    1. ``None`` when :data:`AXIS_TICKS` or more powers of ten lie in ``[lo, hi]``:
       plotly's decade labels, which also follow the user's zoom;
    2. else the 1-2-5 sequence (``0.05, 0.1, 0.2, 0.5``) when it gives that many;
    3. else round numbers evenly spaced, the step a 1-2-5 multiple of a power of ten,
       three to eight of them (``0.4, 0.6, 0.8`` for 0.3 to 0.9; ``1.62 ... 1.68`` for a
       range of a few percent).

    A constant (``lo == hi``) gets the decade either side of it, the range plotly's
    autorange gives it. The labels are the tick values, short (:func:`number_label`).

    Raises:
        ValueError: ``lo`` or ``hi`` is not finite and positive, or ``lo > hi``.
    """
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"log axis ticks need finite 0 < lo <= hi, got lo={lo}, hi={hi}")
    if hi - lo <= hi * 1e-9:  # a constant, to float precision
        lo, hi = lo / 10, hi * 10
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    inside = [v for v in (float(f"1e{d}") for d in decades) if _within(v, lo, hi)]
    if len(inside) >= AXIS_TICKS:
        return None
    vals = [v for d in decades for m in (1, 2, 5) if _within(v := float(f"{m}e{d}"), lo, hi)]
    if len(vals) < AXIS_TICKS:
        vals = _even_ticks(lo, hi)
    return vals, [number_label(v) for v in vals]


def _within(value: float, lo: float, hi: float) -> bool:
    return lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9)


def _even_ticks(lo: float, hi: float) -> list[float]:
    """Multiples of the largest 1-2-5 step at most a third of ``hi - lo``, in ``[lo, hi]``:
    at least three (a third of the range fits three times), at most eight."""
    most = (hi - lo) / AXIS_TICKS * (1 + 1e-9)  # the largest step (float noise allowed)
    exponent = math.floor(math.log10(most))
    digit = next(m for m in (5, 2, 1) if m * 10.0**exponent <= most)
    first = math.ceil(lo / (digit * 10.0**exponent) * (1 - 1e-9))
    vals = (float(f"{k * digit}e{exponent}") for k in range(first, first + 10))
    return [v for v in vals if _within(v, lo, hi)]


def number_label(value: float) -> str:
    """A tick value in few characters, exactly: ``0.4``, ``1500``, ``2.5e-5`` (positional
    from 0.01 to 9999, as :func:`real_label`; scientific outside)."""
    if value != 0 and not 1e-2 <= abs(value) < 1e4:
        return np.format_float_scientific(value, trim="-", exp_digits=1).replace("e+", "e")
    return np.format_float_positional(value, trim="-")


def real_label(log_value: float) -> str:
    """The real value of a log10 number, short: ``-3 -> "1e-3"``, ``-1 -> "0.1"``."""
    value = float(f"{10.0**log_value:.1e}")
    mantissa, exponent = f"{value:.1e}".split("e")
    if -2 <= int(exponent) <= 3:
        return f"{value:g}"
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def short_names(names: Sequence[str], limit: int = 36) -> tuple[str, list[str]]:
    """Tick labels for dotted layer names, each at most ``limit`` characters.

    Names that fit are kept whole. Otherwise, in turn, until each fits:

    1. the leading components that every name shares are dropped (and returned);
    2. the longest inner non-numeric component is cut to 4 characters
       (``3.block.sublayer_2.linear_projection.weight`` -> ``3.block.sublayer_2.line.weight``);
    3. inner non-numeric components are dropped from the left, behind a ``…``;
    4. the label's tail is kept behind a ``…``.

    Returns:
        ``(common_prefix, labels)``; ``common_prefix`` is ``""`` or ends with ``"."``.
    """
    if all(len(name) <= limit for name in names):
        return "", list(names)
    split = [name.split(".") for name in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
        common += 1
    prefix = ".".join(split[0][:common]) + "." if common else ""
    return prefix, [_shorten(parts[common:], limit) for parts in split]


def _shorten(parts: list[str], limit: int) -> str:
    parts, cut = list(parts), False
    while len(".".join(parts)) + cut > limit:
        inner = [i for i in range(len(parts) - 1) if not parts[i].isdigit()]
        long = [i for i in inner if len(parts[i]) > 4]
        if long:
            longest = max(long, key=lambda i: len(parts[i]))
            parts[longest] = parts[longest][:4]
        elif inner:
            del parts[inner[0]]
            cut = True
        else:
            break
    label = ("…" if cut else "") + ".".join(parts)
    return label if len(label) <= limit else "…" + label[len(label) - limit + 1 :]
