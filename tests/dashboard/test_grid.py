"""Dashboard heatmap grids: alignment, display binning, log ticks, labels, large runs."""

from __future__ import annotations

import warnings

import numpy as np
import plotly.graph_objects as go
import pytest

from tests.synth import write_run
from trainprobe.dashboard import build
from trainprobe.dashboard.grid import (
    MAX_CELLS,
    MAX_COLUMNS,
    MIN_COLUMNS,
    bin_columns,
    column_budget,
    layer_matrix,
    log_ticks,
    ordered_layers,
    real_label,
    safe_log10,
    short_names,
)
from trainprobe.store import Run, Series


def test_layer_matrix_aligns_on_union_of_steps():
    a = Series("k/a", np.array([0, 10, 20]), np.array([1.0, 2.0, 3.0]))
    b = Series("k/b", np.array([10, 30]), np.array([5.0, 6.0]))
    steps, values = layer_matrix([a, b])
    np.testing.assert_array_equal(steps, [0, 10, 20, 30])
    np.testing.assert_array_equal(values, [[1, 2, 3, np.nan], [np.nan, 5, np.nan, 6]])


def test_bin_columns_averages_finite_values():
    steps = np.arange(10)
    values = np.arange(20, dtype=float).reshape(2, 10)
    values[1, 3:6] = np.nan
    x, binned, width = bin_columns(steps, values, max_columns=4)
    assert width == 3 and binned.shape == (2, 4)
    np.testing.assert_allclose(x, [1, 4, 7, 9])
    np.testing.assert_allclose(binned[0], [1, 4, 7, 9])
    assert np.isnan(binned[1, 1]) and binned[1, 3] == 19


def test_bin_columns_leaves_small_grids_alone():
    values = np.ones((3, 5))
    x, binned, width = bin_columns(np.arange(5), values)
    np.testing.assert_array_equal(x, np.arange(5))
    assert width == 1 and binned is values


def test_safe_log10_masks_non_positive_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = safe_log10(np.array([100.0, 0.0, -1.0, np.nan, np.inf]))
    assert out[0] == 2 and np.isnan(out[1:]).all()


def test_log_ticks_label_real_values():
    vals, text = log_ticks(-4.3, -0.7)
    assert vals == [-4.0, -3.0, -2.0, -1.0] and text == ["1e-4", "1e-3", "0.01", "0.1"]
    vals, text = log_ticks(np.log10(0.15), np.log10(0.9))
    assert text == ["0.2", "0.5"]
    assert real_label(np.log10(2.5e-5)) == "2.5e-5" and real_label(3.0) == "1000"


def test_short_names_keep_what_differs():
    assert short_names(["features.0.weight", "features.0.bias"]) == (
        "",
        ["features.0.weight", "features.0.bias"],
    )
    prefix, labels = short_names(
        [
            "model.encoder.layers.3.block.sublayer_2.linear_projection.weight",
            "model.encoder.layers.13.block.sublayer_2.linear_projection.bias",
        ]
    )
    assert prefix == "model.encoder.layers."
    assert labels == ["3.block.sublayer_2.line.weight", "13.block.sublayer_2.line.bias"]
    _, labels = short_names(["bert.encoder.layer.11.attention.output.dense.weight", "cls.w"])
    assert labels[0].startswith("…") and "11" in labels[0] and len(labels[0]) <= 36


def test_ordered_layers_follow_model_params(tmp_path):
    run = write_run(
        tmp_path / "r",
        {f"norms/grad/{n}": ([0], [1.0]) for n in "cab"},
        meta={"model": {"params": ["a", "b", "c"]}},
    )
    assert run.layers("norms/grad") == ["c", "a", "b"]
    assert ordered_layers(run, "norms/grad") == ["a", "b", "c"]


def test_ordered_layers_ask_the_run_for_param_names(tmp_path, monkeypatch):
    run = write_run(tmp_path / "r", {f"norms/grad/{n}": ([0], [1.0]) for n in "cabd"})
    assert ordered_layers(run, "norms/grad") == ["c", "a", "b", "d"]  # no names: recorded
    monkeypatch.setattr(Run, "param_names", lambda self: ["b", "a", "c", "z"])
    assert ordered_layers(run, "norms/grad") == ["b", "a", "c", "d"]  # unlisted d goes last


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    steps, layers = 10_000, 200
    rng = np.random.default_rng(0)
    series = {
        f"norms/grad/blocks.{i}.mlp.weight": (np.arange(steps), 1 + rng.random(steps))
        for i in range(layers)
    }
    run = write_run(tmp_path_factory.mktemp("big") / "r", series)
    yield run
    run.close()


def test_large_heatmap_is_binned_for_display(big_run):
    fig = build(big_run)
    trace, last = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert trace.z.shape[0] == 200 and (trace.z.shape[1] + 1) * 200 <= MAX_CELLS
    assert "mean of 13" in trace.hovertemplate  # ceil(10,000 / (160,000 / 200))
    assert "mean of 3" in last.hovertemplate  # 10,000 = 769 x 13 + 3: a shorter last bin
    assert last.x0 == 9998.0 and last.dx == 3.0
    stored = big_run.series("norms/grad/blocks.0.mlp.weight").values
    np.testing.assert_allclose(trace.customdata[0, 0], stored[:13].mean(), rtol=1e-6)
    assert len(big_run.series("norms/grad/blocks.0.mlp.weight")) == 10_000  # store untouched


def test_column_budget_bounds_cells_per_heatmap():
    assert column_budget(1) == MAX_COLUMNS
    assert column_budget(200) == MAX_CELLS // 200 < MAX_COLUMNS
    assert column_budget(10_000) == MIN_COLUMNS
    values = np.ones((200, 10_000))
    x, binned, width = bin_columns(np.arange(10_000), values)
    assert binned.shape == (200, x.size) and x.size * 200 <= MAX_CELLS
    assert width == -(-10_000 // column_budget(200))
