"""The dashboard's vertical layout: where each row, its title line and its menu go.

Top to bottom, a row takes its menu band (only a row with a menu), its title line (an
annotation standing on the row's top edge), the plot, and the step numbers under the plot,
which every row shows (a tall page is read a screen at a time, not from its last row).
Between two rows lie the upper row's step numbers and the lower row's title line and menu
band, each in a band of its own, so none covers another whatever the widths of their texts.
Sizes are in pixels here and turned into plotly's paper fractions (``0`` bottom, ``1`` top
of the plot area) by :func:`row_domains` and :func:`menu_y`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .parts import ROW_PX, PanelPart

MARGIN = {"l": 70, "r": 150, "t": 100, "b": 60}
"""The figure's margins (the first row's title line and menu stand in the top one)."""
TICK_FONT_PX = 11
"""The step numbers' font size."""
TICKS_PX = 22
"""Room under a plot for its step numbers (a line of :data:`TICK_FONT_PX` text)."""
CAPTION_PX = 22
"""Room above a plot for its title line (13 px bold title, 11 px explanation; one line)."""
GAP_PX = 58
"""Between two rows: the upper row's step numbers, the lower row's title line, and air."""
MENU_PAD_PX = 3
"""Between a menu and the title line under it."""
MENU_PX = 36
"""The extra room above a row with a menu: plotly draws a menu button at least 30 px tall,
plus :data:`MENU_PAD_PX` under it and some air above."""


def row_gaps(parts: Sequence[PanelPart]) -> list[int]:
    """Pixels above each row's plot, from the bottom of the row above (``0`` for the first
    row, whose title line and menu stand in the top margin)."""
    return [0] + [GAP_PX + (MENU_PX if part.menu else 0) for part in parts[1:]]


def plot_px(parts: Sequence[PanelPart]) -> int:
    """Height of the plot area (the figure less its margins): rows and the gaps between,
    in whole pixels."""
    return round(sum(part.height * ROW_PX for part in parts) + sum(row_gaps(parts)))


def top_margin(parts: Sequence[PanelPart]) -> int:
    """The top margin: :data:`MARGIN`'s, and :data:`MENU_PX` more when the first row has
    a menu."""
    return MARGIN["t"] + (MENU_PX if parts and parts[0].menu else 0)


def row_domains(parts: Sequence[PanelPart]) -> list[tuple[float, float]]:
    """Each row's ``(bottom, top)`` y domain in paper fractions, first row first: its
    height ``part.height * ROW_PX`` below its gap (:func:`row_gaps`)."""
    total = plot_px(parts)
    top, out = total, []
    for part, gap in zip(parts, row_gaps(parts), strict=True):
        top -= gap
        bottom = top - part.height * ROW_PX
        out.append((max(bottom, 0.0) / total, top / total))
        top = bottom
    return out


def menu_y(top: float, total_px: float) -> float:
    """Paper y for the bottom of a row's menu (``yanchor="bottom"``, ``pad.b =``
    :data:`MENU_PAD_PX`): above the title line on the row's ``top`` edge."""
    return top + CAPTION_PX / total_px
