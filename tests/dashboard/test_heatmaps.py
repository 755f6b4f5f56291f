"""Dashboard heatmap colours: the update-ratio scale around the healthy ratio, zeros, sizes."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest

from tests.synth import write_run
from trainprobe.dashboard import build
from trainprobe.dashboard.parts import HEALTHY_UPDATE_RATIO

STEPS = np.arange(0, 100, 10)


def heatmap(fig: go.Figure, label: str) -> go.Heatmap:
    (trace,) = [t for t in fig.data if isinstance(t, go.Heatmap) and t.colorbar.title.text == label]
    return trace


def colour_position(trace: go.Heatmap, value: float) -> float:
    """Where ``value`` falls on the colour scale: 0 bottom, 0.5 middle, 1 top."""
    return (math.log10(value) - trace.zmin) / (trace.zmax - trace.zmin)


def test_healthy_update_ratios_stay_near_white(tmp_path):
    rng = np.random.default_rng(0)
    ratios = {
        f"updates/ratio/l{i}": (STEPS, 1e-3 * (1 + 0.2 * rng.random(STEPS.size))) for i in range(3)
    }
    ratios["updates/ratio/l0"][1][:2] = [1.0e-3, 1.2e-3]
    trace = heatmap(build(write_run(tmp_path / "r", ratios)), "update ratio")
    centre = math.log10(HEALTHY_UPDATE_RATIO)
    assert (trace.zmin + trace.zmax) / 2 == pytest.approx(centre)
    assert trace.zmax - centre >= 2 and centre - trace.zmin >= 2
    assert 0.5 <= colour_position(trace, 1.2e-3) < 0.52  # near white, not deep red
    assert "1e-3" in trace.colorbar.ticktext


def test_update_ratio_scale_widens_symmetrically_for_wild_ratios(tmp_path):
    ratios = {
        "updates/ratio/a": (STEPS, np.full(STEPS.size, 0.5)),
        "updates/ratio/b": (STEPS, np.full(STEPS.size, 1e-4)),
    }
    trace = heatmap(build(write_run(tmp_path / "r", ratios)), "update ratio")
    half = math.log10(0.5) - math.log10(HEALTHY_UPDATE_RATIO)
    assert (trace.zmin, trace.zmax) == pytest.approx((-3 - half, -3 + half))


def test_reference_line_and_heatmap_centre_share_the_constant(tmp_path):
    run = write_run(
        tmp_path / "r",
        {
            "updates/ratio_total": (STEPS, np.full(STEPS.size, 0.1)),
            "updates/ratio/a": (STEPS, np.full(STEPS.size, 0.1)),
        },
    )
    fig = build(run)
    (line,) = [t for t in fig.data if isinstance(t, go.Scatter) and "typical" in t.name]
    assert list(line.y) == [HEALTHY_UPDATE_RATIO] * 2 and line.name == "ratio 1e-3 (typical)"
    trace = heatmap(fig, "update ratio")
    assert (trace.zmin + trace.zmax) / 2 == pytest.approx(math.log10(HEALTHY_UPDATE_RATIO))


@pytest.fixture
def zero_run(tmp_path):
    live = 1e-2 * (1 + np.arange(STEPS.size))
    with_zero = live.copy()
    with_zero[3] = 0.0
    gap = live.copy()
    gap[5] = np.nan
    series = {
        "norms/grad/live": (STEPS, live),
        "norms/grad/dead": (STEPS, np.zeros(STEPS.size)),
        "norms/grad/once": (STEPS, with_zero),
        "norms/grad/gap": (STEPS, gap),
    }
    run = write_run(tmp_path / "r", series)
    yield run
    run.close()


def test_zero_gradients_sit_on_the_colour_floor(zero_run):
    trace = heatmap(build(zero_run), "grad norm")
    rows = dict(zip(trace.y, range(len(trace.y)), strict=True))
    z, real = np.asarray(trace.z), np.asarray(trace.customdata)
    np.testing.assert_allclose(z[rows["dead"]], trace.zmin, rtol=1e-6)
    assert z[rows["once"], 3] == pytest.approx(trace.zmin) and real[rows["once"], 3] == 0
    assert (real[rows["dead"]] == 0).all() and "%{customdata" in trace.hovertemplate
    assert trace.zmin == pytest.approx(math.log10(1e-2) - 1)  # a decade below the least value
    assert np.isnan(z[rows["gap"], 5]) and np.isnan(real[rows["gap"], 5])  # NaN stays a gap
    assert trace.hoverongaps is False
    assert trace.colorbar.tickvals[0] == trace.zmin and trace.colorbar.ticktext[0] == "0"


@pytest.mark.parametrize(
    ("key", "label"), [("norms/grad/w", "grad norm"), ("updates/ratio/w", "update ratio")]
)
def test_all_zero_heatmap_is_drawn(tmp_path, key, label):
    fig = build(write_run(tmp_path / "r", {key: (STEPS, np.zeros(STEPS.size))}))
    trace = heatmap(fig, label)
    np.testing.assert_allclose(trace.z, trace.zmin, rtol=1e-6)
    assert trace.colorbar.ticktext[0] == "0"


def test_heatmap_data_is_float32(zero_run):
    trace = heatmap(build(zero_run), "grad norm")
    assert trace.z.dtype == np.float32 and trace.customdata.dtype == np.float32


def test_column_axis_puts_every_column_at_its_own_step():
    from trainprobe.dashboard.heatmaps import column_axis

    assert column_axis(np.array([5.0, 15.0, 25.0, 35.0])) == ({"x0": 5.0, "dx": 10.0}, None)
    # a last step off the schedule: its own column, from the grid's last edge (30) to 40
    assert column_axis(np.array([0.0, 10.0, 20.0, 35.0])) == (
        {"x0": 0.0, "dx": 10.0},
        {"x0": 35.0, "dx": 20.0},
    )
    uneven = np.array([1.0, 2.0, 4.0, 8.0])  # a log-spaced schedule keeps its real steps
    head, tail = column_axis(uneven)
    np.testing.assert_array_equal(head["x"], uneven)
    assert tail is None
    head, tail = column_axis(np.array([0.0, 10.0, 20.0, 24.0]))  # too close to fit a cell
    assert "x" in head and tail is None
    assert column_axis(np.array([7.0])) == ({"x0": 7.0, "dx": 1.0}, None)


def test_a_shorter_last_bin_is_drawn_at_its_own_steps(tmp_path):
    """10 steps in bins of 4: [0-3], [4-7] on the grid, and [8-9] as a column of its own,
    centred on 8.5, spanning 7.5-9.5, with its own 'mean of 2' hover."""
    from trainprobe.dashboard.heatmaps import HeatStyle, heatmap_trace, trace_steps

    values = np.arange(20.0).reshape(2, 10) + 1
    traces, width = heatmap_trace(np.arange(10), values, ["a", "b"], HeatStyle("v"), max_columns=3)
    assert width == 4 and len(traces) == 2
    head, tail = traces
    np.testing.assert_array_equal(trace_steps(head), [1.5, 5.5])
    np.testing.assert_array_equal(trace_steps(tail), [8.5])
    assert tail.dx == 2.0 and tail.showscale is False
    assert "mean of 4" in head.hovertemplate and "mean of 2" in tail.hovertemplate
    np.testing.assert_allclose(tail.customdata[:, 0], values[:, 8:].mean(axis=1))
    assert head.zmin == tail.zmin and head.zmax == tail.zmax  # one colour scale
