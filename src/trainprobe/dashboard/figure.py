"""Stack the panels into one figure (:func:`build`) and one offline page (:func:`to_html`)."""

from __future__ import annotations

import html
from collections.abc import Iterable

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run

from .conflict import cosine_matrix_figure
from .geometry import MARGIN, MENU_PAD_PX, TICK_FONT_PX, menu_y, plot_px, row_domains, top_margin
from .heatmaps import trace_steps
from .links import DIV_ID, EXTRA_ID, META_KEY, findings_block, findings_meta
from .marks import draw_spans, title_marker
from .panels import PANELS
from .parts import Panel, PanelPart

_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "modeBarButtonsToRemove": ["lasso2d", "select2d"],
    "toImageButtonOptions": {"format": "png", "scale": 2},
}


def build(run: Run, findings: Iterable[Finding] = (), *, title: str | None = None) -> go.Figure:
    """The dashboard of ``run``: every panel that has data, stacked over a shared step axis.

    Args:
        run: the run to show (read only).
        findings: detector results to mark (shaded spans, a timeline row, ⚠ on panel titles).
        title: the page title; default names the run directory.

    Returns:
        A ``go.Figure``; write it with :func:`to_html`. Nothing is written here.

    Raises:
        TypeError: ``run`` is not a ``Run``, a finding is not a ``Finding``, or
            ``title`` is not a str.
    """
    found = _check_inputs(run, findings, title)
    title = title if title is not None else f"trainprobe · {run.run_dir.name}"
    rows = [(panel, part) for panel in PANELS if (part := panel.draw(run, found)) is not None]
    if not rows:
        return _empty(run, title)
    parts = [part for _, part in rows]
    fig = make_subplots(
        rows=len(rows),
        cols=1,
        shared_xaxes=True,
        row_heights=[p.height for p in parts],
        vertical_spacing=0.0,  # the gaps are set by _set_domains
        subplot_titles=[_row_title(panel, part, found) for panel, part in rows],
    )
    _set_domains(fig, row_domains(parts))
    for row, (panel, part) in enumerate(rows, start=1):
        _place(fig, row, part, panel.name)
        if part.menu:
            titles = [_row_title(panel, part, found, item.description) for item in part.menu]
            _add_menu(fig, row, part, titles, plot_px(parts))
    draw_spans(fig, found, _extent(fig), parts)
    margin = {**MARGIN, "t": top_margin(parts)}
    _style(fig, title, plot_px(parts) + margin["t"] + margin["b"], rows=len(rows), margin=margin)
    axes = [fig.get_subplot(row, 1).yaxis.plotly_name for row in range(1, len(rows) + 1)]
    placed = [(panel, part, axis) for (panel, part), axis in zip(rows, axes, strict=True)]
    fig.update_layout(meta={META_KEY: findings_meta(placed, found)}, uirevision="trainprobe")
    return fig


def to_html(fig: go.Figure, *extra: go.Figure) -> str:
    """One self-contained HTML document (plotly.js embedded once, works offline): the list of
    findings with links to their evidence rows (when ``fig`` came from :func:`build` with
    findings), ``fig``, then each ``extra`` figure below it (e.g. :func:`extra_figures`).

    Raises:
        TypeError: a figure is not a ``go.Figure`` (make one with :func:`build`).
    """
    for figure in (fig, *extra):
        if not isinstance(figure, go.Figure):
            raise TypeError(
                f"to_html() needs a plotly go.Figure from dashboard.build(run), "
                f"got {type(figure).__name__}"
            )
    page = fig.to_html(
        include_plotlyjs=True, full_html=True, config=_CONFIG, default_width="100%", div_id=DIV_ID
    )
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    block = findings_block(meta.get(META_KEY) or {})
    if block:
        head, sep, tail = page.partition("<body>")
        page = f"{head}{sep}{block}{tail}"
    if not extra:
        return page
    divs = "".join(
        e.to_html(include_plotlyjs=False, full_html=False, config=_CONFIG, div_id=f"{EXTRA_ID}{i}")
        for i, e in enumerate(extra)
    )
    head, _, tail = page.rpartition("</body>")
    return f"{head}{divs}</body>{tail}"


def extra_figures(run: Run) -> list[go.Figure]:
    """Figures with no step axis, shown under the dashboard: the group cosine matrix with a
    step slider when the run has ``conflict/cos/*`` keys."""
    matrix = cosine_matrix_figure(run)
    return [] if matrix is None else [matrix]


def _check_inputs(run: object, findings: object, title: object) -> tuple[Finding, ...]:
    if not isinstance(run, Run):
        raise TypeError(
            f"build() needs a trainprobe.store.Run, got {type(run).__name__}; "
            "open the run directory first: build(Run(run_dir))"
        )
    if isinstance(findings, (str, bytes, Finding)) or not isinstance(findings, Iterable):
        raise TypeError(
            f"findings must be an iterable of Finding (e.g. the list the analysis "
            f"returns), got {type(findings).__name__}"
        )
    found = tuple(findings)
    for i, item in enumerate(found):
        if not isinstance(item, Finding):
            raise TypeError(
                f"findings[{i}] is a {type(item).__name__}, not a Finding; pass "
                "the detectors' Finding objects (Finding.to_dict() output won't do)"
            )
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, got {type(title).__name__}")
    return found


def _row_title(
    panel: Panel, part: PanelPart, findings: tuple[Finding, ...], description: str = ""
) -> str:
    """Marker, bold title and the one-line explanation (``description`` or the part's)."""
    return (
        f"{title_marker(part, findings)}<b>{html.escape(panel.title)}</b>   "
        f"<span style='font-size:11px;color:#666'>"
        f"{html.escape(description or part.description)}</span>"
    )


def _set_domains(fig: go.Figure, domains: list[tuple[float, float]]) -> None:
    """Give each row its y domain (:func:`.geometry.row_domains`) and stand its title line
    (the row's annotation, made by ``make_subplots``) on the row's top edge."""
    for row, (lo, hi) in enumerate(domains, start=1):
        fig.update_yaxes(domain=[lo, hi], row=row, col=1)
        fig.layout.annotations[row - 1].update(y=hi, yanchor="bottom")


def _place(fig: go.Figure, row: int, part: PanelPart, name: str) -> None:
    """Add a row's traces; its legend and colourbars go beside the row itself. Each trace
    gets the ``uid`` ``<panel>-<index>`` (plotly puts it in CSS selectors), stable while
    the run grows, so plotly keeps a user's legend choices across a live redraw."""
    lo, hi = fig.get_subplot(row, 1).yaxis.domain
    legend = "legend" if row == 1 else f"legend{row}"
    for index, trace in enumerate(part.traces):
        fig.add_trace(trace, row=row, col=1)
        added = fig.data[-1]
        added.uid = f"{name}-{index}"
        if isinstance(added, go.Heatmap):
            added.update(
                colorbar={
                    "x": 1.01,
                    "xanchor": "left",
                    "y": (lo + hi) / 2,
                    "yanchor": "middle",
                    "len": hi - lo,
                    "lenmode": "fraction",
                }
            )
        else:
            added.update(legend=legend)
    fig.update_layout(
        {
            legend: {
                "x": 1.01,
                "xanchor": "left",
                "y": hi,
                "yanchor": "top",
                "font": {"size": 11},
                "bgcolor": "rgba(255,255,255,0.6)",
            }
        }
    )
    axis = {"title": {"text": part.y_title, "font": {"size": 11}}, **part.y_axis}
    if part.y_log:
        axis["type"] = "log"
    fig.update_yaxes(axis, row=row, col=1)


def _add_menu(
    fig: go.Figure, row: int, part: PanelPart, titles: list[str], total_px: float
) -> None:
    """A drop-down at the row's right end, in the band above its title line (the row's
    traces are the figure's last; ``total_px``: the plot area's height, for the band's
    place, :func:`.geometry.menu_y`). Each choice shows its traces, hides the row's
    others, sets the row's y-axis (settings another choice made are reset) and its title
    line to ``titles[i]``."""
    y_name = fig.get_subplot(row, 1).yaxis.plotly_name  # "yaxis7"
    top = fig.get_subplot(row, 1).yaxis.domain[1]
    first = len(fig.data) - len(part.traces)
    indices = list(range(first, first + len(part.traces)))
    settings = {key for item in part.menu for key in item.y_axis}
    buttons = []
    for item, title in zip(part.menu, titles, strict=True):
        shown = set(item.traces)
        layout = {f"{y_name}.{key}": item.y_axis.get(key) for key in sorted(settings)}
        layout[f"{y_name}.title.text"] = item.y_title
        layout[f"annotations[{row - 1}].text"] = title  # row titles: the first annotations
        visible = [i in shown for i in range(len(part.traces))]
        buttons.append(
            {
                "label": item.label,
                "method": "update",
                "args": [{"visible": visible}, layout, indices],
            }
        )
    for i in set(range(len(part.traces))) - set(part.menu[0].traces):
        fig.data[first + i].visible = False
    menu = {
        "buttons": buttons,
        "direction": "down",
        "showactive": True,
        "active": 0,
        "x": 1.0,
        "xanchor": "right",
        "y": menu_y(top, total_px),
        "yanchor": "bottom",
        "pad": {"b": MENU_PAD_PX},
        "font": {"size": 11},
        "name": f"row {row}",
    }
    fig.update_layout(updatemenus=[*fig.layout.updatemenus, menu])


def _extent(fig: go.Figure) -> tuple[float, float]:
    """Smallest and largest step drawn."""
    xs = [x for t in fig.data if (x := trace_steps(t)).size]
    xs = np.concatenate(xs) if xs else np.zeros(1)
    return float(np.nanmin(xs)), float(np.nanmax(xs))


def _style(fig: go.Figure, title: str, height: int, *, rows: int, margin: dict) -> None:
    """Title lines, the shared step axis (numbered under every row: a tall page is read a
    screen at a time), the page's size and look."""
    for note in fig.layout.annotations:  # row titles: left-aligned above each row
        note.update(x=0, xanchor="left", font={"size": 13})
    fig.update_xaxes(
        showspikes=True,
        spikemode="across",
        spikesnap="cursor",
        spikethickness=1,
        spikecolor="#999",
        spikedash="solid",
        showticklabels=True,
        tickfont={"size": TICK_FONT_PX},
    )
    fig.update_xaxes(title_text="training step", row=rows, col=1)
    fig.update_layout(
        title={"text": html.escape(title), "x": 0.01},
        height=height,
        margin=margin,
        template="plotly_white",
        hovermode="x unified",
        font={"size": 12},
    )


def _families_read() -> list[str]:
    """``<family>/*`` of every key pattern a dedicated row reads, in row order (from the
    rows' declared ``needs``: ``scalars/*``, ``optim/*``, ``norms/*``, ...)."""
    patterns = (pattern for panel in PANELS for pattern in panel.needs if "/" in pattern)
    return list(dict.fromkeys(f"{pattern.split('/', 1)[0]}/*" for pattern in patterns))


def _empty(run: Run, title: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(
        text=f"{html.escape(str(run.run_dir))} has no data that any panel "
        f"reads yet ({', '.join(_families_read())})",
        showarrow=False,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
    )
    fig.update_layout(
        title={"text": html.escape(title), "x": 0.01},
        template="plotly_white",
        xaxis={"visible": False},
        yaxis={"visible": False},
        height=300,
    )
    return fig
