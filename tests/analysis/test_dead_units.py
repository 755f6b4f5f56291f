"""detect_dead_units: ReLU layers whose outputs went (almost) all zero and stayed there."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, analyze, detect_dead_units

STEPS = np.arange(0, 2000, 10)


def zero_frac(level: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 0.01, STEPS.size)
    return np.clip(level + noise, 0.0, 1.0)


def test_healthy_relu_layers_are_quiet(tmp_path):
    series = {
        "activations/zero_frac/fc1": (STEPS, zero_frac(np.full(STEPS.size, 0.5), 0)),
        "activations/zero_frac/fc2": (STEPS, zero_frac(np.linspace(0.5, 0.88, STEPS.size), 1)),
    }
    assert detect_dead_units(write_run(tmp_path / "r", series)) == []


def test_a_layer_killed_by_a_learning_rate_jump_is_reported_from_when_it_died(tmp_path):
    dies = np.where(STEPS < 800, 0.5, 0.9995)
    series = {
        "activations/zero_frac/fc1": (STEPS, np.clip(zero_frac(dies, 2), 0, 0.9999)),
        "activations/zero_frac/fc2": (STEPS, zero_frac(np.full(STEPS.size, 0.5), 3)),
    }
    (finding,) = analyze(write_run(tmp_path / "r", series))
    assert finding.detector == "dead_units" and finding.severity is Severity.CRITICAL
    assert 800 <= finding.start_step <= 850 and "fc1" in finding.message
    assert "fc2" not in finding.message
    assert finding.keys == ("activations/zero_frac/fc1",)


def test_mostly_dead_is_a_warning_and_a_recovered_layer_is_not_reported(tmp_path):
    series = {
        "activations/zero_frac/a": (STEPS, zero_frac(np.where(STEPS < 500, 0.5, 0.97), 4)),
        "activations/zero_frac/b": (STEPS, zero_frac(np.where(STEPS < 900, 0.99, 0.6), 5)),
    }
    (finding,) = detect_dead_units(write_run(tmp_path / "r", series))
    assert finding.severity is Severity.WARNING and "a (" in finding.message
    assert "b (" not in finding.message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 2}, "window"),
        ({"dead": 1.5}, "dead"),
        ({"dead": 0.999, "all_dead": 0.99}, "dead"),
        ({"top": 0}, "top must be an integer >= 1"),
    ],
)
def test_dead_units_arguments_are_checked(tmp_path, kwargs, match):
    run = write_run(tmp_path / "r", {"activations/zero_frac/a": (STEPS, np.full(STEPS.size, 0.5))})
    with pytest.raises(ValueError, match=match):
        detect_dead_units(run, **kwargs)
