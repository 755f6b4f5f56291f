"""Findings on the dashboard: a timeline row, shaded spans across all rows, title markers."""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from fnmatch import fnmatchcase

import numpy as np
import plotly.graph_objects as go

from trainprobe.analysis.findings import Finding, Severity
from trainprobe.store import Run

from .parts import PanelPart

SEVERITY_COLOURS = {
    Severity.INFO: "#1f77b4",
    Severity.WARNING: "#ff7f0e",
    Severity.CRITICAL: "#d62728",
}
SPAN_OPACITY = 0.13
MIN_SPAN_FRACTION = 0.004  # narrowest span drawn, as a fraction of the step range
_POINTS_PER_BAR = 200  # hover points along a timeline bar


def hover_text(finding: Finding) -> str:
    """Severity, detector, steps, message and action of ``finding``, as Plotly hover HTML."""

    def wrap(text: str) -> str:
        return "<br>".join(html.escape(line, quote=False) for line in textwrap.wrap(text, 90))

    steps = (
        f"step {finding.start_step}"
        if finding.start_step == finding.end_step
        else f"steps {finding.start_step}–{finding.end_step}"
    )
    return (
        f"<b>{str(finding.severity).upper()}</b> · {html.escape(finding.detector)} · {steps}"
        f"<br>{wrap(finding.message)}<br><i>→ {wrap(finding.action)}</i>"
    )


FINDINGS_TIMELINE_NEEDS = ()
"""No key: the timeline draws the findings it is given."""


def findings_timeline(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """One bar per finding over its steps, one lane per detector; ``None`` without findings."""
    if not findings:
        return None
    lanes = list(dict.fromkeys(f.detector for f in findings))
    shown: set[Severity] = set()
    traces = []
    for finding in sorted(findings, key=lambda f: (-f.severity, f.start_step)):
        traces.append(_bar(finding, legend=finding.severity not in shown))
        shown.add(finding.severity)
    height = min(0.25 + 0.13 * len(lanes), 1.0)
    return PanelPart(
        traces,
        "",
        "One bar per finding, coloured by severity; hover it for "
        "the message and the action. The span is shaded on every row.",
        height=height,
        y_axis={
            "type": "category",
            "categoryorder": "array",
            "categoryarray": lanes[::-1],
            "automargin": True,
            "fixedrange": True,
            "tickfont": {"size": 10},
        },
    )


def _bar(finding: Finding, *, legend: bool) -> go.Scatter:
    count = min(finding.end_step - finding.start_step + 1, _POINTS_PER_BAR)
    x = np.linspace(finding.start_step, finding.end_step, count)
    colour = SEVERITY_COLOURS[finding.severity]
    mode = "lines" if count > 1 else "markers"
    return go.Scatter(
        x=x,
        y=[finding.detector] * count,
        mode=mode,
        name=f"{finding.severity} finding",
        legendgroup=str(finding.severity),
        showlegend=legend,
        line={"color": colour, "width": 10},
        marker={"color": colour, "size": 12, "symbol": "diamond"},
        hovertemplate=hover_text(finding).replace("%{", "%\u200b{") + "<extra></extra>",
    )


def draw_spans(
    fig: go.Figure,
    findings: Sequence[Finding],
    extent: tuple[float, float],
    rows: Sequence[PanelPart],
) -> None:
    """Mark each finding's steps on every row.

    Line rows get a translucent fill behind the curves; heatmap rows only a
    dotted outline, so that their colours still read true.
    """
    for finding in findings:
        x0, x1 = _span(finding, extent)
        colour = SEVERITY_COLOURS[finding.severity]
        for row, part in enumerate(rows, start=1):
            suffix = "" if row == 1 else str(row)
            shape = {
                "type": "rect",
                "xref": f"x{suffix}",
                "yref": f"y{suffix} domain",
                "x0": x0,
                "x1": x1,
                "y0": 0,
                "y1": 1,
            }
            if any(isinstance(t, go.Heatmap) for t in part.traces):
                shape.update(line={"color": colour, "width": 1.5, "dash": "dot"}, layer="above")
            else:
                shape.update(
                    fillcolor=colour, opacity=SPAN_OPACITY, line={"width": 0}, layer="below"
                )
            fig.add_shape(shape)


def _span(finding: Finding, extent: tuple[float, float]) -> tuple[float, float]:
    """Steps covered by ``finding``, widened to stay visible on the whole step range."""
    least = max(extent[1] - extent[0], 1.0) * MIN_SPAN_FRACTION
    x0, x1 = finding.start_step - 0.5, finding.end_step + 0.5
    if x1 - x0 < least:
        mid = (x0 + x1) / 2
        x0, x1 = mid - least / 2, mid + least / 2
    return x0, x1


def title_marker(part: PanelPart, findings: Sequence[Finding]) -> str:
    """A coloured ⚠ (worst severity) when a finding's keys name one of ``part.keys``."""
    hits = [
        f.severity
        for f in findings
        if any(fnmatchcase(key, pattern) for pattern in f.keys for key in part.keys)
    ]
    if not hits:
        return ""
    return f"<span style='color:{SEVERITY_COLOURS[max(hits)]}'>⚠</span> "
