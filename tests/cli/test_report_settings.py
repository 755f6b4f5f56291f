"""Detector thresholds from Python (``analyze(run, config=...)``) and the command line
(``trainprobe report --set DETECTOR.PARAM=VALUE``), checked with errors that list the names."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import analyze
from trainprobe.analysis.registry import DETECTORS, detector_parameters
from trainprobe.cli.detector_config import parse_settings, parse_value
from trainprobe.cli.main import main


def _one_jump(tmp_path):
    """A gradient norm at 1 with one 15x jump: a finding at jump_factor 10, none at 20."""
    steps = np.arange(0, 800, 10)
    norms = np.ones(steps.size)
    norms[40] = 15.0
    return write_run(tmp_path / "r", {"norms/grad_total": (steps, norms)})


def _detectors(findings) -> list[str]:
    return [f.detector for f in findings]


def test_config_changes_a_threshold(tmp_path):
    run = _one_jump(tmp_path)
    assert _detectors(analyze(run)) == ["exploding_gradients"]
    assert analyze(run, config={"exploding_gradients": {"jump_factor": 20}}) == []
    assert analyze(run, config={"exploding_gradients": {}}) == analyze(run)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (
            {"exploding": {"jump_factor": 20}},
            ValueError,
            r"unknown detector 'exploding'; the detectors are: nonfinite, loss_spike, .*"
            r"exploding_gradients",
        ),
        (
            {"exploding_gradients": {"jump": 20}},
            ValueError,
            r"detector 'exploding_gradients' has no parameter 'jump'; its parameters are: "
            r"window, jump_factor, .*max_jumps",
        ),
        (
            {"exploding_gradients": {"jump_factor": "high"}},
            TypeError,
            r"jump_factor takes a float like its default 10.0, got str 'high'",
        ),
        (
            {"loss_spike": {"window": 2.5}},
            TypeError,
            r"window takes a int like its default 50, got float 2.5",
        ),
        ({"loss_spike": 3}, TypeError, r"config entry 'loss_spike' must be a dict of parameters"),
        ([("loss_spike", {})], TypeError, r"must be a dict by detector name such as"),
    ],
)
def test_config_errors_list_the_valid_names(tmp_path, config, error, match):
    run = _one_jump(tmp_path)
    with pytest.raises(error, match=match):
        analyze(run, config=config)


def test_the_parameters_are_the_keyword_only_ones():
    by_name = {d.name: d for d in DETECTORS}
    assert "jump_factor" in detector_parameters(by_name["exploding_gradients"])
    assert "computed" not in detector_parameters(by_name["instability"])
    assert "run" not in detector_parameters(by_name["loss_spike"])


def test_values_are_converted_to_the_default_type(tmp_path):
    run = _one_jump(tmp_path)
    config = {
        "update_ratio": {"skip": "*bias, *norm*", "high": 1},  # text -> tuple, int -> float
        "instability": {"gap": 20},
    }
    assert analyze(run, config=config) == analyze(run)  # accepted; nothing they read here


def test_parse_settings():
    assert parse_settings(["a.b=1", "a.c=0.5", "d.e=false", "a.b=2"]) == {
        "a": {"b": 2, "c": 0.5},
        "d": {"e": False},
    }
    assert [parse_value(t) for t in ("1e3", "True", "x,y", "-4")] == [1000.0, True, "x,y", -4]
    for bad in ("jump_factor=2", "a.b", "a.=1", ".b=1", "a.b="):
        with pytest.raises(ValueError, match=r"expected DETECTOR.PARAMETER=VALUE, e.g. --set"):
            parse_settings([bad])


def test_report_set(tmp_path, capsys):
    run = _one_jump(tmp_path)
    assert main(["report", str(run.run_dir), "--no-dashboard"]) == 0  # a warning
    assert "exploding_gradients" in capsys.readouterr().out
    argv = ["report", str(run.run_dir), "--no-dashboard"]
    assert main([*argv, "--set", "exploding_gradients.jump_factor=20"]) == 0
    assert "No findings" in capsys.readouterr().out
    assert main([*argv, "--set", "exploding_gradients.jump_factor=20", "--set", "x.y=1"]) == 2
    assert "--set: config names an unknown detector 'x'" in capsys.readouterr().err
    assert main([*argv, "--set", "exploding_gradients.jump=20"]) == 2
    assert "its parameters are: window, jump_factor" in capsys.readouterr().err
    assert main([*argv, "--set", "loss_spike.window=x"]) == 2
    assert "--set: detector 'loss_spike': window takes a int" in capsys.readouterr().err
    assert main([*argv, "--set", "exploding_gradients.window=1"]) == 2  # the detector's check
    assert "window" in capsys.readouterr().err
