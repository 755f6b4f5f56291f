"""Dashboard analysis rows (:data:`~trainprobe.dashboard.panels.ANALYSIS_PANELS`): accuracy
with the grokking phases, held-out loss, softmax-collapse signals, parameter norm
(``dashboard.grokking``), local complexity (``dashboard.regions``), NTK and feature shares
(``dashboard.ntk``)."""

from __future__ import annotations

import fnmatch

import numpy as np
import plotly.graph_objects as go
import pytest

import trainprobe.dashboard.figure as figure
from tests.synth import GROK_STEPS as STEPS
from tests.synth import full_series, grok_series, write_run
from trainprobe.analysis.findings import Finding, Severity
from trainprobe.analysis.grokking import detect_grokking
from trainprobe.dashboard import build, to_html
from trainprobe.dashboard.grokking import (
    FRACTION,
    accuracy_panel,
    grok_signals_panel,
    grokking_phases,
    heldout_loss_panel,
    param_norm_panel,
)
from trainprobe.dashboard.ntk import ntk_panel, starvation_panel
from trainprobe.dashboard.panels import ANALYSIS_PANELS
from trainprobe.dashboard.regions import SET_COLOURS, local_complexity_panel
from trainprobe.store import Run

LAST = int(STEPS[-1])
FUNCS = tuple(panel.func for panel in ANALYSIS_PANELS)


@pytest.fixture(scope="module")
def grok_run(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("grok") / "r", grok_series())
    yield run
    run.close()


@pytest.fixture(scope="module")
def grokked(grok_run) -> Finding:
    (finding,) = detect_grokking(grok_run)
    assert finding.message.startswith("Grokked")
    return finding


def grok_finding(message: str, end: int = LAST) -> Finding:
    return Finding(
        "grokking",
        Severity.INFO,
        100,
        end,
        message,
        "train longer",
        {},
        ("heldout/train_acc", "heldout/acc"),
    )


def named(part, name: str) -> go.Scatter:
    (trace,) = [t for t in part.traces if t.name == name]
    return trace


def stored(run: Run, key: str) -> np.ndarray:
    return run.series(key).values


def test_no_keys_no_panels(tmp_path):
    run = write_run(
        tmp_path / "r",
        {
            "scalars/loss": (STEPS, np.ones(STEPS.size)),
            "ntk/trace": (STEPS, np.ones(STEPS.size)),
            "regions/train/layer/fc.1": (STEPS, np.ones(STEPS.size)),
        },
    )
    for func in FUNCS:
        assert func(run, (grok_finding("Memorising: x"),)) is None, func.__name__


def test_accuracy_lines_carry_the_stored_values(grok_run):
    part = accuracy_panel(grok_run, ())
    assert [t.name for t in part.traces] == ["train acc", "held-out acc", "adversarial acc"]
    for name, key in (
        ("train acc", "heldout/train_acc"),
        ("held-out acc", "heldout/acc"),
        ("adversarial acc", "robustness/adv_acc"),
    ):
        np.testing.assert_array_equal(named(part, name).y, stored(grok_run, key))
        np.testing.assert_array_equal(named(part, name).x, STEPS)
    assert named(part, "adversarial acc").line.dash == "dash"
    assert named(part, "train acc").line.dash is None
    assert list(part.y_axis["range"]) == list(FRACTION) and not part.y_log
    assert set(part.keys) == {"heldout/train_acc", "heldout/acc", "robustness/adv_acc"}


def test_phase_shading_spans_the_grokking_finding(grok_run, grokked):
    other = Finding("loss_spike", Severity.CRITICAL, 5, 9, "spike", "clip", {}, ())
    part = accuracy_panel(grok_run, (other, grokked))
    fit, gen = grokked.start_step, grokked.end_step
    assert 0 < fit < gen < LAST
    bands = {t.name: t for t in part.traces if t.fill == "toself"}
    assert list(bands) == ["phase · fitting", "phase · memorisation", "phase · generalised"]
    spans = {name: (min(t.x), max(t.x)) for name, t in bands.items()}
    assert spans == {
        "phase · fitting": (0, fit),
        "phase · memorisation": (fit, gen),
        "phase · generalised": (gen, LAST),
    }
    for band in bands.values():
        assert (min(band.y), max(band.y)) == FRACTION and band.hoverinfo == "skip"
    assert bands["phase · memorisation"].fillpattern.shape == "/"
    assert list(named(part, f"fit · step {fit}").x) == [fit, fit]
    assert list(named(part, f"generalised · step {gen}").x) == [gen, gen]
    assert part.traces[-1].name == "adversarial acc"  # the curves are drawn over the bands
    assert "Hatched" in part.description


@pytest.mark.parametrize(
    ("message", "label"),
    [
        ("Grokking under way: train fit since step 100", "memorisation, held-out rising"),
        ("Memorising: train fit since step 100", "memorisation"),
        ("Grokking stalled: train fit since step 100", "memorisation, stalled"),
    ],
)
def test_phases_without_generalisation_run_to_the_last_step(grok_run, message, label):
    part = accuracy_panel(grok_run, (grok_finding(message),))
    band = named(part, f"phase · {label}")
    assert (min(band.x), max(band.x)) == (100, LAST)
    names = [t.name for t in part.traces]
    assert "fit · step 100" in names and "phase · generalised" not in names
    assert not any(n.startswith("generalised") for n in names)


def test_no_grokking_finding_no_phases(grok_run):
    other = Finding("loss_spike", Severity.CRITICAL, 5, 9, "spike", "clip", {}, ())
    part = accuracy_panel(grok_run, (other,))
    assert not any(t.fill for t in part.traces) and "Hatched" not in part.description


def test_empty_phases_are_left_out():
    at_start = Finding("grokking", Severity.INFO, 0, 500, "Grokked: late", "wait", {}, ())
    names = [t.name for t in grokking_phases(at_start, (0, 500))]
    assert names == ["phase · memorisation", "fit · step 0", "generalised · step 500"]


def test_accuracy_row_with_robustness_only(tmp_path):
    run = write_run(tmp_path / "r", {"robustness/adv_acc": (STEPS, np.full(STEPS.size, 0.3))})
    assert [t.name for t in accuracy_panel(run, ()).traces] == ["adversarial acc"]


def test_heldout_loss_is_log_when_positive(grok_run, tmp_path):
    part = heldout_loss_panel(grok_run, ())
    assert [t.name for t in part.traces] == ["train loss", "held-out loss"]
    np.testing.assert_array_equal(part.traces[1].y, stored(grok_run, "heldout/loss"))
    assert part.y_log and part.traces[0].line.color != part.traces[1].line.color
    run = write_run(tmp_path / "r", {"heldout/loss": (STEPS[:3], [1.0, 0.0, 0.5])})
    assert not heldout_loss_panel(run, ()).y_log


def test_local_complexity_one_fixed_colour_per_set(grok_run, tmp_path):
    part = local_complexity_panel(grok_run, ())
    assert [t.name for t in part.traces] == [
        "regions · train",
        "regions · test",
        "regions · random",
    ]
    for trace, point_set in zip(part.traces, ("train", "test", "random"), strict=True):
        np.testing.assert_array_equal(trace.y, stored(grok_run, f"regions/{point_set}/total"))
        assert trace.line.color == SET_COLOURS[point_set]
    assert len(set(SET_COLOURS.values())) == 3
    partial = write_run(
        tmp_path / "r",
        {
            "regions/random/total": (STEPS, np.ones(STEPS.size)),
            "regions/train/total": (STEPS, np.ones(STEPS.size)),
        },
    )
    drawn = local_complexity_panel(partial, ())
    assert [t.line.color for t in drawn.traces] == [SET_COLOURS["train"], SET_COLOURS["random"]]


def test_grok_signals_share_an_axis_and_the_norm_has_its_own(grok_run):
    part = grok_signals_panel(grok_run, ())
    assert [t.name for t in part.traces] == ["softmax collapse", "NLM cosine"]
    np.testing.assert_array_equal(part.traces[1].y, stored(grok_run, "grok/nlm_cos"))
    np.testing.assert_array_equal(part.traces[0].y, stored(grok_run, "grok/softmax_collapse"))
    assert list(part.y_axis["range"]) == list(FRACTION)  # the cosine never goes below 0 here
    norm = param_norm_panel(grok_run, ())
    assert [t.name for t in norm.traces] == ["param norm"] and norm.height < 1
    np.testing.assert_array_equal(norm.traces[0].y, stored(grok_run, "grok/param_norm"))


def test_negative_cosine_lowers_the_signal_axis(tmp_path):
    run = write_run(tmp_path / "r", {"grok/nlm_cos": (STEPS[:3], [-0.5, np.nan, 0.9])})
    assert grok_signals_panel(run, ()).y_axis["range"] == [pytest.approx(-0.53), FRACTION[1]]


def test_ntk_panel_draws_alignment_and_change_only(grok_run):
    part = ntk_panel(grok_run, ())
    assert [t.name for t in part.traces] == ["NTK alignment", "NTK change from start"]
    np.testing.assert_array_equal(part.traces[1].y, stored(grok_run, "ntk/change"))
    assert set(part.keys) == {"ntk/alignment", "ntk/change"}


def test_starvation_shares_and_dashed_response(grok_run, tmp_path):
    part = starvation_panel(grok_run, ())
    assert [t.name for t in part.traces] == ["share · easy", "share · hard", "NTK response min/max"]
    np.testing.assert_array_equal(part.traces[1].y, stored(grok_run, "attribution/share/hard"))
    ratio = part.traces[2]
    assert ratio.line.dash == "dash" and ratio.y[3] == -0.4
    assert part.y_axis["range"] == [pytest.approx(-0.43), FRACTION[1]]
    only = write_run(tmp_path / "r", {"ntk_response/min_ratio": (STEPS, np.full(STEPS.size, 0.5))})
    assert starvation_panel(only, ()).y_axis["range"] == [FRACTION[0], FRACTION[1]]


def test_legend_names_unique_across_the_rows(grok_run, grokked):
    names = [t.name for panel in ANALYSIS_PANELS for t in panel.draw(grok_run, (grokked,)).traces]
    assert len(names) == len(set(names)), names


def test_build_with_the_registered_rows(tmp_path, grokked):
    assert all(panel in figure.PANELS for panel in ANALYSIS_PANELS)
    series = {**full_series(steps=2000, every=20), **grok_series()}
    run = write_run(tmp_path / "r", series)
    fig = build(run, [grokked])
    titles = [a.text for a in fig.layout.annotations]
    rows = [
        next(i for i, t in enumerate(titles) if f"<b>{p.title}</b>" in t) for p in ANALYSIS_PANELS
    ]
    assert rows == list(range(rows[0], rows[0] + len(rows)))  # together, in order
    assert "⚠" in titles[rows[0]]  # the finding names the accuracy keys
    names = [t.name for t in fig.data if isinstance(t, go.Scatter) and t.showlegend is not False]
    assert len(names) == len(set(names)), "legend names collide with another row's"
    page = to_html(fig)
    assert "Train vs held-out accuracy" in page and "Feature shares and NTK response" in page
    assert {"phase · memorisation", "regions · random", "share · hard"} <= set(names)
    run.close()


def test_rows_read_only_the_keys_they_need(grok_run, grokked, monkeypatch):
    read: list[str] = []

    def recording(method):
        def read_and_record(run: Run, key: str):
            read.append(key)
            return method(run, key)

        return read_and_record

    monkeypatch.setattr(Run, "series", recording(Run.series))
    monkeypatch.setattr(Run, "arrays", recording(Run.arrays))
    for panel in ANALYSIS_PANELS:
        read.clear()
        assert panel.draw(grok_run, (grokked,)) is not None, panel.name
        stray = [k for k in read if not any(fnmatch.fnmatchcase(k, p) for p in panel.needs)]
        assert read and not stray, f"{panel.name} read {stray} outside {panel.needs}"
