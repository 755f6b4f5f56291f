"""Per-group rows of GradConflict: each group's own loss, and its share of the gradient's
magnitude against its share of the loss (the ``conflict/loss``, ``conflict/norm``,
``conflict/count`` and ``conflict/loss_share`` keys of :class:`~trainprobe.probes.GradConflict`),
where class competition shows. The pair cosines are in :mod:`.conflict`."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run, Series

from .curves import _all_positive, _at, _line, _log_axis, _read
from .grid import layer_matrix
from .parts import PanelPart

LOSS = "conflict/loss"
LOSS_SHARE, COUNT, NORM = "conflict/loss_share", "conflict/count", "conflict/norm"
MAX_SHARE_GROUPS = 12
"""Most groups in the share row: those with the largest loss share at some step."""
MAX_GROUP_LINES = 12
"""Most groups drawn in the per-group loss panel: the ones with the highest peak loss."""


GROUP_LOSS_NEEDS = (f"{LOSS}/*",)


def group_loss_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``conflict/loss/<group>``: each group's own loss on the probe's batch, log y.

    Where class competition shows: a minority class whose loss climbs while the others
    fall (the ``class_competition`` finding marks this row). At most
    :data:`MAX_GROUP_LINES` groups, those with the highest peak loss.
    """
    series = _read(run, [f"{LOSS}/{g}" for g in run.layers(LOSS)])
    if not series:
        return None
    peak = [float(np.nanmax(s.values)) if np.isfinite(s.values).any() else -np.inf for s in series]
    shown = sorted(range(len(series)), key=lambda i: -peak[i])[:MAX_GROUP_LINES]
    traces = [_line(series[i], f"loss · {series[i].key[len(LOSS) + 1 :]}") for i in sorted(shown)]
    log = _all_positive([series[i] for i in shown])
    more = (
        f" The {len(shown)} of {len(series)} groups with the highest peak."
        if len(shown) < len(series)
        else ""
    )
    return PanelPart(
        traces,
        "group loss",
        "Each group's own loss on the probe's batch: one rising while the rest fall is a "
        "group losing the competition for the shared weights." + more,
        keys=tuple(s.key for s in series),
        y_log=log,
        y_axis=_log_axis([series[i] for i in shown]) if log else {},
    )


GROUP_SHARE_NEEDS = (f"{NORM}/*", f"{COUNT}/*", f"{LOSS_SHARE}/*")


def group_share_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """Each group's share of the gradient's magnitude, ``n_g ‖g_g‖ / Σ_j n_j ‖g_j‖`` from
    ``conflict/norm/<g>`` and ``conflict/count/<g>`` (solid), and its share of the loss,
    ``conflict/loss_share/<g>`` (dotted): the two shares the ``class_competition`` detector
    compares. One colour per group; at most :data:`MAX_SHARE_GROUPS`, by peak loss share."""
    groups = list(dict.fromkeys([*run.layers(NORM), *run.layers(LOSS_SHARE)]))
    norm = {g: s for g in groups for s in _read(run, _present(run, f"{NORM}/{g}"))}
    count = {g: s for g in groups for s in _read(run, _present(run, f"{COUNT}/{g}"))}
    loss = {g: s for g in groups for s in _read(run, _present(run, f"{LOSS_SHARE}/{g}"))}
    grad = _magnitude_shares(norm, count)
    if not grad and not loss:
        return None
    peak = {
        g: _peak(loss[g]) if g in loss else float(np.nanmax(grad[g][1], initial=-np.inf))
        for g in groups
        if g in loss or g in grad
    }
    top = set(sorted(peak, key=lambda g: -peak[g])[:MAX_SHARE_GROUPS])
    shown = [g for g in peak if g in top]
    traces = []
    for g, colour in zip(shown, _palette(len(shown)), strict=True):
        if g in grad:
            steps, share = grad[g]
            traces.append(
                go.Scatter(
                    x=steps,
                    y=share,
                    name=f"grad share · {g}",
                    mode="lines",
                    line={"width": 1.6},
                    yhoverformat=".3g",
                )
            )
            traces[-1].update(line_color=colour, legendgroup=f"share {g}")
        if g in loss:
            traces.append(_line(loss[g], f"loss share · {g}", dash="dot"))
            traces[-1].update(line_color=colour, legendgroup=f"share {g}")
    more = (
        f" The {len(shown)} of {len(peak)} groups with the largest loss share."
        if len(shown) < len(peak)
        else ""
    )
    return PanelPart(
        traces,
        "share",
        "Each group's share of the gradient's magnitude (solid, n·‖g‖ over the sum) and of "
        "the loss (dotted). Solid far under dotted: the group carries loss but barely moves "
        "the weights (class_competition)." + more,
        keys=tuple(s.key for s in (*norm.values(), *count.values(), *loss.values())),
        y_axis={"rangemode": "tozero"},
    )


def _magnitude_shares(
    norm: dict[str, Series], count: dict[str, Series]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``group -> (steps, n_g ‖g_g‖ / Σ_j n_j ‖g_j‖)`` over the groups with a norm; a group
    with no count series counts as 1 (tasks: every task sees the whole batch)."""
    names = list(norm)
    if not names:
        return {}
    steps, norms = layer_matrix([norm[g] for g in names])  # [G, T]
    counts = np.ones_like(norms)
    for row, g in enumerate(names):
        if g in count:
            counts[row] = _at(count[g], steps)
    weighted = counts * norms  # [G, T]
    total = np.nansum(weighted, axis=0)  # [T]
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(total > 0, weighted / total, np.nan)
    return {g: (steps, shares[row]) for row, g in enumerate(names)}


def _present(run: Run, key: str) -> list[str]:
    return [key] if key in run else []


def _peak(series: Series) -> float:
    finite = series.values[np.isfinite(series.values)]
    return float(finite.max()) if finite.size else -np.inf


def _palette(n: int) -> list[str]:
    colours = qualitative.D3
    return [colours[i % len(colours)] for i in range(n)]
