"""Dashboard: panels present/absent, heatmap contents, findings marks, offline HTML, bad input."""

from __future__ import annotations

import fnmatch

import numpy as np
import plotly.graph_objects as go
import pytest

from tests.synth import PARAMS, full_series, write_run
from trainprobe.analysis.findings import Finding, Severity
from trainprobe.dashboard import PANELS, Panel, PanelPart, build, to_html
from trainprobe.dashboard.heatmaps import trace_steps
from trainprobe.store import Run


def spike_finding(**overrides) -> Finding:
    fields = {
        "detector": "loss_spike",
        "severity": Severity.CRITICAL,
        "start_step": 238,
        "end_step": 242,
        "message": "loss jumped 8x at step 240",
        "action": "lower the learning rate or clip gradients",
        "evidence": {"ratio": 8.0},
        "keys": ("scalars/loss",),
    }
    return Finding(**{**fields, **overrides})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = write_run(
        tmp_path_factory.mktemp("dash") / "r", full_series(), meta={"model": {"params": PARAMS}}
    )
    yield run
    run.close()


def heatmap(fig: go.Figure, label: str) -> go.Heatmap:
    (trace,) = [t for t in fig.data if isinstance(t, go.Heatmap) and t.colorbar.title.text == label]
    return trace


def row_titles(fig: go.Figure) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def test_full_run_has_every_panel_in_order(full_run):
    fig = build(full_run)
    titles = row_titles(fig)
    expected = [p.title for p in PANELS if p.name != "findings"]
    assert [next(t for t in titles if f"<b>{e}</b>" in t) for e in expected] == titles
    assert sum(isinstance(t, go.Heatmap) for t in fig.data) == 10
    assert fig.layout.xaxis.matches is not None or fig.layout.xaxis2.matches is not None
    assert fig.layout.hovermode == "x unified"


def test_grad_heatmap_is_log10_of_stored_values(full_run):
    trace = heatmap(build(full_run), "grad norm")
    assert list(trace.y) == PARAMS
    stored = np.stack([full_run.series(f"norms/grad/{p}").values for p in PARAMS])
    np.testing.assert_allclose(trace.z, np.log10(stored), rtol=1e-6)
    np.testing.assert_allclose(trace.customdata, stored, rtol=1e-6)
    steps = full_run.series("norms/grad/features.0.bias").steps
    np.testing.assert_array_equal(trace_steps(trace), steps)
    assert trace.x is None and trace.dx == steps[1] - steps[0]  # even columns: x0/dx
    assert "%{y}" in trace.hovertemplate and "%{customdata" in trace.hovertemplate


def test_heatmap_ticks_are_real_values_and_names_short(full_run):
    fig = build(full_run)
    trace = heatmap(fig, "grad norm")
    labels = dict(zip(trace.colorbar.tickvals, trace.colorbar.ticktext, strict=True))
    assert labels[-3.0] == "1e-3"
    axis = next(
        a
        for a in fig.layout
        if a.startswith("yaxis") and fig.layout[a].ticktext and PARAMS[3] in fig.layout[a].tickvals
    )
    short = fig.layout[axis].ticktext[list(fig.layout[axis].tickvals).index(PARAMS[3])]
    assert len(short) <= 36 and short.startswith("encoder.layers.11.")


def test_colourbars_sit_beside_their_own_rows(full_run):
    fig = build(full_run)
    for trace in (t for t in fig.data if isinstance(t, go.Heatmap)):
        lo, hi = fig.layout[f"yaxis{trace.yaxis[1:]}"].domain
        assert trace.colorbar.y == pytest.approx((lo + hi) / 2)
        assert trace.colorbar.len == pytest.approx(hi - lo)


def test_zero_fraction_heatmap_is_linear(full_run):
    trace = heatmap(build(full_run), "zero fraction")
    np.testing.assert_allclose(trace.z[:, 0], [0.0, 0.3, 0.6], rtol=1e-6)
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)


def test_only_loss_gives_only_the_loss_panel(tmp_path):
    run = write_run(tmp_path / "r", {"scalars/loss": (range(50), np.linspace(3, 1, 50))})
    fig = build(run)
    assert len(fig.data) == 1 and fig.data[0].name == "loss"
    assert len(row_titles(fig)) == 1 and "Loss and scalars" in row_titles(fig)[0]
    assert fig.layout.yaxis.type == "log"
    np.testing.assert_array_equal(fig.data[0].x, np.arange(50))


def test_empty_run_builds_a_note(tmp_path):
    fig = build(write_run(tmp_path / "r", {}))
    assert not fig.data and "no data" in fig.layout.annotations[0].text


def test_findings_draw_spans_timeline_and_title_marker(full_run):
    finding = spike_finding()
    info = spike_finding(
        detector="slow_lr",
        severity=Severity.INFO,
        start_step=0,
        end_step=390,
        keys=("optim/lr/*",),
        message="lr warm-up is long",
    )
    fig = build(full_run, [finding, info])
    rows = len(row_titles(fig))
    assert len(fig.layout.shapes) == 2 * rows
    filled = [s for s in fig.layout.shapes if s.fillcolor is not None]
    outlined = [s for s in fig.layout.shapes if s.fillcolor is None]
    assert len(outlined) == 2 * 10 and {s.line.color for s in outlined} == {"#d62728", "#1f77b4"}
    span = next(s for s in filled if s.fillcolor == "#d62728" and s.yref == "y2 domain")
    assert span.x0 <= 238 and span.x1 >= 242 and (span.y0, span.y1) == (0, 1)
    bar = next(t for t in fig.data if "loss_spike" in (t.hovertemplate or ""))
    for text in ("CRITICAL", "steps 238–242", finding.message, finding.action):
        assert text in bar.hovertemplate
    titles = row_titles(fig)
    assert "<b>Findings</b>" in titles[0]
    marked = [t for t in titles if "⚠" in t]
    assert len(marked) == 2 and "Loss" in marked[0] and "Learning rate" in marked[1]


def test_html_is_offline_and_carries_the_finding(full_run):
    page = to_html(build(full_run, [spike_finding()], title="my run"))
    assert page.lstrip().lower().startswith("<html") or "<!doctype" in page[:50].lower()
    assert '<script src="http' not in page and len(page) > 1_000_000
    assert "loss jumped 8x at step 240" in page and "my run" in page


def test_panels_read_only_keys_they_need(full_run, monkeypatch):
    read: list[str] = []

    def recording(method):
        def read_and_record(run: Run, key: str):
            read.append(key)
            return method(run, key)

        return read_and_record

    monkeypatch.setattr(Run, "series", recording(Run.series))
    monkeypatch.setattr(Run, "arrays", recording(Run.arrays))  # array keys (spectral density)
    for panel in PANELS:
        read.clear()
        assert isinstance(panel.draw(full_run, (spike_finding(),)), PanelPart)
        assert read or not panel.needs, f"panel {panel.name!r} read no key"
        stray = [k for k in read if not any(fnmatch.fnmatchcase(k, p) for p in panel.needs)]
        assert not stray, f"panel {panel.name!r} read {stray}, outside needs {panel.needs}"


def test_nonfinite_panel_draws_counts_under_distinct_names(full_run):
    fig = build(full_run)
    names = [t.name for t in fig.data if isinstance(t, go.Scatter)]
    assert len(names) == len(set(names)), f"trace names collide: {names}"
    nonfinite = [n for n in names if "non-finite" in n]
    assert nonfinite == ["non-finite loss", "non-finite grad", "non-finite param"]


@pytest.mark.parametrize(
    ("run", "findings", "title", "match"),
    [
        ("/some/run_dir", (), None, r"needs a trainprobe.store.Run.*Run\(run_dir\)"),
        (None, "loss_spike", None, "iterable of Finding"),
        (None, [{"detector": "x"}], None, r"findings\[0\] is a dict, not a Finding"),
        (None, (), 3, "title must be a str"),
    ],
)
def test_bad_input_raises_type_error(full_run, run, findings, title, match):
    with pytest.raises(TypeError, match=match):
        build(full_run if run is None else run, findings, title=title)


def test_to_html_rejects_non_figure():
    with pytest.raises(TypeError, match=r"needs a plotly go.Figure from dashboard.build"):
        to_html({"data": []})


def test_panel_and_part_validate():
    with pytest.raises(TypeError, match=r"Panel.name must be a non-empty str, got ''"):
        Panel("", "X", lambda run, f: None, ())
    with pytest.raises(TypeError, match=r"Panel.title must be a str, got int"):
        Panel("x", 3, lambda run, f: None, ())
    with pytest.raises(TypeError, match=r"Panel.needs must be a tuple"):
        Panel("x", "X", lambda run, f: None, "scalars/*")
    with pytest.raises(TypeError, match=r"Panel.func must be callable"):
        Panel("x", "X", None, ())
    with pytest.raises(ValueError, match=r"at least one trace; return None"):
        PanelPart((), "y", "d")
    with pytest.raises(TypeError, match=r"must be plotly traces"):
        PanelPart(({"type": "scatter"},), "y", "d")
    with pytest.raises(ValueError, match=r"PanelPart.height must be > 0, got 0"):
        PanelPart((go.Scatter(),), "y", "d", height=0)


def test_panel_returning_wrong_type_raises(full_run):
    panel = Panel("bad", "Bad", lambda run, f: "not a part", ())
    with pytest.raises(TypeError, match=r"must return a PanelPart or None"):
        panel.draw(full_run, ())


def test_full_run_rows_for_subspace_shares_and_conflict_summary(tmp_path):
    run = write_run(tmp_path / "r", full_series())
    titles = " ".join(a.text for a in build(run).layout.annotations)
    for title in (
        "Gradient in the top Hessian eigenspace",
        "Gradient and loss share per group",
        "Conflict over all pairs",
        "Weight norm per parameter",
    ):
        assert f"<b>{title}</b>" in titles
    share = next(p for p in PANELS if p.name == "group_share").draw(run, ())
    grad_lines = [t for t in share.traces if t.name.startswith("grad share")]
    loss_lines = [t for t in share.traces if t.name.startswith("loss share")]
    assert len(grad_lines) == len(loss_lines) == 3
    for grad, loss in zip(grad_lines, loss_lines, strict=True):  # one colour per group
        assert grad.line.color == loss.line.color and loss.line.dash == "dot"
    # the class_competition detector's magnitude share: n_g |g_g| / sum_j n_j |g_j|
    series = full_series()
    step = 7
    weighted = {
        g: series[f"conflict/count/{g}"][1][step] * series[f"conflict/norm/{g}"][1][step]
        for g in ("class_0", "class_1", "class_2")
    }
    for trace in grad_lines:
        group = trace.name.rsplit(" ", 1)[1]
        assert trace.y[step] == pytest.approx(weighted[group] / sum(weighted.values()))
    assert {"conflict/norm/class_2", "conflict/count/class_2"} <= set(share.keys)


def test_reading_once_serves_analyze_and_build_from_one_read(tmp_path):
    """Inside Run.reading_once() each key is read once and shared read-only: every detector
    and every row must work on those arrays (none writes into them), with the same result."""
    from trainprobe.analysis import analyze

    run = write_run(tmp_path / "r", full_series())
    fresh = build(run, analyze(run)).to_plotly_json()
    with run.reading_once():
        findings = analyze(run)
        shared = build(run, findings).to_plotly_json()
        first = run.series("scalars/loss")
        assert run.series("scalars/loss") is first and not first.values.flags.writeable
    assert run.series("scalars/loss") is not first  # outside the block: a fresh read
    assert findings and len(shared["data"]) == len(fresh["data"])
    assert shared["layout"]["meta"] == fresh["layout"]["meta"]
