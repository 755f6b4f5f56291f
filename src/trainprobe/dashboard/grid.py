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
