"""Dashboard layout, read from the figure's layout coordinates: log rows carry readable
ticks whatever their range, every row numbers its steps, and no menu covers a title line.

Pixel sizes of text are estimated from the font sizes the layout sets (plotly draws a
line of text about 1.3 em tall); the browser test measures the drawn page itself
(``test_browser.test_drawn_rows_are_labelled_and_nothing_covers_a_title_line``).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from tests.synth import PARAMS, full_series, write_run
from trainprobe.dashboard import build
from trainprobe.dashboard.grid import axis_log_ticks, number_label

MENU_MIN_PX = 30
"""plotly.js draws an updatemenu button at least 30 px tall (``updatemenus/constants.js``,
``minHeight``); the menus here hold one line of 11 px text, so 30 px it is."""
LINE_EM = 1.5
"""Height of a line of text, in font sizes (plotly: 1.3 em, and a little padding)."""


def decade_loss(lo: float = 0.3, hi: float = 0.9, steps: int = 200):
    """A loss falling from ``hi`` to ``lo``: within one decade when ``hi < 10 lo``."""
    s = np.arange(steps)
    return s, hi - (hi - lo) * s / (steps - 1)


def row_axes(fig: go.Figure) -> list[tuple[str, str]]:
    """``(xaxis name, yaxis name)`` of each row, top row first."""
    names = [k for k in fig.layout if k.startswith("yaxis")]
    names.sort(key=lambda k: -fig.layout[k].domain[1])
    return [(f"xaxis{k.removeprefix('yaxis')}", k) for k in names]


def plot_height(fig: go.Figure) -> float:
    """Pixels of the plot area: the figure less its top and bottom margins."""
    return fig.layout.height - fig.layout.margin.t - fig.layout.margin.b


def y_data(fig: go.Figure, y_name: str, visible_only: bool = True) -> np.ndarray:
    """Finite positive y values of the scatter traces drawn on ``y_name``."""
    ref = "y" + y_name.removeprefix("yaxis")
    values = [
        np.asarray(t.y, dtype=float)
        for t in fig.data
        if isinstance(t, go.Scatter)
        and (t.yaxis or "y") == ref
        and not (visible_only and t.visible is False)
        and t.y is not None
    ]
    values = np.concatenate(values) if values else np.zeros(0)
    return values[np.isfinite(values) & (values > 0)]


def assert_labelled_log_axis(axis, values: np.ndarray, where: str) -> None:
    """Ticks of our choosing, three or more, inside the data and labelled with their
    values; or none, where plotly's decade labels give three or more."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= hi * 1e-9:  # a constant: plotly's autorange is the decade either side
        lo, hi = lo / 10, hi * 10
    if axis.tickvals is None:
        decades = [d for d in range(-30, 31) if lo <= 10.0**d <= hi]
        assert len(decades) >= 3, f"{where}: {lo:.3g}..{hi:.3g} has plotly's labels {decades}"
        return
    vals, text = list(axis.tickvals), list(axis.ticktext)
    assert axis.tickmode == "array", where
    assert len(vals) >= 3, f"{where}: {vals}"
    assert all(lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9) for v in vals), (where, lo, hi, vals)
    assert [float(t) for t in text] == pytest.approx(vals), where  # each reads as its value
    assert len(set(text)) == len(text), where


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0.3, 0.9), (0.45, 0.55), (1.62, 1.68), (0.05, 3.0), (2e-5, 7e-5), (150.0, 900.0)],
)
def test_log_row_within_a_decade_or_two_is_labelled_inside_its_range(tmp_path, lo, hi):
    steps, loss = decade_loss(lo, hi)
    run = write_run(tmp_path / "r", {"scalars/loss": (steps, loss)})
    fig = build(run)
    ((_, y_name),) = row_axes(fig)
    axis = fig.layout[y_name]
    assert axis.type == "log"
    assert axis.tickvals is not None and len(axis.tickvals) >= 3
    assert_labelled_log_axis(axis, y_data(fig, y_name), "loss row")


def test_every_log_row_of_a_full_dashboard_is_labelled(tmp_path):
    series = full_series()
    series["scalars/loss"] = decade_loss()
    series["norms/grad_total"] = decade_loss(1.2, 1.9, steps=400)
    for i in range(3):  # a catch-all family on a log axis, spanning two decades
        series[f"extra/spread/k{i}"] = decade_loss(0.02 * (i + 1), 3.0)
    run = write_run(tmp_path / "r", series, meta={"model": {"params": PARAMS}})
    fig = build(run)
    logs = [y for _, y in row_axes(fig) if fig.layout[y].type == "log"]
    assert len(logs) >= 4
    for y_name in logs:
        values = y_data(fig, y_name)
        if values.size:  # a log heatmap row has no scatter values: its own axis labels
            assert_labelled_log_axis(fig.layout[y_name], values, y_name)
    # the catch-all row's menu sets each family's log ticks when it is chosen
    (menu,) = fig.layout.updatemenus
    checked = 0
    for button in menu.buttons:
        settings = button.args[1]
        y_name = next(k for k in settings if k.endswith(".type")).split(".")[0]
        if settings[f"{y_name}.type"] != "log":
            continue
        shown = [i for i, v in zip(button.args[2], button.args[0]["visible"], strict=True) if v]
        values = np.concatenate([np.asarray(fig.data[i].y, dtype=float) for i in shown])
        axis = go.layout.YAxis(
            tickmode=settings[f"{y_name}.tickmode"],
            tickvals=settings[f"{y_name}.tickvals"],
            ticktext=settings[f"{y_name}.ticktext"],
        )
        assert_labelled_log_axis(axis, values[np.isfinite(values)], button.label)
        checked += 1
    assert checked >= 1


def test_axis_log_ticks_choose_decades_125_or_even_steps():
    assert axis_log_ticks(1e-3, 1e3) is None  # plotly's own decade labels
    assert axis_log_ticks(0.15, 15.0) == (
        [0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
        ["0.2", "0.5", "1", "2", "5", "10"],
    )
    assert axis_log_ticks(0.3, 0.9) == ([0.4, 0.6, 0.8], ["0.4", "0.6", "0.8"])
    vals, text = axis_log_ticks(1.62, 1.68)
    assert 3 <= len(vals) <= 8 and text[0] == "1.62" and all(1.62 <= v <= 1.68 for v in vals)
    vals, _ = axis_log_ticks(0.7, 0.7)  # a constant: the decade either side, as autorange
    assert vals[0] >= 0.07 and vals[-1] <= 7.0 and len(vals) >= 3
    for lo, hi in [(1.0, 1.0001), (3e-9, 5e-9), (12345.0, 12999.0), (0.011, 0.099)]:
        vals, text = axis_log_ticks(lo, hi)
        assert 3 <= len(vals) <= 8 and all(lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9) for v in vals)
        assert [float(t) for t in text] == pytest.approx(vals) and len(set(text)) == len(text)
    assert [number_label(v) for v in (1e-3, 2.5e-5, 1500.0, 1.2e4, 0.01)] == [
        "1e-3",
        "2.5e-5",
        "1500",
        "1.2e4",
        "0.01",
    ]
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        axis_log_ticks(0.0, 1.0)
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        axis_log_ticks(2.0, 1.0)


@pytest.fixture(scope="module")
def tall_fig(tmp_path_factory):
    """A page of many rows, the catch-all (with its menu) last."""
    series = full_series()
    series["scalars/loss"] = decade_loss(steps=400)
    for i in range(3):
        series[f"probe{i}/value"] = decade_loss(1.0 + i, 2.0 + i)
    run = write_run(
        tmp_path_factory.mktemp("tall") / "r", series, meta={"model": {"params": PARAMS}}
    )
    fig = build(run)
    run.close()
    return fig


def caption_bands(fig: go.Figure) -> list[tuple[float, float, str]]:
    """``(bottom, top, text)`` in pixels above the plot area's bottom, of each row's title
    line (an annotation standing on its row's top edge)."""
    plot, out = plot_height(fig), []
    for note in fig.layout.annotations:
        assert note.yref == "paper" and note.yanchor == "bottom"
        size = note.font.size or fig.layout.font.size
        out.append((note.y * plot, note.y * plot + LINE_EM * size, note.text))
    return out


def tick_bands(fig: go.Figure) -> list[tuple[float, float, str]]:
    """``(bottom, top, x axis)`` in pixels of each row's step numbers, under its plot."""
    plot, out = plot_height(fig), []
    for x_name, y_name in row_axes(fig):
        size = fig.layout[x_name].tickfont.size or fig.layout.font.size
        bottom = fig.layout[y_name].domain[0] * plot
        out.append((bottom - 2 * size, bottom, x_name))  # a line of text and its offset
    return out


def overlap(a: tuple[float, float, str], b: tuple[float, float, str]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_tall_page_numbers_the_steps_under_every_row(tall_fig):
    rows = row_axes(tall_fig)
    assert len(rows) >= 30
    hidden = [x for x, _ in rows if tall_fig.layout[x].showticklabels is False]
    assert hidden == []
    assert all(tall_fig.layout[x].showticklabels for x, _ in rows)
    # the step numbers under a row leave room for the next row's title line
    ticks, captions = tick_bands(tall_fig), caption_bands(tall_fig)
    assert len(ticks) == len(captions) == len(rows)
    for above, below in zip(ticks[:-1], captions[1:], strict=True):
        assert not overlap(above, below), (above, below[2][:40])


def menu_bands(fig: go.Figure) -> list[tuple[float, float, str]]:
    """``(bottom, top, name)`` in pixels above the plot area's bottom, of each menu's box."""
    plot, out = plot_height(fig), []
    for menu in fig.layout.updatemenus:
        assert menu.direction == "down"  # menus are placed in paper coordinates
        if menu.yanchor == "bottom":
            bottom = menu.y * plot + (menu.pad.b or 0)
            out.append((bottom, bottom + MENU_MIN_PX, menu.name))
        else:
            top = menu.y * plot - (menu.pad.t or 0)
            out.append((top - MENU_MIN_PX, top, menu.name))
    return out


def assert_menus_cover_nothing(fig: go.Figure) -> None:
    menus = menu_bands(fig)
    assert menus
    plot = plot_height(fig)
    plots = [
        (fig.layout[y].domain[0] * plot, fig.layout[y].domain[1] * plot, y)
        for _, y in row_axes(fig)
    ]
    for menu in menus:
        for caption in caption_bands(fig):
            assert not overlap(menu, caption), (menu, caption[2][:50])
        for ticks in tick_bands(fig):
            assert not overlap(menu, ticks), (menu, ticks)
        for area in plots:
            assert not overlap(menu, area), (menu, area)
        # inside the figure, under the page title (its baseline halfway down the top margin)
        title = (fig.layout.title.font.size or 1.4 * fig.layout.font.size) * 0.3
        assert menu[1] <= plot + fig.layout.margin.t / 2 - title, menu


def test_last_row_menu_stands_clear_of_the_title_lines(tall_fig):
    assert_menus_cover_nothing(tall_fig)
    (menu,) = tall_fig.layout.updatemenus
    top = tall_fig.layout[row_axes(tall_fig)[-1][1]].domain[1]
    assert menu.y > top  # above its own row's title line, not on it


def test_first_row_menu_stands_in_the_top_margin(tmp_path):
    steps, values = decade_loss()
    run = write_run(tmp_path / "r", {"misc/a": (steps, values), "other/b": (steps, values)})
    fig = build(run)
    assert len(row_axes(fig)) == 1 and len(fig.layout.updatemenus) == 1
    assert_menus_cover_nothing(fig)
