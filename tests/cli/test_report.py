"""`trainprobe report` series summary: 100 columns, per-layer folding, arrays, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synth import full_series, write_run
from trainprobe.cli.report import GROUP_MIN, format_summary, summary_dict
from trainprobe.store import Record, RunWriter


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_full_run_fits_100_columns_and_folds_layers(tmp_path):
    run = write_run(tmp_path / "r", full_series())
    text = format_summary(run)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert text.splitlines()[0].startswith("Series: ")
    grads = _line(text, "norms/grad/* ")
    assert "0-390" in grads and "1e-05" in grads  # min over layers: classifier.2.weight at 1e-5
    assert "norms/grad/features.0.weight" not in text  # folded
    detail = text.splitlines()[text.splitlines().index(grads) + 1]
    assert "5 layers" in detail and "min in classifier.2.weight" in detail
    # three activations/std layers stay one line each (GROUP_MIN is 4)
    assert GROUP_MIN == 4 and _line(text, "activations/std/features.1 ")
    density = _line(text, "hessian_density/density")
    assert "array [41]" in density and "0-360" in density
    assert "non-finite values in: " in text and "grad_noise/b_simple (1 of 40)" in text


def test_scalar_line_values_and_narrow_width(tmp_path):
    steps = np.arange(10, 20)
    loss = np.linspace(3.0, 1.0, 10)
    loss[4] = np.nan
    long_key = "probe/" + "a" * 80 + "_tail"
    run = write_run(tmp_path / "r", {"scalars/loss": (steps, loss), long_key: (steps, loss)})
    text = format_summary(run, width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    cells = _line(text, "scalars/loss ").split()
    assert cells[1:] == ["10", "10-19", "3", "1", "1", "3"]
    shortened = next(line for line in text.splitlines() if "..." in line).split()[0]
    assert shortened.startswith("probe/") and shortened.endswith("a_tail")
    assert "scalars/loss (1 of 10)" in text


def test_arrays_of_varying_shape_and_empty_run(tmp_path):
    writer = RunWriter(tmp_path / "r")
    writer.append([Record(0, {"x/arr": np.zeros((2, 3))}), Record(5, {"x/arr": np.zeros(4)})])
    writer.close()
    run = write_run(tmp_path / "empty", {})
    assert format_summary(run) == "Series: none recorded yet."
    from trainprobe.store import Run

    with Run(tmp_path / "r") as r:
        assert "array [varies (2 shapes)]" in _line(format_summary(r), "x/arr")
        assert summary_dict(r)["arrays"] == [
            {"key": "x/arr", "points": 2, "first_step": 0, "last_step": 5, "shapes": [[2, 3], [4]]}
        ]


def test_summary_dict_is_strict_json(tmp_path):
    steps = np.arange(5)
    run = write_run(
        tmp_path / "r",
        {
            "scalars/loss": (steps, [np.nan, 2.0, 1.0, 0.5, np.nan]),
            "dead/all_nan": (steps, np.full(5, np.nan)),
            "hessian_density/density": (steps, np.ones((5, 7))),
        },
    )
    payload = json.loads(json.dumps(summary_dict(run), allow_nan=False))
    loss, dead = payload["scalars"]
    assert loss == {
        "key": "scalars/loss",
        "points": 5,
        "first_step": 0,
        "last_step": 4,
        "first": None,
        "last": None,
        "min": 0.5,
        "max": 2.0,
        "nonfinite": 2,
    }
    assert dead["min"] is None and dead["nonfinite"] == 5
    assert payload["arrays"][0]["shapes"] == [[7]]


def test_too_narrow_width_is_refused(tmp_path):
    run = write_run(tmp_path / "r", {"scalars/loss": ([0], [1.0])})
    with pytest.raises(ValueError, match="too narrow; pass width=60 or more"):
        format_summary(run, width=40)


def test_infinities_are_not_printed_as_nan(tmp_path):
    from tests.synth import write_run
    from trainprobe.cli.report import format_summary

    run = write_run(tmp_path / "r", {"scalars/loss": ([0, 1, 2], [np.inf, 1.0, -np.inf])})
    (line,) = [row for row in format_summary(run).splitlines() if row.startswith("scalars/loss")]
    assert line.split()[-4:] == ["inf", "-inf", "1", "1"]


@pytest.mark.parametrize("declared", [False, True])
def test_folded_groups_and_pairs_are_not_called_layers(tmp_path, declared):
    from tests.synth import declared_meta

    steps = np.arange(5)
    groups = ["cat", "dog", "bird", "fish"]
    series = {f"conflict/loss/{g}": (steps, np.ones(5)) for g in groups}
    series |= {f"conflict/cos/{a}__{b}": (steps, np.ones(5)) for a in groups for b in groups[:1]}
    series |= {f"norms/grad/l{i}.weight": (steps, np.ones(5)) for i in range(4)}
    meta = declared_meta("conflict", "norms") if declared else None
    text = format_summary(write_run(tmp_path / "r", series, meta=meta))
    assert "4 groups; first/last: median over groups" in text
    assert "4 pairs; first/last: median over pairs" in text
    assert "4 layers; first/last: median over layers" in text
