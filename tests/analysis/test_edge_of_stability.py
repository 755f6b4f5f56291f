"""detect_edge_of_stability: sharpening to the threshold (info), far above it with a bad loss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, analyze, detect_edge_of_stability

LR = 0.05
THRESHOLD = 2.0 / LR  # gradient descent: 2 / lr
MEASURED = np.arange(0, 3000, 50)  # 60 sharpness measurements
STEPS = np.arange(3000)  # the loss, every step


def sharpness(ratio: np.ndarray, *, steps: np.ndarray = MEASURED, adam: bool = False) -> dict:
    """The curvature probes' ``sharpness/*`` keys for a given ``lambda_max / threshold``."""
    n = steps.size
    return {
        "sharpness/lambda_max": (steps, ratio * THRESHOLD),
        "sharpness/threshold": (steps, np.full(n, THRESHOLD)),
        "sharpness/ratio": (steps, ratio),
        "sharpness/lr": (steps, np.full(n, LR)),
        "sharpness/preconditioned": (steps, np.full(n, float(adam))),
    }


def noisy(curve: np.ndarray, seed: int, sigma: float = 0.04) -> np.ndarray:
    return curve * np.exp(np.random.default_rng(seed).normal(0.0, sigma, curve.size))


def healthy_loss(seed: int, sigma: float = 0.05) -> np.ndarray:
    return noisy(2.0 * np.exp(-STEPS / 600) + 0.1, seed + 100, sigma)


def oscillating(loss: np.ndarray, lo: int, hi: int, swing: float = 0.4) -> np.ndarray:
    """``loss`` alternating up and down by ``swing`` at steps ``lo .. hi - 1`` (period 2)."""
    out = loss.copy()
    out[lo:hi] *= 1.0 + swing * (-1.0) ** STEPS[lo:hi]
    return out


def eos_ratio(seed: int) -> np.ndarray:
    """Sharpening from 0.2 to the threshold by step 1000, then hovering around it with noise."""
    rise = 0.2 + 0.8 * MEASURED / 1000
    return np.where(MEASURED < 1000, rise, noisy(np.ones(MEASURED.size), seed))


def measured_in(lo: int, hi: int) -> np.ndarray:
    """``[60]`` bool: the measurements at steps ``lo .. hi - 1``."""
    steps = MEASURED
    return (steps >= lo) & (steps < hi)


def unstable_ratio(seed: int, lo: int = 1000, hi: int = 2000, level: float = 2.0) -> np.ndarray:
    """0.3 of the threshold, ``level`` times it at measured steps ``lo .. hi - 1``."""
    return noisy(np.where(measured_in(lo, hi), level, 0.3), seed, 0.05)


def run_of(tmp_path, ratio: np.ndarray, loss: np.ndarray | None, **kwargs):
    series = sharpness(ratio, **kwargs)
    if loss is not None:
        series["scalars/loss"] = (STEPS, loss)
    return write_run(tmp_path / "r", series)


@pytest.mark.parametrize("seed", range(3))
def test_progressive_sharpening_then_hovering_is_one_info_finding(tmp_path, seed):
    ratio = eos_ratio(seed)
    [finding] = detect_edge_of_stability(run_of(tmp_path, ratio, healthy_loss(seed)))
    assert finding.severity is Severity.INFO and finding.detector == "edge_of_stability"
    assert finding.start_step == finding.evidence["reach_step"] == 900  # 0.2 + 0.8 * 0.9 = 0.92
    assert finding.end_step == finding.evidence["hover_end"] == MEASURED[-1]
    assert finding.evidence["hover_start"] == 900
    assert finding.evidence["hover_measurements"] == MEASURED.size - 18
    assert finding.evidence["start_ratio"] == pytest.approx(0.2)
    assert finding.evidence["hover_median"] == pytest.approx(np.median(ratio[18:]))
    assert finding.evidence["threshold_median"] == pytest.approx(THRESHOLD)
    assert "edge of stability" in finding.message and "lower the learning rate" in finding.action
    assert finding.keys == ("sharpness/lambda_max", "sharpness/threshold")


@pytest.mark.parametrize("seed", range(3))
def test_sharpness_well_below_the_threshold_is_quiet(tmp_path, seed):
    ratio = noisy(0.2 + 0.3 * MEASURED / MEASURED[-1], seed)  # 0.2 -> 0.5
    assert ratio.max() < 0.6
    assert detect_edge_of_stability(run_of(tmp_path, ratio, healthy_loss(seed))) == []


@pytest.mark.parametrize(
    "ratio",
    [
        np.full(MEASURED.size, 0.8),  # sharpening that stops short of the threshold
        np.ones(MEASURED.size),  # at the threshold from the first measurement: no rise seen
        np.where(MEASURED < 1000, 0.3, np.where(MEASURED < 1150, 1.0, 0.4)),  # 3 points, no hover
    ],
    ids=["stops-short", "no-rise", "touches-only"],
)
def test_no_info_without_a_rise_and_a_hover(tmp_path, ratio):
    assert detect_edge_of_stability(run_of(tmp_path, ratio, healthy_loss(0))) == []


def test_sharpening_again_after_a_learning_rate_cut_counts(tmp_path):
    ratio = noisy(np.ones(MEASURED.size), 10)  # at the threshold from the first measurement
    ratio[20:30] = 0.4  # the learning rate was cut: the threshold 2 / lr jumped
    ratio[30:40] = np.linspace(0.5, 1.0, 10)  # sharpening again: 0.94 at step 1900
    [finding] = detect_edge_of_stability(run_of(tmp_path, ratio, healthy_loss(10)))
    assert finding.start_step == 1900 and finding.end_step == MEASURED[-1]
    assert finding.evidence["start_ratio"] == pytest.approx(0.4)


@pytest.mark.parametrize("seed", range(3))
def test_far_above_the_threshold_with_an_oscillating_loss_is_a_warning(tmp_path, seed):
    ratio = unstable_ratio(seed)
    loss = oscillating(healthy_loss(seed), 1000, 2000)
    [finding] = detect_edge_of_stability(run_of(tmp_path, ratio, loss))
    assert finding.severity is Severity.WARNING
    assert (finding.start_step, finding.end_step) == (1000, 1950)
    inside = ratio[measured_in(1000, 2000)]
    assert finding.evidence["ratio_median"] == pytest.approx(np.median(inside))
    assert finding.evidence["ratio_peak"] == pytest.approx(inside.max())
    assert finding.evidence["measurements"] == 20 and finding.evidence["diverged"] == 0
    assert finding.evidence["sign_flip_share"] > 0.95
    assert "oscillated" in finding.message and "scalars/loss" in finding.message
    factor = finding.evidence["ratio_median"]
    assert f"at least {factor:.4g}x (to {LR / factor:.4g} or below)" in finding.action
    assert finding.action.startswith("Lower the learning rate") and "eps" not in finding.action
    assert finding.keys == ("sharpness/lambda_max", "sharpness/threshold", "scalars/loss")


def test_loss_spikes_are_evidence_too(tmp_path):
    loss = healthy_loss(1)
    loss[[1210, 1500, 1777]] *= 3.0
    [finding] = detect_edge_of_stability(run_of(tmp_path, unstable_ratio(1), loss))
    assert finding.severity is Severity.WARNING
    assert finding.evidence["loss_spikes"] == 3 and finding.evidence["spike_step"] in (
        1210,
        1500,
        1777,
    )
    assert "spiked at 3 points" in finding.message and "oscillated" not in finding.message


def test_diverging_loss_makes_it_critical(tmp_path):
    loss = oscillating(healthy_loss(2), 1000, 2000)
    loss[1000:2000] *= np.exp(np.linspace(0.0, np.log(20.0), 1000))
    [finding] = detect_edge_of_stability(run_of(tmp_path, unstable_ratio(2), loss))
    assert finding.severity is Severity.CRITICAL and finding.evidence["diverged"] == 1
    assert "oscillated" in finding.message and "diverged" in finding.message
    assert finding.action.startswith("Restart from a checkpoint before step 1000")
    assert finding.end_step == 1999  # the loss up to the next measurement, back below


def test_non_finite_loss_makes_it_critical(tmp_path):
    ratio = unstable_ratio(3, hi=3000)
    ratio[MEASURED >= 1500] = np.nan  # the probe sees NaN once the parameters are
    loss = healthy_loss(3)
    loss[1500:] = np.nan
    [finding] = detect_edge_of_stability(run_of(tmp_path, ratio, loss))
    assert finding.severity is Severity.CRITICAL
    assert finding.evidence["nonfinite_step"] == 1500
    assert (finding.start_step, finding.end_step) == (1000, 1500)
    assert "turned non-finite at step 1500" in finding.message
    json.dumps(finding.to_dict(), allow_nan=False)


@pytest.mark.parametrize("sigma", [0.02, 0.1])
@pytest.mark.parametrize("seed", range(3))
def test_far_above_the_threshold_with_a_calm_loss_is_quiet(tmp_path, seed, sigma):
    ratio = unstable_ratio(seed, hi=3000)
    assert detect_edge_of_stability(run_of(tmp_path, ratio, healthy_loss(seed, sigma))) == []


def test_far_above_the_threshold_without_a_loss_is_quiet(tmp_path):
    assert detect_edge_of_stability(run_of(tmp_path, unstable_ratio(0), None)) == []


def test_adam_action_names_eps_and_beta2(tmp_path):
    loss = oscillating(healthy_loss(4), 1000, 2000)
    run = run_of(tmp_path, unstable_ratio(4), loss, adam=True)
    [finding] = detect_edge_of_stability(run)
    assert "preconditioned" in finding.message
    assert "raise Adam's eps or lower its beta2" in finding.action


def test_signed_loss_oscillation_is_judged_in_loss_units(tmp_path):
    loss = -1.0 + np.random.default_rng(5).normal(0.0, 0.02, STEPS.size)  # e.g. a negative ELBO
    calm = run_of(tmp_path / "calm", unstable_ratio(5), loss)
    assert detect_edge_of_stability(calm) == []
    loss[1000:2000] += 0.5 * (-1.0) ** STEPS[1000:2000]
    [finding] = detect_edge_of_stability(run_of(tmp_path, unstable_ratio(5), loss))
    assert finding.severity is Severity.WARNING and "oscillated" in finding.message


def test_episodes_are_capped_at_the_highest_ratios(tmp_path):
    ratio = np.full(MEASURED.size, 0.3)
    loss = healthy_loss(6)
    for lo, level in ((500, 1.8), (1300, 3.0), (2200, 2.4)):
        ratio[measured_in(lo, lo + 400)] = level
        loss = oscillating(loss, lo, lo + 400)
    run = run_of(tmp_path, ratio, loss)
    assert [f.start_step for f in detect_edge_of_stability(run)] == [500, 1300, 2200]
    capped = detect_edge_of_stability(run, max_episodes=2)
    kept = [(f.start_step, f.evidence["ratio_median"]) for f in capped]
    assert kept == [(1300, 3.0), (2200, 2.4)]


def test_edge_then_instability_gives_both_in_step_order(tmp_path):
    ratio = eos_ratio(7)
    ratio[MEASURED >= 2200] = 2.5
    loss = oscillating(healthy_loss(7), 2200, 3000)
    info, warning = detect_edge_of_stability(run_of(tmp_path, ratio, loss))
    assert info.severity is Severity.INFO and info.end_step < 2200
    assert warning.severity is Severity.WARNING and warning.start_step == 2200


def test_one_noisy_eigenvalue_neither_breaks_a_hover_nor_makes_a_stretch(tmp_path):
    ratio = eos_ratio(8)
    ratio[[30, 45]] = [3.0, 0.1]  # one bad Lanczos estimate each way
    loss = oscillating(healthy_loss(8), 0, 3000)  # the loss gives every stretch its evidence
    [finding] = detect_edge_of_stability(run_of(tmp_path, ratio, loss))
    assert finding.severity is Severity.INFO and finding.end_step == MEASURED[-1]


def test_unknown_optimizer_without_a_threshold_gives_nothing(tmp_path):
    series = sharpness(unstable_ratio(0))
    del series["sharpness/threshold"], series["sharpness/ratio"]
    series["scalars/loss"] = (STEPS, oscillating(healthy_loss(0), 1000, 2000))
    run = write_run(tmp_path / "r", series)
    assert detect_edge_of_stability(run) == []
    assert all(f.detector != "edge_of_stability" for f in analyze(run))


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_short_series_give_nothing(tmp_path, n):
    ratio = np.array([0.2, 1.0, 2.0])[:n]
    run = run_of(tmp_path, ratio, healthy_loss(0), steps=MEASURED[:n])
    assert detect_edge_of_stability(run) == []


def test_nan_inf_and_zero_thresholds_are_skipped(tmp_path):
    ratio = eos_ratio(9)
    series = sharpness(ratio)
    lam, thr = series["sharpness/lambda_max"][1].copy(), series["sharpness/threshold"][1].copy()
    lam[[5, 25, 40]] = [np.nan, np.inf, -np.inf]
    thr[[10, 30]] = [0.0, np.nan]
    series["sharpness/lambda_max"] = (MEASURED, lam)
    series["sharpness/threshold"] = (MEASURED, thr)
    series["scalars/loss"] = (STEPS, healthy_loss(9))
    [finding] = detect_edge_of_stability(write_run(tmp_path / "r", series))
    assert finding.severity is Severity.INFO
    assert finding.evidence["hover_measurements"] == MEASURED.size - 18 - 3
    json.dumps(finding.to_dict(), allow_nan=False)


def test_analyze_runs_it_on_curvature_keys(tmp_path):
    loss = oscillating(healthy_loss(0), 1000, 2000)
    findings = analyze(run_of(tmp_path, unstable_ratio(0), loss))
    assert "edge_of_stability" in {f.detector for f in findings}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reach": 0.5}, ValueError, r"start_below \(0.6\) must be smaller than reach"),
        ({"band_high": 0.8}, ValueError, r"band_low \(0.85\) must be smaller than band_high"),
        ({"unstable_ratio": 1.2}, ValueError, r"band_high \(1.25\) must be smaller"),
        ({"start_below": 1.0}, ValueError, r"start_below must be a fraction in \[0, 1\)"),
        ({"swing_share": -0.1}, ValueError, r"swing_share must be a fraction"),
        ({"spike_rise": 0.0}, ValueError, r"spike_rise must be a finite number > 0"),
        ({"band_low": float("nan")}, ValueError, r"band_low must be a finite number > 0"),
        ({"hover_points": 1}, ValueError, r"hover_points must be at least 2"),
        ({"above_points": 3.0}, TypeError, r"above_points must be an int"),
        ({"max_episodes": 0}, ValueError, r"max_episodes must be at least 1"),
        ({"loss_window": 2}, ValueError, r"loss_window must be at least 3 points"),
    ],
)
def test_invalid_arguments_name_the_fix(tmp_path, kwargs, error, match):
    run = run_of(tmp_path, eos_ratio(0), healthy_loss(0))
    with pytest.raises(error, match=match):
        detect_edge_of_stability(run, **kwargs)


def catapulting(loss: np.ndarray, at: tuple[int, ...]) -> np.ndarray:
    """``loss`` with a catapult at each step of ``at``: 4x for two steps, back in ten."""
    out = loss.copy()
    for step in at:
        out[step : step + 10] *= 1.0 + 3.0 * np.exp(-np.arange(10) / 2.0)
    return out


def test_catapults_at_the_edge_are_one_info_finding_not_an_instability(tmp_path):
    """Gradient descent at the edge of stability spikes and comes back (Lewkowycz et al.
    2020): with λ_max hovering at 2/η, recovered spikes and gradient jumps are catapults."""
    loss = catapulting(healthy_loss(9), (1400, 2100, 2600))
    norms = noisy(np.ones(STEPS.size), 10, 0.05)
    for step in (1400, 2100, 2600):
        norms[step : step + 2] *= 30.0  # the gradient jumps with the loss
    run = write_run(
        tmp_path / "r",
        {
            **sharpness(eos_ratio(9)),
            "scalars/loss": (STEPS, loss),
            "norms/grad_total": (STEPS, norms),
        },
    )
    everything = analyze(run, fold=False)
    assert {f.detector for f in everything if f.severity >= Severity.WARNING} == {
        "loss_spike",
        "exploding_gradients",
    }  # the symptoms on their own
    findings = analyze(run)
    assert all(f.severity is Severity.INFO for f in findings), findings
    catapults = [f for f in findings if f.detector == "instability"]
    assert [f.start_step for f in catapults] == [1400, 2100, 2600]  # one per episode
    assert all("Catapults at the edge of stability" in f.message for f in catapults)
    assert all(f.evidence["sharpness_ratio_median"] > 0.85 for f in catapults)


def test_a_spike_that_does_not_recover_at_the_edge_is_still_an_instability(tmp_path):
    loss = catapulting(healthy_loss(11), (1400,))
    loss[2100:] *= 6.0  # jumps and stays up
    norms = noisy(np.ones(STEPS.size), 12, 0.05)
    norms[2100:2102] *= 30.0
    run = write_run(
        tmp_path / "r",
        {
            **sharpness(eos_ratio(11)),
            "scalars/loss": (STEPS, loss),
            "norms/grad_total": (STEPS, norms),
        },
    )
    worst = analyze(run)[0]
    assert worst.severity is Severity.CRITICAL and worst.start_step >= 2100


def test_a_recovered_spike_past_the_threshold_is_a_catapult_without_an_edge_finding(tmp_path):
    """Warmup to a large learning rate: sharpness 1.3x the threshold (above the hover band,
    so no edge-of-stability finding), one loss spike the loss comes back from."""
    loss = catapulting(healthy_loss(13), (1500,))
    run = write_run(
        tmp_path / "r",
        {**sharpness(np.full(MEASURED.size, 1.3)), "scalars/loss": (STEPS, loss)},
    )
    findings = analyze(run)
    assert all(f.severity is Severity.INFO for f in findings), findings
    (catapult,) = [f for f in findings if f.detector == "instability"]
    assert catapult.start_step == 1500 and catapult.evidence["sharpness_ratio_median"] == 1.3


def test_a_spike_far_past_the_threshold_is_not_a_catapult(tmp_path):
    """A learning-rate spike lifts λ_max / threshold to 12: past 4/η gradient descent
    diverges rather than catapults (Lewkowycz et al. 2020), so it stays a warning."""
    loss = catapulting(healthy_loss(14), (1500,))
    ratio = np.where(measured_in(1450, 1600), 12.0, 0.5)
    run = write_run(tmp_path / "r", {**sharpness(ratio), "scalars/loss": (STEPS, loss)})
    findings = analyze(run)
    assert [f.detector for f in findings if f.severity >= Severity.WARNING] == ["instability"]
    assert not [f for f in findings if "Catapults" in f.message]
