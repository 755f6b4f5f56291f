"""Findings linked to the rows that carry their evidence.

:func:`build` stores, in the figure's ``layout.meta``, each row's y-axis and title and each
finding with the rows whose keys its ``keys`` name (:func:`findings_meta`). :func:`to_html`
turns that into a list of findings above the figure (:func:`findings_block`): every
finding with its steps, message and action, and one link per evidence row that scrolls to
the row and zooms every row to the finding's span. The page stays one offline file.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from trainprobe.analysis.findings import Finding

from .marks import SEVERITY_COLOURS
from .parts import Panel, PanelPart

META_KEY = "trainprobe"
DIV_ID = "trainprobe-dashboard"
"""The ``id`` of the dashboard's plot ``div`` in the page."""
EXTRA_ID = "trainprobe-extra-"
"""The ``id`` prefix of the extra figures' ``div`` (``trainprobe-extra-0``, ...)."""
_COLOURS = {str(severity): colour for severity, colour in SEVERITY_COLOURS.items()}
SPAN_MARGIN = 0.25
"""A link zooms to the finding's span widened by this fraction of it on each side."""


def linked_rows(finding: Finding, rows: Sequence[tuple[Panel, PanelPart]]) -> list[int]:
    """Indices of the rows whose keys one of ``finding.keys`` (patterns) names."""
    return [
        i
        for i, (_, part) in enumerate(rows)
        if any(fnmatchcase(key, pattern) for pattern in finding.keys for key in part.keys)
    ]


def findings_meta(
    rows: Sequence[tuple[Panel, PanelPart, str]], findings: Sequence[Finding]
) -> dict[str, Any]:
    """What the page needs to link findings to rows: ``rows`` as ``(panel, part, y-axis
    name)`` in figure order, and each finding with its linked row indices."""
    pairs = [(panel, part) for panel, part, _ in rows]
    listed = [{"name": panel.name, "title": panel.title, "axis": axis} for panel, _, axis in rows]
    return {
        "rows": listed,
        "findings": [{**_plain(f), "rows": linked_rows(f, pairs)} for f in findings],
    }


def findings_block(meta: Mapping[str, Any]) -> str:
    """The HTML list of findings with links to their rows ('' without findings)."""
    count, items = findings_items(meta)
    if not count:
        return ""
    return _BLOCK.format(count=count, items=items, div=DIV_ID, meta=META_KEY, margin=SPAN_MARGIN)


def findings_items(meta: Mapping[str, Any]) -> tuple[int, str]:
    """``(number of findings, their <li> items)``; a live page swaps them in
    (``trainprobe dashboard --serve``)."""
    findings = meta.get("findings") or []
    rows = meta.get("rows") or []
    timeline = next((i for i, row in enumerate(rows) if row["name"] == "findings"), None)
    items = []
    for f in findings:
        colour = _COLOURS.get(f["severity"], "#444")
        span = f"step {f['start']}" if f["start"] == f["end"] else f"steps {f['start']}–{f['end']}"
        targets = f["rows"] or ([timeline] if timeline is not None else [])
        links = ", ".join(
            f'<a href="#" data-row="{i}" data-x0="{f["start"]}" data-x1="{f["end"]}">'
            f"{html.escape(rows[i]['title'])}</a>"
            for i in targets
        )
        items.append(
            f'<li><b style="color:{colour}">{html.escape(f["severity"].upper())}</b> '
            f"{html.escape(f['detector'])} · {span}: {html.escape(f['message'])} "
            f"<i>→ {html.escape(f['action'])}</i>"
            + (f'<br><span class="tp-ev">evidence: {links}</span>' if links else "")
            + "</li>"
        )
    return len(findings), "\n".join(items)


def _plain(finding: Finding) -> dict[str, Any]:
    return {
        "detector": finding.detector,
        "severity": str(finding.severity),
        "start": int(finding.start_step),
        "end": int(finding.end_step),
        "message": finding.message,
        "action": finding.action,
    }


_BLOCK = """<details open id="tp-findings" style="font:13px sans-serif;margin:8px 16px">
<summary><b>Findings (<span id="tp-findings-count">{count}</span>)</b> · each link scrolls to
a row with the evidence and zooms every row to the finding's steps (double-click a plot to
zoom out)</summary>
<ul id="tp-findings-list" style="margin:6px 0;padding-left:20px;line-height:1.45">
{items}
</ul></details>
<script>
(function () {{
  document.getElementById("tp-findings").addEventListener("click", function (event) {{
    var link = event.target.closest("a[data-row]");
    if (!link) {{ return; }}
    event.preventDefault();
    var gd = document.getElementById("{div}");
    var layout = gd && gd._fullLayout;
    if (!layout || !window.Plotly) {{ return; }}
    var row = layout.meta["{meta}"].rows[+link.dataset.row];
    var axis = row && layout[row.axis];
    if (!axis) {{ return; }}
    var top = gd.getBoundingClientRect().top + window.scrollY + layout._size.t +
      (1 - axis.domain[1]) * layout._size.h - 48;
    window.scrollTo({{top: Math.max(top, 0), behavior: "smooth"}});
    var x0 = +link.dataset.x0, x1 = +link.dataset.x1;
    var pad = Math.max((x1 - x0) * {margin}, 1);
    Plotly.relayout(gd, {{"xaxis.range": [x0 - pad, x1 + pad]}});
  }});
}})();
</script>
"""
