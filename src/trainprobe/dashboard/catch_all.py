"""The dashboard's last row, which reaches every series that no other row draws.

:func:`other_series_panel` is the catch-all: every scalar key that no other row reads is
drawn there, one *family* at a time, picked from a menu over the row. A family is either
the keys ``<parent>/<name>`` that share a parent (one line each, or a heatmap of names x
steps when there are more than :data:`MAX_FAMILY_LINES`), or a probe's single keys
together (one line each). So nothing a probe records is out of the dashboard's reach, and
the page carries each series once, thinned for display only (:func:`thin`). The row's
title line explains the chosen family with the meaning its probe declared for those keys
(stored in the run's metadata: :func:`declared`).
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from fnmatch import fnmatchcase

import numpy as np
import plotly.graph_objects as go

from trainprobe.analysis.findings import Finding
from trainprobe.keys import Key, matching
from trainprobe.store import Run, Series

from .curves import _all_positive, _log_axis
from .grid import layer_matrix
from .heatmaps import HeatStyle, _layer_axis, heatmap_trace
from .parts import MenuItem, PanelPart

MAX_FAMILY_LINES = 8
"""A family of more keys than this is drawn as a heatmap (names x steps)."""
MAX_POINTS = 2000
"""Most points per line in the catch-all row; longer series are thinned (:func:`thin`)."""
OTHER_HEIGHT = 1.6


def declared(run: Run) -> tuple[Key, ...]:
    """The key patterns and meanings the run's probes declared (stored in its metadata by
    the monitor); empty for a run written without them."""
    out = []
    for entry in run.meta.get("probes", []):
        for pattern, meaning in entry.get("keys", []):
            try:
                out.append(Key(pattern, meaning))
            except ValueError:  # a pattern this version cannot read: no note from it
                continue
    return tuple(out)


def family_note(label: str, members: Sequence[str], keys: tuple[Key, ...]) -> str:
    """The title line for a family: the meaning its probe declared for the family's keys
    (``parent/*``), or each member's meaning (a probe's singles, ``probe/…``); a plain
    line naming the probe where nothing was declared."""
    if label.endswith("/*"):
        key = matching(keys, members[0])
        if key is not None:
            return _sentence(key.meaning)
    else:
        meanings = [(m, matching(keys, m)) for m in members]
        parts = [f"{m.split('/', 1)[1]}: {k.meaning}" for m, k in meanings if k is not None]
        if parts:
            return _sentence("; ".join(parts))
    return f"Series the {label.split('/', 1)[0]} probe records."


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


OTHER_SERIES_NEEDS = ("*",)
"""Every key; the registry passes the other rows' patterns as ``covered``, and only the keys
none of them matches are drawn here."""


def other_series_panel(
    run: Run, findings: tuple[Finding, ...], *, covered: Sequence[str]
) -> PanelPart | None:
    """Every scalar key matched by none of ``covered`` (the other rows' key patterns), one
    family at a time (:func:`families`), picked from the row's menu.

    Keys whose values are not one number per step (eigenvectors, densities) are named in
    the description, not drawn. ``None`` when nothing is left.
    """
    keys = [k for k in run.keys("") if not any(fnmatchcase(k, p) for p in covered)]
    kinds = {k: run.kind(k) for k in keys}
    vectors = [k for k in keys if kinds[k] != "scalar"]  # named, never read
    series = [run.series(k) for k in keys if kinds[k] == "scalar"]
    scalars = {s.key: s for s in series if len(s) > 0}
    traces: list[go.BaseTraceType] = []
    menu: list[MenuItem] = []
    drawn: list[str] = []
    keys_declared = declared(run)
    for label, members in families(list(scalars), keys_declared).items():
        family, y_title, y_axis = _family(label, [scalars[k] for k in members])
        if not family:  # nothing finite to draw: named below instead
            vectors += members
            continue
        start = len(traces)
        traces += family
        menu.append(
            MenuItem(
                f"{label} ({len(members)})",
                tuple(range(start, len(traces))),
                y_title,
                y_axis,
                family_note(label, members, keys_declared),
            )
        )
        drawn += members
    if not traces:
        return None
    names = Counter(t.name for t in traces if isinstance(t, go.Scatter))
    for trace in traces:  # a short name two families share: the whole key instead
        if isinstance(trace, go.Scatter) and names[trace.name] > 1:
            trace.name = trace.meta
    note = " Other families: the menu (right)."
    if vectors:
        listed = ", ".join(vectors[:4]) + (
            f" and {len(vectors) - 4} more" if len(vectors) > 4 else ""
        )
        note += f" Not drawn (arrays, or nothing finite; see Run.series): {listed}."
    menu = [replace(item, description=item.description + note) for item in menu]
    return PanelPart(
        traces,
        menu[0].y_title,
        menu[0].description,
        keys=tuple(drawn),
        height=OTHER_HEIGHT,
        y_axis=menu[0].y_axis,
        menu=tuple(menu),
    )


def families(keys: Sequence[str], declared: tuple[Key, ...] = ()) -> dict[str, list[str]]:
    """Menu label -> keys, in recording order.

    Keys sharing a parent (``conflict/norm/a``, ``conflict/norm/b``) form the family
    ``conflict/norm/*``, as does a key alone under a parent whose declared pattern ends in
    a placeholder (one module's ``regions/train/layer/*``, declared
    ``regions/<set>/layer/<module>``); any other key alone under its parent joins its
    probe's singles, ``<probe>/…`` (``sharpness/lr``, ``sharpness/hvps``).
    """
    children: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        children[key.rpartition("/")[0]].append(key)
    out: dict[str, list[str]] = {}
    for key in keys:
        parent = key.rpartition("/")[0]
        key_of = matching(declared, key)
        known = key_of is not None and key_of.pattern.rpartition("/")[2].startswith("<")
        if parent.count("/") >= 1 and (len(children[parent]) > 1 or known):
            label = f"{parent}/*"
        else:
            label = f"{key.split('/', 1)[0]}/…"
        out.setdefault(label, []).append(key)
    return out


def thin(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS):
    """At most ``max_points`` points of a line, for display: the series is cut into
    ``max_points // 2`` bins of equal length and each keeps its smallest and largest finite
    value, in step order, so spikes survive. A bin with no finite value keeps its first
    point, so a gap as long as a bin stays a gap; shorter NaN runs and infinite values
    drop out of the thinned line. Short series come back as they are.

    Returns:
        ``(steps, values)`` as numpy arrays.
    """
    n = steps.size
    if n <= max_points:
        return steps, values
    width = -(-n // max(max_points // 2, 1))
    pad = (-n) % width
    index = np.pad(np.arange(n), (0, pad), constant_values=n - 1).reshape(-1, width)  # [B, w]
    block = values[index].astype(np.float64)
    real = np.isfinite(block)
    low = np.where(real, block, np.inf).argmin(axis=1)
    high = np.where(real, block, -np.inf).argmax(axis=1)
    rows = np.arange(index.shape[0])
    pick = np.stack([np.minimum(low, high), np.maximum(low, high)], axis=1)  # [B, 2]
    pick[~real.any(axis=1)] = 0
    keep = np.unique(index[rows[:, None], pick])
    return steps[keep], values[keep]


def _family(label: str, series: list[Series]) -> tuple[list[go.BaseTraceType], str, dict]:
    """The traces of one family, its y title and y-axis settings."""
    if len(series) > MAX_FAMILY_LINES and label.endswith("/*"):
        names = [s.key.rpartition("/")[2] for s in series]
        steps, values = layer_matrix(series)  # [L, T]
        finite = values[np.isfinite(values)]
        log = finite.size > 0 and bool(np.all(finite > 0)) and finite.max() >= 10 * finite.min()
        style = HeatStyle(
            label.removesuffix("/*").rpartition("/")[2], log=log, colorbar_format=None
        )
        traces, _ = heatmap_trace(steps, values, names, style)
        if not traces:
            return [], "", {}
        _, y_axis, prefix = _layer_axis(names)
        return list(traces), f"{prefix}…" if prefix else "", {**y_axis, "fixedrange": False}
    traces = []
    for s in series:
        x, y = thin(s.steps, s.values)
        name = s.key.removeprefix(label.removesuffix("*")) if label.endswith("/*") else s.key
        traces.append(
            go.Scatter(
                x=x,
                y=y,
                name=name,
                mode="lines",
                line={"width": 1.4},
                meta=s.key,  # the whole key, should the short name recur
                hovertemplate=f"{html.escape(s.key)}: %{{y:.4g}}<extra></extra>",
            )
        )
    log = _all_positive(series) and _spans_decades(series)
    y_axis = {"type": "log", **_log_axis(series)} if log else {"type": "linear"}
    # a log family's own ticks (tickmode "array") win over the default
    return traces, "value", {"autorange": True, "tickmode": "auto", "showgrid": True, **y_axis}


def _spans_decades(series: Sequence[Series]) -> bool:
    values = np.concatenate([s.values[np.isfinite(s.values)] for s in series])
    return values.size > 0 and values.max() >= 100 * values.min()
