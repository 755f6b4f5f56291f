"""Dashboard curvature panels: sharpness and threshold, top eigenvalues, trace, spectral density."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from tests.synth import write_run
from trainprobe.analysis.findings import Finding, Severity
from trainprobe.dashboard import build, to_html
from trainprobe.dashboard.curvature import hessian_top_panel, hessian_trace_panel, sharpness_panel
from trainprobe.dashboard.density import DENSITY_DECADES, hessian_density_panel, resample_densities
from trainprobe.dashboard.heatmaps import trace_steps
from trainprobe.store import Record, Run, RunWriter

MEASURED = np.arange(0, 1000, 100)  # 10 curvature measurements
THRESHOLD = 40.0
CURVATURE_TITLES = (
    "Sharpness and the stability threshold",
    "Top Hessian eigenvalues",
    "Hessian trace",
    "Hessian spectral density",
)


def triangle(grid: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """A triangular density (integrates to 1): piecewise linear, so np.interp is exact on it."""
    return np.maximum(0.0, 1.0 - np.abs(grid - centre) / half_width) / half_width


def density_grid(i: int) -> np.ndarray:
    """Step ``i``'s eigenvalue grid: wider and longer as the spectrum spreads (knots on 0.25)."""
    return np.linspace(-1.0, 2.0 + i, 4 * (3 + i) + 1)  # spacing 0.25, [13 + 4 i] points


def curvature_values(i: int) -> dict[str, float | np.ndarray]:
    ratio = min(0.2 + 0.1 * i, 1.0)
    grid = density_grid(i)
    values = {
        "sharpness/lambda_max": ratio * THRESHOLD,
        "sharpness/threshold": THRESHOLD,
        "sharpness/ratio": ratio,
        "hessian_trace/trace": 100.0 + 10.0 * i,
        "hessian_trace/stderr": 2.0 + i,
        "hessian_density/grid": grid,
        "hessian_density/density": triangle(grid, 0.5 + 0.5 * i, 0.5),
        "hessian/bottom_0": -0.1 * i,
    }
    values.update({f"hessian/eig_{k}": ratio * THRESHOLD / (k + 1) for k in range(12)})
    return values


@pytest.fixture(scope="module")
def curvature_run(tmp_path_factory):
    """Loss every step, curvature every 100 steps; density grids change size and range."""
    run_dir = tmp_path_factory.mktemp("curv") / "r"
    writer = RunWriter(run_dir)
    writer.append(
        Record(
            int(step),
            {
                "scalars/loss": 2.0 * np.exp(-step / 300) + 0.1,
                **(curvature_values(int(step) // 100) if step % 100 == 0 else {}),
            },
        )
        for step in range(1000)
    )
    writer.close()
    run = Run(run_dir)
    yield run
    run.close()


def traces(fig: go.Figure, *names: str) -> list:
    found = {t.name: t for t in fig.data}
    return [found[name] for name in names]


def row_titles(fig: go.Figure) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def test_sharpness_has_the_threshold_dashed_and_the_ratio_in_the_hover(curvature_run):
    sharp, threshold = traces(build(curvature_run), "λ_max", "stability threshold")
    np.testing.assert_array_equal(sharp.x, MEASURED)
    np.testing.assert_allclose(sharp.y, curvature_run.series("sharpness/lambda_max").values)
    np.testing.assert_allclose(threshold.y, np.full(MEASURED.size, THRESHOLD))
    assert threshold.line.dash == "dash" and sharp.line.dash is None
    np.testing.assert_allclose(sharp.customdata, curvature_run.series("sharpness/ratio").values)
    assert "%{customdata" in sharp.hovertemplate and "threshold" in sharp.hovertemplate


def test_sharpness_without_a_threshold_is_the_eigenvalue_alone(tmp_path):
    run = write_run(tmp_path / "r", {"sharpness/lambda_max": (MEASURED, np.linspace(-1, 5, 10))})
    part = sharpness_panel(run, ())
    [line] = part.traces
    assert line.name == "λ_max" and line.customdata is None
    assert not part.y_log  # a negative eigenvalue: linear axis


def test_top_eigenvalues_in_rank_order_bottom_dotted(curvature_run):
    part = hessian_top_panel(curvature_run, ())
    names = [t.name for t in part.traces]
    assert names == [f"eig {k}" for k in range(12)] + ["bottom 0"]  # eig 10 after eig 9
    eig10 = part.traces[10]
    np.testing.assert_allclose(eig10.y, curvature_run.series("hessian/eig_10").values)
    assert part.traces[-1].line.dash == "dot" and eig10.line.dash is None
    assert len({t.line.color for t in part.traces[:12]}) == 12  # one colour per rank
    assert not part.y_log  # the bottom eigenvalues are negative


def test_trace_band_is_plus_minus_one_stderr(curvature_run):
    band, line = hessian_trace_panel(curvature_run, ()).traces
    trace = curvature_run.series("hessian_trace/trace").values
    err = curvature_run.series("hessian_trace/stderr").values
    np.testing.assert_allclose(line.y, trace)
    np.testing.assert_allclose(band.y, np.concatenate([trace + err, (trace - err)[::-1]]))
    np.testing.assert_array_equal(band.x, np.concatenate([MEASURED, MEASURED[::-1]]))
    assert band.fill == "toself" and band.hoverinfo == "skip"


def test_density_heatmap_resamples_every_step_onto_one_grid(curvature_run):
    (heat,) = [t for t in build(curvature_run).data if isinstance(t, go.Heatmap)]
    grid, z, real = np.asarray(heat.y), np.asarray(heat.z), np.asarray(heat.customdata)
    assert z.shape == real.shape == (grid.size, MEASURED.size)
    np.testing.assert_array_equal(trace_steps(heat), MEASURED)
    assert grid[0] == pytest.approx(-1.0) and grid[-1] == pytest.approx(density_grid(9)[-1])
    np.testing.assert_allclose(np.diff(grid), 0.25)  # the finest step's spacing
    for i in range(MEASURED.size):  # a triangle on 0.25 knots is reproduced exactly
        expected = triangle(grid, 0.5 + 0.5 * i, 0.5) * (grid <= density_grid(i)[-1] + 1e-9)
        np.testing.assert_allclose(real[:, i], expected, atol=1e-6)
        mass = np.sum((real[1:, i] + real[:-1, i]) / 2 * np.diff(grid))  # trapezoid rule
        assert mass == pytest.approx(1.0, abs=1e-6)


def test_density_colour_is_log10_with_a_floor(curvature_run):
    heat = hessian_density_panel(curvature_run, ()).traces[0]
    real = np.asarray(heat.customdata, dtype=np.float64)
    floor = real.max() * 10.0**-DENSITY_DECADES
    np.testing.assert_allclose(heat.z, np.log10(real + floor), rtol=1e-5, atol=1e-5)
    assert heat.zmin == pytest.approx(np.log10(floor))
    assert heat.zmax == pytest.approx(np.log10(real.max() + floor))
    assert "1e-4" in heat.colorbar.ticktext and heat.colorbar.title.text == "density"
    assert "%{customdata" in heat.hovertemplate and "eigenvalue" in heat.hovertemplate


def test_resample_densities_on_known_grids():
    grids = [np.array([0.0, 1.0, 2.0]), np.array([4.0, 3.0, 2.0, 1.0])]  # the second unsorted
    densities = [np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.5, 0.5, 0.0])]
    common, values = resample_densities(grids, densities)
    np.testing.assert_allclose(common, [0.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(values[:, 0], [0.0, 1.0, 0.0, 0.0, 0.0])  # zero past its grid
    np.testing.assert_allclose(values[:, 1], [0.0, 0.0, 0.5, 0.5, 0.0])  # zero before its grid
    common, values = resample_densities([np.linspace(0.0, 1.0, 1001)], [np.ones(1001)], max_rows=50)
    assert common.size == values.shape[0] == 50


def test_resample_densities_rejects_unpaired_input():
    with pytest.raises(ValueError, match=r"one density per grid.*got 1 grids and 0 densities"):
        resample_densities([np.zeros(3)], [])
    with pytest.raises(ValueError, match="at least one of each, got 0 grids"):
        resample_densities([], [])


def test_unusable_densities_give_no_panel(tmp_path):
    grid = np.tile(np.linspace(0.0, 1.0, 5), (3, 1))
    bad = {
        "hessian_density/grid": (MEASURED[:3], grid),
        "hessian_density/density": (MEASURED[:3], np.full((3, 5), np.nan)),
    }
    assert hessian_density_panel(write_run(tmp_path / "nan", bad), ()) is None
    only_grid = {"hessian_density/grid": (MEASURED[:3], grid)}
    assert hessian_density_panel(write_run(tmp_path / "grid", only_grid), ()) is None


def test_run_without_curvature_keys_has_no_curvature_rows(tmp_path):
    run = write_run(tmp_path / "r", {"scalars/loss": (range(50), np.linspace(3, 1, 50))})
    titles = " ".join(row_titles(build(run)))
    assert not any(title in titles for title in CURVATURE_TITLES)
    for panel in (sharpness_panel, hessian_top_panel, hessian_trace_panel, hessian_density_panel):
        assert panel(run, ()) is None


def test_curvature_rows_follow_the_norms_and_carry_the_finding(curvature_run):
    finding = Finding(
        "edge_of_stability",
        Severity.INFO,
        700,
        900,
        "at the edge",
        "nothing to fix",
        {},
        ("sharpness/lambda_max", "sharpness/threshold"),
    )
    fig = build(curvature_run, [finding])
    titles = row_titles(fig)
    rows = [
        next(i for i, t in enumerate(titles) if f"<b>{name}</b>" in t)
        for name in ("Loss and scalars", *CURVATURE_TITLES)
    ]
    assert rows == sorted(rows) and rows[1] == rows[0] + 1  # no norms in this run
    assert "⚠" in titles[rows[1]] and "⚠" not in titles[rows[2]]
    page = to_html(fig)
    assert "Hessian spectral density" in page and "at the edge" in page
