"""detect_loss_spikes: robust spikes on realistic loss curves, checked against direct numbers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, detect_loss_spikes

STEPS = np.arange(1000)


def decaying_loss(seed: int, *, sigma: float = 0.05, n: int = 1000) -> np.ndarray:
    """Exponentially decaying loss with multiplicative (log-normal) mini-batch noise."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    return (2.0 * np.exp(-steps / 300) + 0.1) * np.exp(rng.normal(0.0, sigma, n))


def trailing_reference(values: np.ndarray, i: int, window: int = 50) -> tuple[float, float]:
    """Trailing median and robust z of point ``i`` in log space, computed directly."""
    ref = np.log(values[max(0, i - window):i])
    med = np.median(ref)
    mad = np.median(np.abs(ref - med))
    return float(np.exp(med)), float((np.log(values[i]) - med) / (1.4826 * mad))


@pytest.mark.parametrize("seed", range(5))
def test_noisy_decaying_loss_has_no_spikes(tmp_path, seed):
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, decaying_loss(seed, sigma=0.1))})
    assert detect_loss_spikes(run) == []


@pytest.mark.parametrize("seed", range(3))
def test_batch_mean_noise_has_no_spikes(tmp_path, seed):
    # batch of 8 exponential per-sample losses: right-skewed, 35% relative noise
    mean = 2.0 * np.exp(-np.arange(3000) / 400) + 0.05
    loss = np.random.default_rng(seed).gamma(8.0, mean / 8.0)
    run = write_run(tmp_path / "r", {"scalars/loss": (np.arange(3000), loss)})
    assert detect_loss_spikes(run) == []


def test_slowly_converging_smooth_loss_has_no_spikes(tmp_path):
    loss = 1.0 / np.sqrt(1.0 + STEPS) + 1e-9 * np.sin(STEPS)  # MAD ~ 0 in the tail
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    assert detect_loss_spikes(run) == []


def test_two_injected_spikes_give_two_spans_with_direct_evidence(tmp_path):
    loss = decaying_loss(0)
    loss[300] *= 5.0
    loss[620:623] *= [4.0, 3.0, 2.0]
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    findings = detect_loss_spikes(run)
    assert [(f.start_step, f.end_step) for f in findings] == [(300, 300), (620, 622)]
    assert all(f.severity is Severity.WARNING for f in findings)
    assert [f.evidence["peak_step"] for f in findings] == [300, 620]
    for finding in findings:
        peak = finding.evidence["peak_step"]
        median, z = trailing_reference(loss, peak)
        assert finding.evidence["peak"] == pytest.approx(loss[peak])
        assert finding.evidence["trailing_median"] == pytest.approx(median)
        assert finding.evidence["z_score"] == pytest.approx(z)
        assert finding.evidence["z_score"] > finding.evidence["z_threshold"] == 6.0
        assert finding.keys == ("scalars/loss",)
        assert f"step {peak}" in finding.message
        assert finding.detector == "loss_spike"


def test_scheduled_steps_give_spans_in_steps(tmp_path):
    loss = decaying_loss(1, n=400)
    loss[200:202] *= 6.0
    run = write_run(tmp_path / "r", {"scalars/loss": (np.arange(400) * 10, loss)})
    [finding] = detect_loss_spikes(run)
    assert (finding.start_step, finding.end_step) == (2000, 2010)


def test_loss_that_does_not_recover_is_critical(tmp_path):
    loss = decaying_loss(2)
    loss[500:] *= 4.0
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    [finding] = detect_loss_spikes(run)
    assert finding.severity is Severity.CRITICAL
    assert finding.start_step == 500
    assert finding.end_step < 550  # the trailing median catches up within half a window
    after = loss[finding.end_step + 1:finding.end_step + 51]
    assert finding.evidence["median_after"] == pytest.approx(np.median(after))
    assert "did not recover" in finding.message
    assert "step 500" in finding.action


def test_recurrent_spikes_are_all_critical(tmp_path):
    loss = decaying_loss(3)
    at = [150, 300, 450, 600, 750, 900]
    loss[at] *= 5.0
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    findings = detect_loss_spikes(run)
    assert [f.start_step for f in findings] == at
    assert all(f.severity is Severity.CRITICAL for f in findings)
    assert all(f.evidence["spikes_on_key"] == 6 for f in findings)
    assert "spike 2 of 6" in findings[1].message
    assert all(f.severity is Severity.WARNING
               for f in detect_loss_spikes(run, recurrent_count=7))


def test_relative_margin_ignores_small_bumps_with_tiny_mad(tmp_path):
    loss = np.full(300, 1e-3) * (1.0 + 1e-9 * np.sin(np.arange(300)))
    loss[200] *= 1.2  # huge z, but only 20% above the median
    loss[250] *= 2.0  # a real doubling
    run = write_run(tmp_path / "r", {"scalars/loss": (np.arange(300), loss)})
    assert [f.start_step for f in detect_loss_spikes(run)] == [250]
    assert [f.start_step for f in detect_loss_spikes(run, min_rel_increase=0.1)] == [200, 250]


def test_signed_loss_is_scored_in_linear_space(tmp_path):
    rng = np.random.default_rng(4)
    loss = -1.0 + rng.normal(0.0, 0.01, 300)  # e.g. a negative log-likelihood bound
    loss[150] = 0.5
    run = write_run(tmp_path / "r", {"scalars/loss": (np.arange(300), loss)})
    [finding] = detect_loss_spikes(run)
    ref = loss[100:150]
    med = np.median(ref)
    assert finding.start_step == 150
    assert finding.evidence["trailing_median"] == pytest.approx(med)
    z = (loss[150] - med) / (1.4826 * np.median(np.abs(ref - med)))
    assert finding.evidence["z_score"] == pytest.approx(z)
    assert f"{loss[150] - med:.4g} above the trailing median" in finding.message


def test_spike_on_the_last_point_cannot_judge_recovery(tmp_path):
    loss = decaying_loss(8)
    loss[-1] *= 5.0
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    [finding] = detect_loss_spikes(run)
    assert (finding.start_step, finding.severity) == (999, Severity.WARNING)
    assert "median_after" not in finding.evidence  # no NaN in the evidence


def test_every_loss_key_is_checked_and_others_ignored(tmp_path):
    val = decaying_loss(5, n=100)
    val[60] *= 8.0
    acc = np.linspace(0.1, 0.9, 100)
    acc[60] = 50.0  # not a loss: never looked at
    run = write_run(tmp_path / "r", {
        "scalars/loss": (STEPS, decaying_loss(6)),
        "scalars/val_loss": (np.arange(100) * 10, val),
        "scalars/accuracy": (np.arange(100) * 10, acc),
    })
    [finding] = detect_loss_spikes(run)
    assert finding.keys == ("scalars/val_loss",)
    assert finding.start_step == 600


def test_nonfinite_points_are_skipped(tmp_path):
    loss = decaying_loss(7)
    loss[400] = np.nan
    loss[401] = np.inf
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    assert detect_loss_spikes(run) == []


@pytest.mark.parametrize("n", [0, 1, 2, 5, 10])
def test_short_series_give_nothing(tmp_path, n):
    run = write_run(tmp_path / "r", {"scalars/loss": (np.arange(n), np.linspace(1, 100, n))})
    assert detect_loss_spikes(run) == []


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"window": 2}, ValueError, "window must be at least 3 points"),
    ({"window": 50.0}, TypeError, "window must be an int"),
    ({"recovery_window": 0}, ValueError, "recovery_window must be at least 1"),
    ({"recurrent_count": 1}, ValueError, "recurrent_count must be at least 2"),
    ({"z_threshold": 0.0}, ValueError, "z_threshold must be a finite number > 0"),
    ({"min_rel_increase": float("nan")}, ValueError, "min_rel_increase must be a finite"),
])
def test_invalid_arguments_name_the_fix(tmp_path, kwargs, error, match):
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, decaying_loss(0))})
    with pytest.raises(error, match=match):
        detect_loss_spikes(run, **kwargs)
