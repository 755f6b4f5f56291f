"""The catch-all row (``dashboard.catch_all``): every series no other row draws, grouped in
families picked from its menu, and the display thinning of its lines."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from tests.synth import declared_meta, write_run
from trainprobe.dashboard import PANELS, PanelPart, build
from trainprobe.dashboard.catch_all import (
    MAX_FAMILY_LINES,
    MAX_POINTS,
    families,
    other_series_panel,
    thin,
)
from trainprobe.dashboard.grid import column_budget
from trainprobe.dashboard.parts import MenuItem
from trainprobe.keys import Key
from trainprobe.store import Record, Run, RunWriter

CATCH_ALL = next(p for p in PANELS if p.name == "other_series")


def test_families_group_siblings_and_gather_a_probes_single_keys():
    keys = [
        "conflict/norm/a",
        "conflict/groups",
        "conflict/norm/b",
        "sharpness/lr",
        "conflict/pcgrad_shift",
        "regions/train/layer/0",
        "regions/train/layer/1",
        "ntk/trace",
        "regions/test/layer/0",
        "custom/thing/only",
    ]
    declared = (Key("regions/<set>/layer/<module>", "neurons changing sign, per module"),)
    assert families(keys, declared) == {
        "conflict/norm/*": ["conflict/norm/a", "conflict/norm/b"],
        "conflict/…": ["conflict/groups", "conflict/pcgrad_shift"],
        "sharpness/…": ["sharpness/lr"],
        "regions/train/layer/*": ["regions/train/layer/0", "regions/train/layer/1"],
        "ntk/…": ["ntk/trace"],
        "regions/test/layer/*": ["regions/test/layer/0"],  # alone, but a known family
        "custom/…": ["custom/thing/only"],
    }


def test_thin_keeps_each_bins_extremes_and_the_spike():
    rng = np.random.default_rng(0)
    steps = np.arange(10_000)
    values = rng.normal(size=steps.size)
    values[7_777] = 50.0  # a one-step spike
    values[1_234] = -60.0
    values[3_000:3_100] = np.nan  # a gap of whole bins
    x, y = thin(steps, values)
    assert x.size <= MAX_POINTS
    assert np.all(np.diff(x) > 0)  # step order, no duplicates
    assert 7_777 in x and 1_234 in x
    assert np.nanmax(y) == 50.0 and np.nanmin(y) == -60.0
    assert np.isnan(y[(x >= 3_000) & (x < 3_100)]).any()  # the gap stays a gap
    np.testing.assert_array_equal(values[x], y)  # only real points, never averages
    short_x, short_y = thin(steps[:50], values[:50])
    assert short_x is steps[:50] or np.array_equal(short_x, steps[:50])
    assert np.array_equal(short_y, values[:50])


def test_thin_matches_a_brute_force_per_bin_min_max():
    rng = np.random.default_rng(1)
    steps, values = np.arange(5_003), rng.random(5_003)
    x, _ = thin(steps, values, max_points=100)
    width = -(-steps.size // (100 // 2))
    expected = set()
    for start in range(0, steps.size, width):
        block = values[start : start + width]
        expected |= {start + int(np.argmin(block)), start + int(np.argmax(block))}
    assert set(x.tolist()) == expected


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    steps = np.arange(0, 6_000, 2)
    n = steps.size
    series = {
        "scalars/loss": (steps, np.exp(-steps / 2_000)),
        "norms/grad/a": (steps, np.ones(n)),  # drawn by its own row: not in the catch-all
        "hessian/eigvecs": (steps[:3], np.ones((3, 2, 4))),  # a vector per step
        "sharpness/lr": (steps, np.full(n, 0.1)),
        "sharpness/hvps": (steps, np.full(n, 5.0)),  # 50x the lr: a linear axis
    }
    for i in range(3):  # a small family: lines, log y (spans decades)
        series[f"grad_noise/snr/p{i}"] = (steps, 10.0 ** (i * 2) * (1 + np.sin(steps / 50) ** 2))
    for i in range(MAX_FAMILY_LINES + 4):  # a large family: a heatmap
        series[f"updates/norm/block.{i}.weight"] = (steps, (i + 1) * np.ones(n))
    meta = declared_meta("sharpness", "grad_noise", "updates")
    run = write_run(tmp_path_factory.mktemp("other") / "r", series, meta=meta)
    yield run
    run.close()


def test_catch_all_draws_each_uncovered_scalar_once_and_names_vector_keys(other_run):
    part = CATCH_ALL.draw(other_run, ())
    assert isinstance(part, PanelPart)
    assert set(part.keys) == {
        "sharpness/lr",
        "sharpness/hvps",
        *other_run.keys("grad_noise/"),
        *other_run.keys("updates/norm/"),
    }
    assert "hessian/eigvecs" in part.description and "Run.series" in part.description
    labels = [item.label for item in part.menu]
    assert labels == ["sharpness/… (2)", "grad_noise/snr/* (3)", "updates/norm/* (12)"]
    by_label = dict(zip(labels, part.menu, strict=True))
    lines = [part.traces[i] for i in by_label["grad_noise/snr/* (3)"].traces]
    assert all(isinstance(t, go.Scatter) and len(t.x) <= MAX_POINTS for t in lines)
    assert by_label["grad_noise/snr/* (3)"].y_axis["type"] == "log"
    assert by_label["sharpness/… (2)"].y_axis["type"] == "linear"
    (heat,) = [part.traces[i] for i in by_label["updates/norm/* (12)"].traces]
    assert isinstance(heat, go.Heatmap)
    assert len(heat.y) == MAX_FAMILY_LINES + 4 and heat.z.shape[1] <= column_budget(12)
    assert by_label["updates/norm/* (12)"].y_axis["type"] == "category"
    # every trace belongs to exactly one choice
    shown = sorted(i for item in part.menu for i in item.traces)
    assert shown == list(range(len(part.traces)))


def test_menu_buttons_show_one_family_and_reset_the_axis(other_run):
    fig = build(other_run)
    (menu,) = fig.layout.updatemenus
    indices = list(menu.buttons[0].args[2])
    assert [fig.data[i].visible is not False for i in indices] == list(
        menu.buttons[0].args[0]["visible"]
    )
    settings = [set(b.args[1]) for b in menu.buttons]
    assert all(s == settings[0] for s in settings)  # each choice sets (or clears) them all
    heat = next(b for b in menu.buttons if b.label.startswith("updates/norm"))
    lines = next(b for b in menu.buttons if b.label.startswith("sharpness"))
    axis = next(k for k in heat.args[1] if k.endswith(".type")).split(".")[0]
    assert heat.args[1][f"{axis}.type"] == "category"
    assert heat.args[1][f"{axis}.autorange"] == "reversed"
    assert lines.args[1][f"{axis}.type"] == "linear"
    assert lines.args[1][f"{axis}.tickvals"] is None  # the heatmap's labels are cleared
    # each choice puts its own explanation in the row's title line
    row = int(axis.removeprefix("yaxis")) - 1
    note = heat.args[1][f"annotations[{row}].text"]
    assert "<b>Every other recorded series</b>" in note and "optimizer step per tensor" in note
    assert fig.layout.annotations[row].text == menu.buttons[0].args[1][f"annotations[{row}].text"]


def test_menu_items_are_validated():
    trace = go.Scatter(x=[0], y=[1])
    with pytest.raises(ValueError, match="index into the row's 1 traces"):
        PanelPart((trace,), "", "d", menu=(MenuItem("a", (3,)),))
    with pytest.raises(TypeError, match="MenuItem"):
        PanelPart((trace,), "", "d", menu=("a",))


def test_catch_all_is_absent_when_every_key_has_a_row(tmp_path):
    run = write_run(tmp_path / "r", {"scalars/loss": (np.arange(5), np.ones(5))})
    assert other_series_panel(run, (), covered=("scalars/*",)) is None
    assert "updatemenus" not in build(run).layout.to_plotly_json()


def test_catch_all_never_reads_arrays_and_names_families_with_nothing_finite(tmp_path):
    steps = np.arange(4)
    series = {"scalars/loss": (steps, np.ones(4)), "misc/a<b": (steps, np.arange(4.0))}
    for i in range(MAX_FAMILY_LINES + 2):  # a large family that is NaN throughout
        series[f"fam/x/k{i}"] = (steps, np.full(4, np.nan))
    write_run(tmp_path / "r", series).close()
    writer = RunWriter(tmp_path / "r", resume=True)  # an array that changes shape
    writer.append(
        [Record(10, {"custom/hist": np.ones(3)}), Record(11, {"custom/hist": np.ones(5)})]
    )
    writer.close()
    with Run(tmp_path / "r") as run:
        fig = build(run)  # neither the all-NaN family nor the ragged array breaks the page
        part = CATCH_ALL.draw(run, ())
    assert [item.label for item in part.menu] == ["misc/… (1)"]
    assert "custom/hist" in part.description and "fam/x/k0" in part.description
    assert "misc/a<b" in part.keys and "fam/x/k0" not in part.keys
    title = next(a.text for a in fig.layout.annotations if "Every other" in a.text)
    assert "custom/hist" in title and "&amp;lt;" not in title  # escaped once, by the title


def test_thin_never_exceeds_max_points():
    rng = np.random.default_rng(2)
    for n in (7, 101, 1_000, 4_099):
        values = rng.random(n)
        for max_points in (3, 4, 5, 64, 101):
            x, _ = thin(np.arange(n), values, max_points=max_points)
            assert x.size <= max(max_points, 2) or n <= max_points, (n, max_points)
