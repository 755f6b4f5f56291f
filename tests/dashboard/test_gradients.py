"""Dashboard gradient-structure panels: conflict, cosine matrix, gradient spectra, noise scale,
weight spectral norms."""

from __future__ import annotations

import fnmatch

import numpy as np
import plotly.graph_objects as go
import pytest

import trainprobe.dashboard.figure as figure
from tests.synth import GRADIENT_PARAMS as PARAMS
from tests.synth import GRADIENT_STEPS as STEPS
from tests.synth import GROUPS, PAIRS, gradient_series, pair_cosines, write_run
from trainprobe.dashboard import build, to_html
from trainprobe.dashboard.conflict import (
    COSINE_COLOURS,
    conflict_heatmap_panel,
    cosine_matrices,
    cosine_matrix_figure,
    cosine_matrix_panel,
)
from trainprobe.dashboard.gradients import (
    MAX_LAYER_LINES,
    NOISE_WINDOW,
    noise_scale_panel,
    slow_ratio_panel,
    smoothed_noise_scale,
    stable_rank_heatmap_panel,
    weight_spectral_norm_panel,
)
from trainprobe.dashboard.grid import MAX_COLUMNS
from trainprobe.dashboard.groups import group_loss_panel
from trainprobe.dashboard.heatmaps import trace_steps
from trainprobe.dashboard.panels import GRADIENT_PANELS
from trainprobe.store import Run, Series

FUNCS = (
    conflict_heatmap_panel,
    cosine_matrix_panel,
    stable_rank_heatmap_panel,
    slow_ratio_panel,
    noise_scale_panel,
    weight_spectral_norm_panel,
)
TITLES = tuple(panel.title for panel in GRADIENT_PANELS)


@pytest.fixture(scope="module")
def grad_run(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("grad") / "r", gradient_series())
    yield run
    run.close()


@pytest.fixture
def spliced():
    """The gradient rows are registered in PANELS (after the per-parameter heatmaps)."""
    assert all(panel in figure.PANELS for panel in GRADIENT_PANELS)


def stored(run: Run, key: str) -> np.ndarray:
    return run.series(key).values


def test_no_keys_no_panels(tmp_path):
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, np.ones(STEPS.size))})
    for func in FUNCS:
        assert func(run, ()) is None, func.__name__
    assert cosine_matrix_figure(run) is None
    groups, steps, matrices = cosine_matrices(run)
    assert groups == [] and steps.size == 0 and matrices.shape == (0, 0, 0)


def test_pair_heatmap_values_on_a_fixed_zero_white_scale(grad_run):
    part = conflict_heatmap_panel(grad_run, ())
    (heat,) = part.traces
    assert list(heat.y) == [f"{a} · {b}" for a, b in PAIRS]
    for row, (a, b) in enumerate(PAIRS):
        np.testing.assert_allclose(
            heat.z[row], stored(grad_run, f"conflict/cos/{a}__{b}"), rtol=1e-6
        )
    np.testing.assert_array_equal(trace_steps(heat), STEPS)
    assert (heat.zmin, heat.zmax) == (-1.0, 1.0)  # the data only reach -0.7 and 0.6
    assert dict(map(tuple, COSINE_COLOURS))[0.5] == "#ffffff"  # zero is white
    assert COSINE_COLOURS[0][1] != COSINE_COLOURS[-1][1]
    for field in ("%{y}", "step %{x", "cosine %{z"):
        assert field in heat.hovertemplate
    assert set(part.keys) == {f"conflict/cos/{a}__{b}" for a, b in PAIRS}


def test_cosine_matrix_is_symmetric_with_unit_diagonal(grad_run):
    groups, steps, matrices = cosine_matrices(grad_run)
    assert groups == list(GROUPS)
    np.testing.assert_array_equal(steps, STEPS)
    assert matrices.shape == (STEPS.size, 3, 3)
    np.testing.assert_array_equal(matrices, matrices.transpose(0, 2, 1))  # NaN == NaN here
    np.testing.assert_array_equal(matrices[:, [0, 1, 2], [0, 1, 2]], 1.0)
    cos = pair_cosines(STEPS.size)
    for (a, b), values in cos.items():
        np.testing.assert_allclose(matrices[:, GROUPS.index(a), GROUPS.index(b)], values)
    assert np.isnan(matrices[3, 1, 2]) and np.isnan(matrices[3, 2, 1])


def test_worst_partner_row_is_the_matrix_row_minimum(grad_run):
    (heat,) = cosine_matrix_panel(grad_run, ()).traces
    _, _, matrices = cosine_matrices(grad_run)
    off = np.where(np.eye(3, dtype=bool), np.nan, matrices)  # [T, G, G]
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), np.nanmin(off, axis=2).T, rtol=1e-6)
    partners = np.asarray(heat.customdata)
    expected = np.array(GROUPS)[np.argmin(np.where(np.isnan(off), np.inf, off), axis=2)].T
    np.testing.assert_array_equal(partners, expected)
    assert partners[1, 3] == "class_0" and partners[2, 3] == "class_0"  # 1·2 is NaN at t = 3
    assert partners[2, -1] == "class_0" and heat.z[2][-1] < 0  # class 2 turned against 0
    assert (heat.zmin, heat.zmax) == (-1.0, 1.0) and "worst partner" in heat.hovertemplate


def test_worst_partner_needs_three_groups(tmp_path):
    run = write_run(tmp_path / "r", {"conflict/cos/task_a__task_b": (STEPS, np.zeros(30))})
    assert cosine_matrix_panel(run, ()) is None
    assert list(conflict_heatmap_panel(run, ()).traces[0].y) == ["task_a · task_b"]


def test_matrix_figure_has_a_slider_starting_at_the_last_step(grad_run):
    fig = cosine_matrix_figure(grad_run)
    _, steps, matrices = cosine_matrices(grad_run)
    (slider,) = fig.layout.sliders
    assert len(slider.steps) == steps.size and slider.active == steps.size - 1
    assert [s.label for s in slider.steps] == [str(s) for s in steps]
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), matrices[-1])
    np.testing.assert_allclose(
        np.asarray(slider.steps[4].args[0]["z"][0], dtype=float), matrices[4]
    )
    assert (fig.data[0].zmin, fig.data[0].zmax) == (-1.0, 1.0)


def test_many_steps_are_binned_for_display(tmp_path):
    steps = np.arange(4 * MAX_COLUMNS)
    run = write_run(
        tmp_path / "r",
        {f"conflict/cos/{a}__{b}": (steps, np.sin(steps + i)) for i, (a, b) in enumerate(PAIRS)},
    )
    for func in (conflict_heatmap_panel, cosine_matrix_panel):
        part = func(run, ())
        assert len(trace_steps(part.traces[0])) <= MAX_COLUMNS
        assert "means of 4 steps" in part.description
        assert "mean of 4" in part.traces[0].hovertemplate


def test_stable_rank_heatmap_is_log10_of_the_stored_ranks(grad_run):
    part = stable_rank_heatmap_panel(grad_run, ())
    (heat,) = part.traces
    assert list(heat.y) == list(PARAMS)
    for row, name in enumerate(PARAMS):
        values = stored(grad_run, f"grad_spectrum/stable_rank/{name}")
        np.testing.assert_allclose(heat.z[row], np.log10(values), rtol=1e-5)
        np.testing.assert_allclose(heat.customdata[row], values, rtol=1e-6)
    assert "10" in heat.colorbar.ticktext and heat.colorbar.title.text == "stable rank"


def test_slow_ratio_draws_every_layer_and_their_median(grad_run):
    part = slow_ratio_panel(grad_run, ())
    *layers, median = part.traces
    assert [t.name for t in layers] == [f"slow · {p}" for p in PARAMS]
    assert median.name == "median over layers"
    np.testing.assert_allclose(layers[1].y, 0.4)  # the second layer's stored ratio
    np.testing.assert_allclose(median.y, np.full(STEPS.size, 0.4))
    assert median.line.width > layers[0].line.width
    assert list(part.y_axis["range"]) == [-0.03, 1.03] and not part.y_log


def test_many_layers_keep_the_extremes_and_the_median(tmp_path):
    names = [f"blocks.{i}.mlp.weight" for i in range(12)]
    ratios = {name: 0.05 + 0.07 * i for i, name in enumerate(names)}
    ratios[names[0]] = np.nan  # never finite: ranked lowest, still drawn
    run = write_run(
        tmp_path / "r",
        {f"grad_spectrum/slow_ratio/{n}": (STEPS, np.full(30, r)) for n, r in ratios.items()},
    )
    part = slow_ratio_panel(run, ())
    *layers, median = part.traces
    half = MAX_LAYER_LINES // 2
    assert [t.name for t in layers] == [f"slow · {n}" for n in (*names[:half], *names[-half:])]
    np.testing.assert_allclose(median.y, np.median([r for r in ratios.values() if r == r]))
    assert "4 highest and 4 lowest of 12 by mean" in part.description
    assert layers[-1].hovertemplate.startswith("blocks.11.mlp.weight: %{y")


def test_weight_spectral_norm_has_a_dotted_line_at_one(grad_run):
    part = weight_spectral_norm_panel(grad_run, ())
    *layers, one = part.traces
    assert [t.name for t in layers] == [f"σ_0 · {p}" for p in PARAMS]  # no median
    norm = stored(grad_run, f"weight_spectrum/spectral_norm/{PARAMS[2]}")
    np.testing.assert_allclose(layers[2].y, norm)
    assert list(one.y) == [1.0, 1.0] and one.line.dash == "dot"
    assert list(one.x) == [STEPS[0], STEPS[-1]] and part.y_log


def test_weight_spectral_norm_of_a_zero_matrix_is_linear(tmp_path):
    run = write_run(tmp_path / "r", {"weight_spectrum/spectral_norm/w": (STEPS, np.zeros(30))})
    part = weight_spectral_norm_panel(run, ())
    assert not part.y_log and [t.name for t in part.traces] == ["σ_0 · w", "σ_0 = 1"]


def test_smoothed_noise_scale_is_a_ratio_of_trailing_means():
    steps = np.arange(0, 60, 5)
    s = np.arange(1.0, 13.0) ** 2
    g = np.linspace(2.0, -1.0, 12)
    s[4] = np.nan  # that measurement is left out of every window
    got_steps, got = smoothed_noise_scale(
        Series("s", steps, s), Series("g", steps[1:], g[1:]), window=3
    )
    kept = [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]  # step 0 has no grad_sq, step 20 no finite S
    np.testing.assert_array_equal(got_steps, steps[kept])
    expected = []
    for i in range(len(kept)):
        window = kept[max(0, i - 2) : i + 1]
        mean_g = np.mean(g[window])
        expected.append(np.mean(s[window]) / mean_g if mean_g > 0 else np.nan)
    np.testing.assert_allclose(got, expected)
    assert np.isnan(got[-1]) and np.isfinite(got[0])  # mean |G|² <= 0: no scale


def test_noise_panel_log_axis_drops_nonpositive_steps(grad_run):
    part = noise_scale_panel(grad_run, ())
    per_step, smooth, batch = part.traces
    assert part.y_log and batch.line.dash == "dash" and list(batch.y) == [32.0] * 30
    assert per_step.name == "B_simple per step (1 ≤ 0 not drawn)"
    assert STEPS[5] not in per_step.x and len(per_step.x) == 29
    assert np.isnan(per_step.y[list(per_step.x).index(STEPS[7])])  # NaN: a gap, kept
    _, expected = smoothed_noise_scale(
        grad_run.series("grad_noise/trace_cov"), grad_run.series("grad_noise/grad_sq")
    )
    np.testing.assert_allclose(smooth.y, expected)
    i = 20  # a full window: the ratio of the means of the last NOISE_WINDOW measurements
    window = slice(i - NOISE_WINDOW + 1, i + 1)
    ratio = (
        stored(grad_run, "grad_noise/trace_cov")[window].mean()
        / stored(grad_run, "grad_noise/grad_sq")[window].mean()
    )
    assert smooth.y[i] == pytest.approx(ratio) and str(NOISE_WINDOW) in smooth.name


def test_noise_panel_without_reference_is_linear_and_draws_everything(tmp_path):
    b = np.array([40.0, -5.0, np.nan, 60.0])
    run = write_run(tmp_path / "r", {"grad_noise/b_simple": (STEPS[:4], b)})
    (per_step,) = noise_scale_panel(run, ()).traces
    assert not noise_scale_panel(run, ()).y_log and per_step.name == "B_simple per step"
    np.testing.assert_array_equal(per_step.y, b)
    only_batch = write_run(tmp_path / "b", {"grad_noise/batch_size": (STEPS, np.full(30, 8.0))})
    assert noise_scale_panel(only_batch, ()) is None


def test_build_renders_the_gradient_rows_in_order(grad_run, spliced):
    fig = build(grad_run, [])
    titles = [a.text for a in fig.layout.annotations]
    rows = [next(i for i, t in enumerate(titles) if f"<b>{title}</b>" in t) for title in TITLES]
    assert rows == sorted(rows) and len(set(rows)) == len(TITLES)
    page = to_html(fig)
    assert "Gradient noise scale" in page and "worst partner" in page
    heats = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heats) == 3  # pairs, worst partner, stable rank


def test_gradient_panels_read_only_the_keys_they_need(grad_run, monkeypatch):
    read: list[str] = []
    original = Run.series

    def recording(run: Run, key: str):
        read.append(key)
        return original(run, key)

    monkeypatch.setattr(Run, "series", recording)
    for panel in GRADIENT_PANELS:
        read.clear()
        assert panel.draw(grad_run, ()) is not None, panel.name
        stray = [k for k in read if not any(fnmatch.fnmatchcase(k, p) for p in panel.needs)]
        assert read and not stray, f"{panel.name} read {stray} outside {panel.needs}"


def test_group_loss_panel_draws_each_group_and_takes_the_competition_marker(grad_run):
    part = group_loss_panel(grad_run, ())
    assert [t.name for t in part.traces] == [f"loss · {g}" for g in GROUPS]
    np.testing.assert_array_equal(part.traces[2].y, stored(grad_run, "conflict/loss/class_2"))
    assert part.y_log and set(part.keys) == {f"conflict/loss/{g}" for g in GROUPS}


def test_the_page_carries_the_cosine_matrix_under_the_rows(grad_run, tmp_path):
    from trainprobe.dashboard import extra_figures

    (matrix,) = extra_figures(grad_run)
    assert len(matrix.layout.sliders[0].steps) == STEPS.size
    page = to_html(build(grad_run), matrix)
    assert page.count('class="plotly-graph-div"') == 2 and page.count("<script") >= 2
    assert page.index("Cosine between group gradients") > page.index("Gradient noise scale")
    no_pairs = write_run(tmp_path / "r", {"scalars/loss": (STEPS, np.ones(STEPS.size))})
    assert extra_figures(no_pairs) == []
    with pytest.raises(TypeError, match=r"needs a plotly go\.Figure"):
        to_html(build(grad_run), {"data": []})


def test_attention_rows_draw_each_layer_and_the_detectors_limit(grad_run):
    from trainprobe.analysis.attention_logits import LIMIT
    from trainprobe.dashboard.attention import attention_entropy_panel, attention_logits_panel

    part = attention_logits_panel(grad_run, ())
    lines = [t for t in part.traces if t.name.startswith("q·k/√d")]
    assert len(lines) == 2 and part.y_log
    np.testing.assert_allclose(lines[1].y, stored(grad_run, "attention/max_logit/blocks.1"))
    assert any(f"{LIMIT:g}" in (t.name or "") for t in part.traces)  # the dotted limit
    part = attention_entropy_panel(grad_run, ())
    assert set(part.keys) == {"attention/entropy/blocks.0", "attention/entropy/blocks.1"}


def test_adam_eps_row_draws_each_tensor_and_the_detectors_limit(grad_run):
    from trainprobe.analysis.adam_eps import LIMIT
    from trainprobe.dashboard.attention import adam_eps_panel

    part = adam_eps_panel(grad_run, ())
    assert "adam/eps_shrink_total" in part.keys  # what the detector reads, dashed
    tensors = [k for k in part.keys if k.startswith("adam/eps_shrink/")]
    line = next(t for t in part.traces if t.name and t.name.endswith(tensors[0].split("/")[-1]))
    np.testing.assert_allclose(line.y, stored(grad_run, tensors[0]))
    total = next(t for t in part.traces if t.name == "over every tensor")
    np.testing.assert_allclose(total.y, stored(grad_run, "adam/eps_shrink_total"))
    assert any(f"{LIMIT:g}" in (t.name or "") for t in part.traces)  # the dotted limit
