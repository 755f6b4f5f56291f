"""detect_nonfinite: where NaN/Inf first appeared, and in which tensor."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, detect_nonfinite

PARAMS = ["embed.weight", "fc1.weight", "fc1.bias", "head.weight"]
META = {"model": {"params": PARAMS}}
STEPS = np.arange(300)


def nonfinite_series(
    *, loss=(), grad=(), param=(), first_grad=None, first_param=None, n: int = STEPS.size
):
    """``nonfinite/*`` keys with the given bad steps (``n`` steps, every step recorded)."""
    steps = np.arange(n)
    series = {}
    for name, bad in (("loss", loss), ("grad", grad), ("param", param)):
        values = np.zeros(n)
        values[list(bad)] = 1.0 if name == "loss" else 2.0
        series[f"nonfinite/{name}"] = (steps, values)
    for name, index in (("first_grad", first_grad), ("first_param", first_param)):
        values = np.full(n, -1.0)
        bad = grad if name == "first_grad" else param
        if index is not None:
            values[list(bad)] = index
        series[f"nonfinite/{name}"] = (steps, values)
    return series


def test_finite_run_gives_nothing(tmp_path):
    run = write_run(tmp_path / "r", nonfinite_series(), meta=META)
    assert detect_nonfinite(run) == []


def test_gradients_first_names_the_tensor_and_the_order(tmp_path):
    series = nonfinite_series(
        loss=range(122, 300),
        grad=range(120, 300),
        param=range(121, 300),
        first_grad=1,
        first_param=3,
    )
    run = write_run(tmp_path / "r", series, meta=META)
    [finding] = detect_nonfinite(run)
    assert finding.severity is Severity.CRITICAL
    assert (finding.start_step, finding.end_step) == (120, 299)
    assert finding.evidence["origin"] == "grad"
    assert finding.evidence["first_grad_tensor"] == "fc1.weight"
    assert finding.evidence["first_param_tensor"] == "head.weight"
    assert (
        finding.evidence["first_loss_step"],
        finding.evidence["first_grad_step"],
        finding.evidence["first_param_step"],
    ) == (122, 120, 121)
    assert finding.evidence["bad_steps"] == 180
    assert finding.message.startswith(
        "NaN/Inf first appeared in the gradients at step 120 (first tensor 'fc1.weight'), "
        "then in the parameters at step 121"
    )
    assert "detect_anomaly" in finding.action and "'fc1.weight'" in finding.action
    assert finding.keys == ("nonfinite/loss", "nonfinite/grad", "nonfinite/param")


def test_loss_wins_a_tie_with_gradients(tmp_path):
    series = nonfinite_series(loss=[50, 51], grad=[50, 51], param=[51], first_grad=0, first_param=0)
    run = write_run(tmp_path / "r", series, meta=META)
    [finding] = detect_nonfinite(run)
    assert finding.evidence["origin"] == "loss"
    assert (finding.start_step, finding.end_step) == (50, 51)
    assert "inputs and the loss at step 50" in finding.action


def test_parameters_first_blame_the_update(tmp_path):
    series = nonfinite_series(param=range(200, 300), loss=range(201, 300), first_param=2)
    run = write_run(tmp_path / "r", series, meta=META)
    [finding] = detect_nonfinite(run)
    assert finding.evidence["origin"] == "param"
    assert finding.evidence["first_param_tensor"] == "fc1.bias"
    assert finding.evidence["first_grad_step"] == -1
    assert "optimizer update" in finding.action and "'fc1.bias'" in finding.action


def test_frequent_skipped_steps_are_a_warning(tmp_path):
    # a dynamic loss scaler: overflowing gradients, step skipped, parameters stay finite;
    # 3 of 300 steps is 1%, too many for a scaler that has found its scale
    run = write_run(tmp_path / "r", nonfinite_series(grad=[10, 95, 180], first_grad=0), meta=META)
    [finding] = detect_nonfinite(run)
    assert finding.severity is Severity.WARNING
    assert (finding.start_step, finding.end_step, finding.evidence["bad_steps"]) == (10, 180, 3)
    assert finding.evidence["bad_fraction"] == pytest.approx(0.01)
    assert "GradScaler" in finding.action and "bfloat16" in finding.action


@pytest.mark.parametrize("bad", [[95, 180], [0, 1, 2, 3, 4, 1200, 2400]])
def test_rare_isolated_skipped_steps_are_info(tmp_path, bad):
    # GradScaler backing off now and then, or settling its 2^16 initial scale at the start
    run = write_run(tmp_path / "r", nonfinite_series(grad=bad, first_grad=0, n=3000), meta=META)
    [finding] = detect_nonfinite(run)
    assert finding.severity is Severity.INFO
    assert finding.evidence["checked_steps"] == 3000
    assert finding.evidence["longest_run"] == (5 if 0 in bad else 1)
    assert "Nothing to do" in finding.action


def test_a_long_run_of_skipped_steps_is_a_warning(tmp_path):
    run = write_run(tmp_path / "r", nonfinite_series(grad=range(1000, 1006), n=3000), meta=META)
    [finding] = detect_nonfinite(run)
    assert finding.severity is Severity.WARNING  # 0.2% of steps, but 6 in a row
    assert finding.evidence["longest_run"] == 6
    [allowed] = detect_nonfinite(run, max_run=6)
    assert allowed.severity is Severity.INFO


def test_rare_nonfinite_loss_stays_critical(tmp_path):
    run = write_run(tmp_path / "r", nonfinite_series(loss=[95], grad=[95], n=3000), meta=META)
    [finding] = detect_nonfinite(run)
    assert finding.severity is Severity.CRITICAL
    assert "checked_steps" not in finding.evidence


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rare_fraction": 1.0}, ValueError, r"rare_fraction must be a fraction in \[0, 1\)"),
        ({"max_run": 0}, ValueError, r"max_run must be at least 1 \(the number of consecutive"),
        ({"max_run": 2.5}, TypeError, "max_run must be an int"),
    ],
)
def test_invalid_arguments_name_the_fix(tmp_path, kwargs, error, match):
    run = write_run(tmp_path / "r", nonfinite_series(grad=[10]), meta=META)
    with pytest.raises(error, match=match):
        detect_nonfinite(run, **kwargs)


def test_gradients_without_param_flags_stay_critical(tmp_path):
    series = {"nonfinite/grad": nonfinite_series(grad=[10])["nonfinite/grad"]}
    run = write_run(tmp_path / "r", series, meta=META)
    [finding] = detect_nonfinite(run)
    assert finding.severity is Severity.CRITICAL
    assert "first_grad_tensor" not in finding.evidence


def test_names_fall_back_to_gradient_norm_order_without_meta(tmp_path):
    series = nonfinite_series(grad=[7], first_grad=1)
    series["norms/grad/a.weight"] = (STEPS[::10], np.ones(30))
    series["norms/grad/b.weight"] = (STEPS[::10], np.ones(30))
    run = write_run(tmp_path / "r", series)
    [finding] = detect_nonfinite(run)
    assert finding.evidence["first_grad_tensor"] == "b.weight"


@pytest.mark.parametrize("index", [-1, 99])
def test_unknown_tensor_index_is_left_out(tmp_path, index):
    run = write_run(tmp_path / "r", nonfinite_series(grad=[7], first_grad=index), meta=META)
    [finding] = detect_nonfinite(run)
    assert "first_grad_tensor" not in finding.evidence
    assert "first tensor" not in finding.message


def test_loss_flag_alone_is_enough(tmp_path):
    loss = np.zeros(3)
    loss[2] = 1.0
    run = write_run(tmp_path / "r", {"nonfinite/loss": (np.arange(3), loss)})
    [finding] = detect_nonfinite(run)
    assert (finding.start_step, finding.evidence["origin"]) == (2, "loss")
