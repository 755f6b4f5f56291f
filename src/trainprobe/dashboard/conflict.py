"""Conflict panels: group-pair cosines, each group's worst partner and the summary over all
pairs (the ``conflict/cos/*`` and summary keys of :class:`~trainprobe.probes.GradConflict`),
and the cosine matrix as a figure of its own. Each group's own loss and shares are in
:mod:`.groups`.

The dashboard is one figure whose rows share the training-step x-axis, and a
:class:`PanelPart` carries traces and y-axis settings only (no sliders, no x-axis of its
own). A ``G x G`` cosine matrix has no step axis, so it cannot be a row: the row
(:func:`cosine_matrix_panel`) draws each group's worst partner over steps, and the matrix
itself, with a step slider, is :func:`cosine_matrix_figure` (the CLI's dashboard page
shows it under the rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run, Series

from .curves import _line, _read
from .grid import bin_columns, layer_matrix
from .heatmaps import _layer_axis, heatmap_columns, step_label
from .parts import PanelPart

COS = "conflict/cos"
CONFLICT_SUMMARY = (
    ("conflict/mean_cos", "mean cosine", None),
    ("conflict/min_cos", "min cosine", None),
    ("conflict/frac_negative", "fraction of pairs < 0", "dash"),
)

COSINE_COLOURS = [
    [0.0, "#b2182b"],
    [0.25, "#ef8a62"],
    [0.5, "#ffffff"],
    [0.75, "#67a9cf"],
    [1.0, "#2166ac"],
]
"""Diverging scale for cosines on a fixed ``[-1, 1]``: red conflict, white 0, blue aligned."""
_COSINE_Z = {"colorscale": COSINE_COLOURS, "zmin": -1.0, "zmax": 1.0}
_COSINE_BAR = {
    "title": {"text": "cosine", "side": "right"},
    "thickness": 12,
    "tickvals": [-1, -0.5, 0, 0.5, 1],
}


def _pair_series(run: Run) -> tuple[list[str], list[tuple[int, int]], list[Series]]:
    """Groups (first-appearance order: the probe's), the ``(a, b)`` index of each
    ``conflict/cos/<a>__<b>`` pair and its series; group names never hold ``__``."""
    groups: dict[str, int] = {}
    pairs, series = [], []
    for s in _read(run, run.keys(f"{COS}/")):
        a, sep, b = s.key[len(COS) + 1 :].partition("__")
        if sep and a and b:
            pairs.append((groups.setdefault(a, len(groups)), groups.setdefault(b, len(groups))))
            series.append(s)
    return list(groups), pairs, series


def _square(pairs: Sequence[tuple[int, int]], values: np.ndarray, size: int) -> np.ndarray:
    """``[G, G, T]`` symmetric cosines from pair rows ``values [P, T]``; NaN on the diagonal."""
    out = np.full((size, size, values.shape[1]), np.nan)
    for row, (a, b) in enumerate(pairs):
        out[a, b] = out[b, a] = values[row]
    return out


def cosine_matrices(run: Run) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(groups [G], steps [T], matrices [T, G, G])``: the group cosine matrix at every
    step that recorded a pair, rebuilt from the ``conflict/cos/<a>__<b>`` keys:
    ``M[a, b] = M[b, a] = cos φ_ab``, ``M[g, g] = 1``, NaN where a pair is missing or NaN
    (a zero gradient). ``G = 0`` without pairs."""
    groups, pairs, series = _pair_series(run)
    if not series:
        return [], np.empty(0, dtype=np.int64), np.empty((0, 0, 0))
    steps, values = layer_matrix(series)  # [T], [P, T]
    square = _square(pairs, values, len(groups)).transpose(2, 0, 1)  # [T, G, G]
    square[:, np.arange(len(groups)), np.arange(len(groups))] = 1.0
    return groups, steps, square


def _cosine_part(
    labels: list[str],
    series: list[Series],
    z: np.ndarray,
    binned: tuple,
    text: str,
    *,
    y_title: str,
    hover: str = "",
    customdata: np.ndarray | None = None,
) -> PanelPart:
    """A row heatmap of cosines ``z [len(labels), T']`` on the fixed ``[-1, 1]`` scale,
    over the binned steps ``binned = (x, _, w)``; hover: row, step, ``hover``, cosine."""
    x, _, width = binned

    def template(w: int) -> str:
        return f"<b>%{{y}}</b><br>{step_label(w)}{hover}<br>cosine %{{z:.3f}}<extra></extra>"

    traces = heatmap_columns(
        x,
        width,
        z=z,
        customdata=customdata,
        hover=template,
        y=labels,
        hoverongaps=False,
        colorbar=_COSINE_BAR,
        **_COSINE_Z,
    )
    height, y_axis, _ = _layer_axis(labels)
    text += f" Columns are means of {width} steps." if width > 1 else ""
    return PanelPart(
        traces, y_title, text, keys=tuple(s.key for s in series), height=height, y_axis=y_axis
    )


CONFLICT_HEATMAP_NEEDS = (f"{COS}/*",)


def conflict_heatmap_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """Pair x step heatmap of ``conflict/cos/<a>__<b>`` on the fixed ``[-1, 1]`` cosine scale."""
    groups, pairs, series = _pair_series(run)
    if not series:
        return None
    binned = bin_columns(*layer_matrix(series))  # [T'], [P, T'], w
    return _cosine_part(
        [f"{groups[a]} · {groups[b]}" for a, b in pairs],
        series,
        binned[1],
        binned,
        "Cosine between two groups' gradients (red < 0: they pull against each other, "
        "PCGrad's conflict; white: orthogonal; blue: aligned).",
        y_title="pair",
    )


def worst_partners(square: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row minima ``[G, T]`` of ``square [G, G, T]`` (NaN: unknown) and their column index
    ``[G, T]``: each group's most negative cosine and partner; NaN and -1 where none."""
    filled = np.where(np.isnan(square), np.inf, square)  # [G, G, T]
    partner = filled.argmin(axis=1)  # [G, T]
    low = np.take_along_axis(filled, partner[:, None, :], axis=1)[:, 0, :]  # [G, T]
    known = np.isfinite(low)
    return np.where(known, low, np.nan), np.where(known, partner, -1)


COSINE_MATRIX_NEEDS = (f"{COS}/*",)


def cosine_matrix_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """The cosine matrix, one row per group over steps: each group's worst partner.

    A row of the dashboard shares the step axis, so the ``G x G`` matrix is reduced to
    its row minima (colour) and their arg-min partner (hover); the matrix itself is
    :func:`cosine_matrix_figure`. ``None`` below 3 groups: the pair heatmap shows it all.
    """
    groups, pairs, series = _pair_series(run)
    if len(groups) < 3:
        return None
    binned = bin_columns(*layer_matrix(series))  # [T'], [P, T'], w
    low, partner = worst_partners(_square(pairs, binned[1], len(groups)))  # [G, T'] each
    return _cosine_part(
        groups,
        series,
        low,
        binned,
        "Each group's most negative cosine with any other group (hover: which one): a red "
        "row is a group the others pull against, e.g. a minority class.",
        y_title="group",
        hover="<br>worst partner %{customdata}",
        customdata=np.array([*groups, "none"], dtype=object)[partner],  # -1: none
    )


def cosine_matrix_figure(run: Run) -> go.Figure | None:
    """The ``G x G`` group cosine matrix with a slider over the recorded steps (last shown).

    A figure of its own, not a dashboard row; nothing is written. ``None`` without pairs.
    """
    groups, steps, matrices = cosine_matrices(run)
    if not groups:
        return None
    fig = go.Figure(
        go.Heatmap(
            x=groups,
            y=groups,
            z=matrices[-1],
            texttemplate="%{z:.2f}",
            colorbar=_COSINE_BAR,
            hovertemplate="%{y} · %{x}<br>cosine %{z:.3f}<extra></extra>",
            **_COSINE_Z,
        )
    )
    slider = [
        {"label": str(s), "method": "restyle", "args": [{"z": [m.tolist()]}, [0]]}
        for s, m in zip(steps, matrices, strict=True)
    ]
    fig.update_layout(
        title="Cosine between group gradients",
        template="plotly_white",
        sliders=[{"active": len(slider) - 1, "steps": slider, "currentvalue": {"prefix": "step "}}],
        xaxis={"side": "top"},
        yaxis={"autorange": "reversed", "scaleanchor": "x"},
        height=620,
        width=640,
        margin={"t": 140},
    )
    return fig


CONFLICT_SUMMARY_NEEDS = tuple(key for key, _, _ in CONFLICT_SUMMARY)


def conflict_summary_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``conflict/mean_cos``, ``conflict/min_cos`` and ``conflict/frac_negative`` on one axis."""
    style = {key: (name, dash) for key, name, dash in CONFLICT_SUMMARY}
    series = _read(run, [key for key in CONFLICT_SUMMARY_NEEDS if key in run])
    if not series:
        return None
    traces = [_line(s, style[s.key][0], dash=style[s.key][1]) for s in series]
    return PanelPart(
        traces,
        "cosine / fraction",
        "Over all group pairs: mean and worst cosine, and the fraction of pairs below 0 "
        "(PCGrad's conflict test). A mean near 0 with a worst near −1 is one pair at odds.",
        keys=tuple(s.key for s in series),
        height=0.8,
        y_axis={"range": [-1.05, 1.05]},
    )
