"""Curvature panels: sharpness against the stability threshold, the Hessian's top eigenvalues,
its trace and its spectral density over training."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run, Series

from .curves import _all_positive, _finite, _line, _log_axis, _read
from .grid import bin_columns, log_ticks
from .heatmaps import heatmap_columns, step_label
from .parts import PanelPart

LAMBDA = "sharpness/lambda_max"
THRESHOLD = "sharpness/threshold"
SUBSPACE = "grad_subspace/fraction"
TRACE = "hessian_trace/trace"
STDERR = "hessian_trace/stderr"
DENSITY = "hessian_density/density"
GRID = "hessian_density/grid"

DENSITY_DECADES = 6.0
"""Decades of spectral density the colours span below the peak; ``peak * 1e-6`` (and exact
zeros) take the darkest colour. SLQ densities fall off over many orders of magnitude."""
MAX_GRID_ROWS = 400
"""Most eigenvalue rows of the common grid the densities are resampled onto."""

_TRACE_COLOUR = "#1f77b4"
_BAND_FILL = "rgba(31, 119, 180, 0.2)"  # the trace colour, translucent
_EIGEN_KEY = re.compile(r"hessian/(eig|bottom)_(\d+)")


def sharpness_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``sharpness/lambda_max`` with ``sharpness/threshold`` dashed; the hover gives their ratio.

    Log y when every value is positive (a warmup from a tiny learning rate starts the
    threshold ``2 / lr`` decades above the sharpness).
    """
    series = _read(run, [key for key in (LAMBDA, THRESHOLD) if key in run])
    sharp = next((s for s in series if s.key == LAMBDA), None)
    if sharp is None:
        return None
    traces = [_line(sharp, "λ_max")]
    threshold = next((s for s in series if s.key == THRESHOLD), None)
    if threshold is not None:
        traces[0].update(
            customdata=_ratio_at(sharp, threshold),
            hovertemplate="λ_max %{y:.4g} · %{customdata:.3g}× the threshold<extra></extra>",
        )
        traces.append(_line(threshold, "stability threshold", dash="dash"))
        traces[-1].update(line_color="#d62728")
    return PanelPart(
        traces,
        "eigenvalue",
        "Top Hessian eigenvalue (Adam: of P⁻¹H) and the stability threshold (2/lr for GD). "
        "Rising to the line and hovering is the edge of stability; far above it with a "
        "spiky loss is instability.",
        keys=tuple(s.key for s in series),
        height=1.1,
        **_y_scale(series, decades=0),
    )


def _ratio_at(sharp: Series, threshold: Series) -> np.ndarray:
    """``[n]`` ``lambda_max / threshold`` at the sharpness steps (NaN where no threshold)."""
    ratio = np.full(len(sharp), np.nan)
    _, at_sharp, at_threshold = np.intersect1d(sharp.steps, threshold.steps, return_indices=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio[at_sharp] = sharp.values[at_sharp] / threshold.values[at_threshold]
    return ratio


def hessian_top_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``hessian/eig_<i>`` (solid, Viridis by rank) and ``hessian/bottom_<i>`` (dotted)."""
    keys = sorted(
        (key for key in run.keys("hessian/") if _EIGEN_KEY.fullmatch(key)), key=_eigen_rank
    )
    series = _read(run, keys)
    if not series:
        return None
    traces = []
    for kind, dash in (("eig", None), ("bottom", "dot")):
        ranked = [s for s in series if _eigen_rank(s.key)[0] == (kind == "bottom")]
        colours = sample_colorscale("Viridis", list(np.linspace(0.0, 0.85, max(len(ranked), 2))))
        for s, colour in zip(ranked, colours, strict=False):
            traces.append(_line(s, f"{kind} {_eigen_rank(s.key)[1]}", dash=dash))
            traces[-1].update(line_color=colour)
    return PanelPart(
        traces,
        "eigenvalue",
        "Top Hessian eigenvalues (Lanczos), eig 0 the largest; dotted: the most negative. "
        "One far above the rest is an outlier direction; large negative ones, a saddle.",
        keys=tuple(s.key for s in series),
        **_y_scale(series, decades=2),
    )


def _y_scale(series: Sequence[Series], *, decades: int) -> dict:
    """``y_log`` and ``y_axis`` of a PanelPart: log y when every value is positive and the
    largest is ``10**decades`` times the smallest or more."""
    values = _finite(series)
    log = _all_positive(series) and values.max() >= 10.0**decades * values.min()
    return {"y_log": bool(log), "y_axis": _log_axis(series) if log else {}}


def _eigen_rank(key: str) -> tuple[bool, int]:
    """``(is_bottom, index)`` of ``hessian/eig_<i>`` / ``hessian/bottom_<i>``: top first."""
    kind, index = _EIGEN_KEY.fullmatch(key).groups()
    return kind == "bottom", int(index)


def hessian_trace_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``hessian_trace/trace`` with a ±1 ``hessian_trace/stderr`` band (Hutch++ or Hutchinson)."""
    series = _read(run, [key for key in (TRACE, STDERR) if key in run])
    trace = next((s for s in series if s.key == TRACE), None)
    if trace is None:
        return None
    traces = [_line(trace, "trace")]
    traces[0].update(line_color=_TRACE_COLOUR)
    stderr = next((s for s in series if s.key == STDERR), None)
    if stderr is not None:
        steps, at_trace, at_err = np.intersect1d(trace.steps, stderr.steps, return_indices=True)
        centre, err = trace.values[at_trace], stderr.values[at_err]
        keep = np.isfinite(centre) & np.isfinite(err)
        steps, centre, err = steps[keep], centre[keep], err[keep]
        if steps.size:
            traces.insert(0, _band(steps, centre - err, centre + err, "trace ± stderr"))
    return PanelPart(
        traces,
        "trace",
        "Hessian trace (Hutch++ by default), the shaded band ±1 standard error. A rising "
        "trace is the whole spectrum sharpening, not just its top.",
        keys=tuple(s.key for s in series),
        height=0.9,
    )


def _band(steps: np.ndarray, low: np.ndarray, high: np.ndarray, name: str) -> go.Scatter:
    """A filled polygon between ``low [n]`` and ``high [n]``, one legend entry, no hover."""
    return go.Scatter(
        x=np.concatenate([steps, steps[::-1]]),
        y=np.concatenate([high, low[::-1]]),
        fill="toself",
        fillcolor=_BAND_FILL,
        line={"width": 0},
        mode="lines",
        name=name,
        hoverinfo="skip",
    )


def resample_densities(
    grids: Sequence[np.ndarray], densities: Sequence[np.ndarray], *, max_rows: int = MAX_GRID_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Put per-step spectral densities, each on its own eigenvalue grid, on one common grid.

    The common grid spans every step's grid, ``[min_t g_t[0], max_t g_t[-1]]``, with
    the finest step's spacing (at least as many points as the longest grid, at most
    ``max_rows``). Each density is linearly interpolated onto it (``np.interp``) and is
    0 outside its own grid.

    Args:
        grids: ``T`` arrays ``[G_t]`` of eigenvalues (sorted here if they are not).
        densities: ``T`` arrays ``[G_t]`` of density values on them.
        max_rows: the most points on the common grid.

    Returns:
        ``common [G]`` and ``values [G, T]``.

    Raises:
        ValueError: no grids, or not one density per grid.
    """
    if not grids or len(grids) != len(densities):
        raise ValueError(
            f"resample_densities needs one density per grid and at least one of each, got "
            f"{len(grids)} grids and {len(densities)} densities"
        )
    orders = [np.argsort(g, kind="stable") for g in grids]
    grids = [np.asarray(g, dtype=np.float64)[o] for g, o in zip(grids, orders, strict=True)]
    densities = [np.asarray(d, dtype=np.float64)[o] for d, o in zip(densities, orders, strict=True)]
    lo, hi = min(g[0] for g in grids), max(g[-1] for g in grids)
    longest = max(g.size for g in grids)
    spacings = [(g[-1] - g[0]) / (g.size - 1) for g in grids if g.size > 1 and g[-1] > g[0]]
    rows = math.ceil((hi - lo) / min(spacings)) + 1 if spacings else longest
    common = np.linspace(lo, hi, min(max(rows, longest), max_rows) if hi > lo else 1)  # [G]
    values = np.stack(
        [
            np.interp(common, g, d, left=0.0, right=0.0)
            for g, d in zip(grids, densities, strict=True)
        ],
        axis=1,
    )  # [G, T]
    return common, values


def hessian_density_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``hessian_density/density`` over ``hessian_density/grid``: eigenvalue x step heatmap.

    Every step's density is resampled onto one common grid (:func:`resample_densities`)
    and coloured by ``log10(density + floor)``, ``floor = peak * 10**-DENSITY_DECADES``;
    the hover shows the resampled density itself.
    """
    steps, grids, densities = _density_steps(run)
    if not steps.size:
        return None
    common, values = resample_densities(grids, densities)  # [G], [G, T]
    x, values, width = bin_columns(steps, values)  # [T'], [G, T']
    peak = float(values.max())
    if not peak > 0:
        return None
    floor = peak * 10.0**-DENSITY_DECADES
    lo, hi = math.log10(floor), math.log10(peak + floor)
    ticks, labels = log_ticks(lo, hi)
    def template(w: int) -> str:
        value = "density %{customdata:.3g}<extra></extra>"
        return f"{step_label(w)}<br>eigenvalue %{{y:.4g}}<br>{value}"

    traces = heatmap_columns(
        x,
        width,
        z=np.log10(values + floor),
        customdata=values,
        hover=template,
        y=common,
        colorscale="Viridis",
        zmin=lo,
        zmax=hi,
        colorbar={
            "title": {"text": "density", "side": "right"},
            "thickness": 12,
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": labels,
        },
    )
    description = (
        "Hessian eigenvalue density (SLQ), log colour, resampled onto one grid. Mass moving "
        "up is sharpening; below 0, negative curvature; thin bright lines, outlier eigenvalues."
    )
    if width > 1:
        description += f" Columns are means of {width} steps."
    return PanelPart(traces, "eigenvalue", description, keys=(DENSITY, GRID), height=1.3)


def _density_steps(run: Run) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Steps ``[T]`` that recorded a finite density and a grid of the same size, and both."""
    if DENSITY not in run or GRID not in run:
        return np.empty(0, dtype=np.int64), [], []
    density_steps, densities = run.arrays(DENSITY)
    grid_steps, grids = run.arrays(GRID)
    steps, at_density, at_grid = np.intersect1d(density_steps, grid_steps, return_indices=True)
    keep = [
        k
        for k, (i, j) in enumerate(zip(at_density, at_grid, strict=True))
        if densities[i].shape == grids[j].shape
        and densities[i].ndim == 1
        and densities[i].size > 0
        and np.isfinite(densities[i]).all()
        and np.isfinite(grids[j]).all()
    ]
    return (
        steps[keep],
        [grids[at_grid[k]] for k in keep],
        [np.clip(densities[at_density[k]], 0.0, None) for k in keep],
    )


def grad_subspace_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grad_subspace/fraction`` in ``[0, 1]``."""
    series = _read(run, [SUBSPACE] if SUBSPACE in run else [])
    if not series:
        return None
    return PanelPart(
        [_line(series[0], "gradient in top-k eigenspace")], "fraction",
        "Share of the gradient's squared norm inside the top-k Hessian eigenspace. Near 1 "
        "soon after the start is normal (Gur-Ari et al. 2018); training then moves mostly "
        "along a few sharp directions.",
        keys=(SUBSPACE,), height=0.7, y_axis={"range": [-0.03, 1.03]},
    )  # fmt: skip
