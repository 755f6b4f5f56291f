"""The Hessian spectral density row: each step's SLQ density over its own eigenvalue grid,
resampled onto one common grid and drawn as an eigenvalue x step heatmap in log colour (the
keys of HessianDensity)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run

from .grid import bin_columns, log_ticks
from .heatmaps import heatmap_columns, step_label
from .parts import PanelPart

DENSITY = "hessian_density/density"
GRID = "hessian_density/grid"

DENSITY_DECADES = 6.0
"""Decades of spectral density the colours span below the peak; ``peak * 1e-6`` (and exact
zeros) take the darkest colour. SLQ densities fall off over many orders of magnitude."""
MAX_GRID_ROWS = 400
"""Most eigenvalue rows of the common grid the densities are resampled onto."""


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


HESSIAN_DENSITY_NEEDS = (DENSITY, GRID)


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
    return PanelPart(traces, "eigenvalue", description, keys=HESSIAN_DENSITY_NEEDS, height=1.3)


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
