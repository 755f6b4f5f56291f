"""detect_output_logit_drift on synthetic series: a steady drift past the limit that lasts
to the end is reported (info) with its start, size and rate; a remedy-sized drift, a
transient excursion and a flat series are not."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, analyze, detect_output_logit_drift

STEPS = np.arange(0, 3000, 50)


def _run(tmp_path, log_z: np.ndarray):
    return write_run(tmp_path / "r", {"logits/log_z_mean": (STEPS[: log_z.size], log_z)})


def test_a_steady_drift_is_reported_with_its_start_size_and_rate(tmp_path):
    log_z = np.where(STEPS < 500, 8.0, 8.0 - (STEPS - 500) / 1000 * 18)  # to -37 at 2950
    (finding,) = detect_output_logit_drift(_run(tmp_path, log_z))
    assert finding.severity == Severity.INFO
    assert finding.start_step == 750  # the last point within 5 nats (limit / 4) of the start
    assert finding.end_step == 2950
    assert finding.evidence["early_log_z"] == 8.0
    assert finding.evidence["drift"] == pytest.approx(-42.3, abs=0.01)  # median of the last 5
    assert finding.evidence["per_1000_steps"] == pytest.approx(-18.0, rel=1e-6)
    assert "below" in finding.message and "z-loss" in finding.action
    assert [f.detector for f in analyze(_run(tmp_path / "b", log_z))] == ["output_logit_drift"]


def test_an_upward_drift_is_reported_too(tmp_path):
    log_z = 3.0 + STEPS / 100.0  # to 32.5
    (finding,) = detect_output_logit_drift(_run(tmp_path, log_z))
    assert finding.evidence["drift"] > 20 and "above" in finding.message


@pytest.mark.parametrize(
    "log_z",
    [
        np.full(STEPS.size, 7.5),  # the control
        8.0 - np.minimum(STEPS, 1000) / 100.0,  # the z-loss remedy: 10 nats, then held
        np.where((STEPS > 1000) & (STEPS < 1500), -30.0, 8.0),  # an excursion that returns
        np.where(STEPS < 2800, 8.0 - STEPS / 100.0, 8.0),  # back at the end
        np.full(6, -40.0),  # too few measurements for an early level and an end
    ],
    ids=["control", "remedy", "excursion", "returned", "short"],
)
def test_no_finding_without_a_drift_that_lasts(tmp_path, log_z):
    assert detect_output_logit_drift(_run(tmp_path, log_z)) == []


def test_thresholds_are_checked(tmp_path):
    run = _run(tmp_path, np.full(STEPS.size, 1.0))
    with pytest.raises(ValueError, match="limit"):
        detect_output_logit_drift(run, limit=-1)
    with pytest.raises(ValueError, match="early"):
        detect_output_logit_drift(run, early=0)
