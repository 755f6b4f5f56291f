"""Heatmaps over the step axis: one row per layer (or module, or group pair), one column
per recorded step, binned for display (:func:`heatmap_part`, :func:`heatmap_trace`,
:func:`heatmap_columns`). The per-tensor rows that use them are in :mod:`.layers`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go

from trainprobe.store import Run

from .grid import (
    bin_columns,
    layer_matrix,
    log_ticks,
    ordered_layers,
    safe_log10,
    short_names,
)
from .parts import ROW_PX, PanelPart

_LABEL_PX = 12  # vertical pixels one y tick label needs

ZERO_DECADES = 1.0
"""How far (in decades) below the smallest positive value a log heatmap draws its zeros."""


@dataclass(frozen=True)
class HeatStyle:
    """How one heatmap colours its values.

    Attributes:
        label: the measured quantity, for the colourbar and the hover.
        log: colour by ``log10(value)`` (colourbar ticks show real values);
            values <= 0 are drawn with the lowest colour, labelled ``0``.
        colorscale: a Plotly colour-scale name.
        centre: a real value to put at the middle colour (diverging scales).
        min_half_width: with ``centre``, the least half-width of the symmetric
            colour range, in plotted units (decades for ``log``), so that a
            colour means a distance from ``centre``, not a place in the data's range.
        hover_format: d3 format of the real value in the hover.
        span: a fixed colour range ``(lo, hi)`` in plotted units; else the data's.
        colorbar_format: d3 format of the colourbar ticks of a linear heatmap
            (``None``: plotly's own).
    """

    label: str
    log: bool = True
    colorscale: str = "Viridis"
    centre: float | None = None
    min_half_width: float = 0.0
    hover_format: str = ".3g"
    span: tuple[float, float] | None = None
    colorbar_format: str | None = ".0%"


def heatmap_part(run: Run, prefix: str, style: HeatStyle, description: str) -> PanelPart | None:
    """A layer x step heatmap of the scalar keys ``prefix/<layer>``; ``None`` if there are none.

    Steps are bin-averaged for display when there are more than
    :func:`~trainprobe.dashboard.grid.column_budget` allows (:func:`heatmap_trace`).
    """
    series = [run.series(f"{prefix}/{name}") for name in ordered_layers(run, prefix)]
    series = [s for s in series if s.values.ndim == 1 and len(s) > 0]
    if not series:
        return None
    names = [s.key[len(prefix) + 1 :] for s in series]
    steps, values = layer_matrix(series)  # [T], [L, T]
    traces, width = heatmap_trace(steps, values, names, style)
    if not traces:
        return None
    if width > 1:
        description += f" Columns are means of {width} steps."
    height, y_axis, prefix = _layer_axis(names)
    return PanelPart(
        traces,
        f"{prefix}…" if prefix else "",
        description,
        keys=tuple(s.key for s in series),
        height=height,
        y_axis=y_axis,
    )


def heatmap_trace(
    steps: np.ndarray,
    values: np.ndarray,
    rows: Sequence[str],
    style: HeatStyle,
    *,
    max_columns: int | None = None,
) -> tuple[tuple[go.Heatmap, ...], int]:
    """The heatmap of ``values [L, T]`` over ``steps [T]``, one row per name in ``rows``.

    Columns are bin-averaged to at most ``max_columns`` (default: as many as
    :func:`~trainprobe.dashboard.grid.column_budget` allows for the rows). The hover
    shows the real (bin-mean) value from ``customdata``: a hovertemplate can format ``z``
    but not compute ``10**z``. Both arrays are float32 (plotly sends them as binary).

    Returns:
        ``(traces, w)`` with ``w`` steps per column: one heatmap, or two when the last
        column is off the even grid (:func:`heatmap_columns`); ``((), w)`` when no value
        is finite.
    """
    x, values, width = bin_columns(steps, values, max_columns=max_columns)  # [T'], [L, T']
    if not np.isfinite(values).any():
        return (), width
    z, colours = _log_z(values, style) if style.log else _linear_z(values, style)
    traces = heatmap_columns(
        x,
        width,
        z=z,
        customdata=values,
        hover=lambda w: _hover(style, w),
        y=list(rows),
        hoverongaps=False,
        **colours,
    )
    return traces, width


def heatmap_columns(
    x: np.ndarray,
    width: int,
    *,
    z: np.ndarray,
    hover: Callable[[int], str],
    customdata: np.ndarray | None = None,
    **common: Any,
) -> tuple[go.Heatmap, ...]:
    """Heatmap trace(s) of ``z [R, T']`` at column centres ``x [T']`` (means of ``width``
    steps), with ``hover(w)`` the hovertemplate for columns of ``w`` steps.

    Evenly spaced columns go to plotly as ``x0``/``dx``, which plotly.js draws as one image
    of a pixel per cell that the browser scales; explicit ``x`` makes it paint every cell
    on each redraw, about a second per zoom at 200 rows x 800 columns
    (``benchmarks/dashboard.py``). A last column off that grid (a shorter last bin, or a
    last step logged off the schedule) is a second one-column trace at its true step,
    as wide as the steps it holds, with no colourbar of its own. Columns spaced otherwise
    (a log-spaced schedule) keep explicit ``x``.
    """
    z = np.asarray(z, dtype=np.float32)
    data = None if customdata is None else np.asarray(customdata)
    if data is not None and data.dtype.kind in "fiu":  # numbers go as float32 (binary)
        data = data.astype(np.float32)
    head, tail = column_axis(x)
    if tail is None:
        return (go.Heatmap(**head, z=z, customdata=data, hovertemplate=hover(width), **common),)
    last = max(1, round(tail["dx"] * width / head["dx"])) if width > 1 else 1
    first = go.Heatmap(
        **head,
        z=z[:, :-1],
        hovertemplate=hover(width),
        **common,
        customdata=None if data is None else data[:, :-1],
    )
    second = go.Heatmap(
        **tail,
        z=z[:, -1:],
        hovertemplate=hover(last),
        **common,
        customdata=None if data is None else data[:, -1:],
    )
    second.update(showscale=False)
    return first, second


def column_axis(x: np.ndarray) -> tuple[dict, dict | None]:
    """How to place columns at centres ``x``: ``(head, tail)``.

    ``head`` is ``{"x0", "dx"}`` for evenly spaced columns (all of them when ``tail`` is
    None, all but the last otherwise), or ``{"x": x}`` for all of them. ``tail`` is
    ``{"x0", "dx"}`` for a last column whose gap to the one before differs from the grid:
    centred on its own step, spanning from where the grid's last cell ends.
    """
    if x.size < 2:
        return ({"x0": float(x[0]), "dx": 1.0} if x.size else {"x": x}), None
    gaps = np.diff(x)
    step = float(gaps[0])
    if step <= 0:
        return {"x": x}, None
    if np.allclose(gaps, step, rtol=1e-9, atol=1e-9):
        return {"x0": float(x[0]), "dx": step}, None
    if x.size >= 3 and np.allclose(gaps[:-1], step, rtol=1e-9, atol=1e-9):
        tail = 2.0 * float(gaps[-1]) - step  # its left edge meets the grid's last cell
        if tail > 0:
            return {"x0": float(x[0]), "dx": step}, {"x0": float(x[-1]), "dx": tail}
    return {"x": x}, None


def trace_steps(trace: go.Heatmap | go.Scatter) -> np.ndarray:
    """The x (step) of each column of a trace, whether given as ``x`` or as ``x0``/``dx``."""
    if trace.x is not None:
        return np.asarray(trace.x, dtype=np.float64)
    if isinstance(trace, go.Heatmap) and trace.z is not None and trace.x0 is not None:
        columns = np.asarray(trace.z).shape[-1]
        return float(trace.x0) + float(trace.dx) * np.arange(columns)
    return np.zeros(0)


def _linear_z(values: np.ndarray, style: HeatStyle) -> tuple[np.ndarray, dict]:
    """``values`` as they are, and their colour settings."""
    finite = values[np.isfinite(values)]
    return values, _colours(style, float(finite.min()), float(finite.max()))


def _log_z(values: np.ndarray, style: HeatStyle) -> tuple[np.ndarray, dict]:
    """``log10(values)`` ``[L, T']`` to colour by, and the colour settings.

    A value <= 0 (a dead or frozen layer's gradient norm or update ratio) has
    no log; it goes on the colour floor ``zmin``, :data:`ZERO_DECADES` below
    the smallest positive value (so no measured value shares its colour), and
    the colourbar labels the floor ``0``. NaN (not measured) stays a gap.
    """
    z = safe_log10(values)  # [L, T']: NaN where <= 0 or not finite
    positive = z[np.isfinite(z)]
    zero = np.isfinite(values) & (values <= 0)  # [L, T']
    if positive.size:
        lo, hi = float(positive.min()), float(positive.max())
        lo -= ZERO_DECADES if zero.any() else 0.0
    else:  # every measured value is 0
        lo = hi = math.log10(style.centre) if style.centre is not None else 0.0
    colours = _colours(style, lo, hi)
    if zero.any():
        z[zero] = colours["zmin"]
        _label_floor_zero(
            colours["colorbar"],
            colours["zmin"],
            colours["zmax"],
            alone=positive.size == 0 and style.centre is None,
        )
    return z, colours


def _label_floor_zero(colorbar: dict, lo: float, hi: float, *, alone: bool) -> None:
    """Put a ``0`` tick at the colour floor ``lo``; drop ticks crowding it (all if ``alone``)."""
    ticks = zip(colorbar["tickvals"], colorbar["ticktext"], strict=True)
    kept = [] if alone else [(v, t) for v, t in ticks if v > lo + 0.06 * (hi - lo)]
    colorbar.update(tickvals=[lo] + [v for v, _ in kept], ticktext=["0"] + [t for _, t in kept])


def step_label(width: int) -> str:
    """The hover's step for a column of ``width`` steps: the step, or the bin's mean step."""
    return "step %{x:.0f}" if width == 1 else f"step ≈ %{{x:.0f}} (mean of {width})"


def _hover(style: HeatStyle, width: int) -> str:
    step = step_label(width)
    return (
        f"<b>%{{y}}</b><br>{step}<br>{style.label} "
        f"%{{customdata:{style.hover_format}}}<extra></extra>"
    )


def _colours(style: HeatStyle, lo: float, hi: float) -> dict:
    """Colour range and colourbar of a heatmap whose z lies in ``[lo, hi]``."""
    if style.span is not None:
        lo, hi = style.span
    elif style.centre is not None:
        mid = math.log10(style.centre) if style.log else style.centre
        half = max(abs(lo - mid), abs(hi - mid), style.min_half_width, 1e-9)
        lo, hi = mid - half, mid + half
    elif hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    colorbar = {"title": {"text": style.label, "side": "right"}, "thickness": 12}
    if style.log:
        vals, text = log_ticks(lo, hi)
        colorbar.update(tickmode="array", tickvals=vals, ticktext=text)
    elif style.colorbar_format:
        colorbar.update(tickformat=style.colorbar_format)
    return {"colorscale": style.colorscale, "zmin": lo, "zmax": hi, "colorbar": colorbar}


def _layer_axis(names: list[str]) -> tuple[float, dict, str]:
    """Row height, y-axis settings (first layer on top, short labels, every k-th) and the
    prefix that all names share (dropped from the labels)."""
    px = min(max(len(names) * 14, 160), 700)
    every = max(1, math.ceil(len(names) * _LABEL_PX / px))
    prefix, labels = short_names(names)
    y_axis = {
        "type": "category",
        "autorange": "reversed",
        "automargin": True,
        "tickmode": "array",
        "tickvals": names[::every],
        "ticktext": labels[::every],
        "tickfont": {"size": 10},
        "showgrid": False,
        "fixedrange": True,
    }
    return px / ROW_PX, y_axis, prefix
