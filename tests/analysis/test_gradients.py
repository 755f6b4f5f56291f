"""detect_exploding_gradients and detect_vanishing_gradients on synthetic gradient norms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, detect_exploding_gradients, detect_vanishing_gradients
from trainprobe.analysis.vanishing import end_tensors

STEPS = np.arange(0, 5000, 10)  # measured every 10 steps: 500 points
N = STEPS.size
PARAMS = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"]
META = {"model": {"params": PARAMS}}


def healthy_total(seed: int) -> np.ndarray:
    """Gradient norm of a healthy run: early decay, slow late drift, 2-3x mini-batch noise."""
    rng = np.random.default_rng(seed)
    level = 1.0 + 4.0 * np.exp(-STEPS / 500) + 0.5 * STEPS / 5000
    norms = level * np.exp(rng.normal(0.0, 0.35, N))
    norms[0] *= 5.0  # the first step's gradient is often the largest
    return norms


def layer_norms(seed: int, scale: dict[str, float | np.ndarray]) -> dict:
    """``norms/grad/<param>`` for PARAMS, each a noisy constant times ``scale[param]``."""
    rng = np.random.default_rng(seed)
    return {
        f"norms/grad/{p}": (STEPS, scale.get(p, 1.0) * np.exp(rng.normal(0.0, 0.3, N)))
        for p in PARAMS
    }


def loss_curve(final: float) -> tuple[np.ndarray, np.ndarray]:
    return STEPS, (2.3 - final) * np.exp(-STEPS / 800) + final


# ---------------------------------------------------------------- exploding


@pytest.mark.parametrize("seed", range(5))
def test_healthy_gradient_norm_is_quiet(tmp_path, seed):
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, healthy_total(seed))})
    assert detect_exploding_gradients(run) == []


def test_jump_is_a_warning_with_direct_evidence(tmp_path):
    norms = healthy_total(0)
    norms[250] *= 40.0
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, norms)})
    [finding] = detect_exploding_gradients(run)
    median = np.median(norms[230:250])
    assert finding.severity is Severity.WARNING
    assert (finding.start_step, finding.end_step) == (2500, 2500)
    assert finding.evidence["trailing_median"] == pytest.approx(median)
    assert finding.evidence["ratio"] == pytest.approx(norms[250] / median)
    assert finding.evidence["jump_factor"] == 10.0
    assert finding.keys == ("norms/grad_total",)


def test_jump_that_stays_is_critical_and_not_a_trend(tmp_path):
    norms = healthy_total(1)
    norms[300:] *= 1000.0
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, norms)})
    [finding] = detect_exploding_gradients(run)
    assert finding.severity is Severity.CRITICAL
    assert finding.start_step == 3000
    assert finding.evidence["median_after"] == pytest.approx(
        np.median(norms[int(finding.end_step / 10) + 1 :][:20])
    )


@pytest.mark.parametrize(
    ("decades", "severity"), [(3.0, Severity.WARNING), (5.0, Severity.CRITICAL)]
)
def test_steady_growth_is_reported_once(tmp_path, decades, severity):
    rng = np.random.default_rng(2)
    growth = np.where(STEPS < 1000, 0.0, decades * (STEPS - 1000) / 4000)
    norms = 10**growth * np.exp(rng.normal(0.0, 0.2, N))
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, norms)})
    [finding] = detect_exploding_gradients(run)
    smooth = np.array([np.median(np.log10(norms[j : j + 20])) for j in range(N - 19)])
    climb = smooth.max() - smooth[: int(np.argmax(smooth)) + 1].min()
    assert finding.severity is severity
    assert finding.evidence["decades"] == pytest.approx(climb)
    assert climb == pytest.approx(decades, abs=0.2)
    assert 800 <= finding.start_step <= 1200
    assert finding.end_step == STEPS[-1]
    assert "orders of magnitude" in finding.message


def test_fast_growth_without_a_single_jump_is_growth(tmp_path):
    rng = np.random.default_rng(3)
    ramp = np.clip((np.arange(N) - 300) / 40 * 3.0, 0.0, 3.0)  # 3 decades in 40 points
    norms = 10**ramp * np.exp(rng.normal(0.0, 0.2, N))
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, norms)})
    findings = detect_exploding_gradients(run)
    [growth] = [f for f in findings if "decades" in f.evidence]
    assert growth.evidence["decades"] == pytest.approx(3.0, abs=0.2)
    assert growth.start_step <= 3000 <= 3400 <= growth.end_step
    # a noisy point may also clear 10x its lagging median: only inside the ramp
    assert all(3000 <= f.start_step <= 3400 for f in findings if f is not growth)


def test_many_jumps_are_capped_to_the_largest(tmp_path):
    norms = healthy_total(4)
    at = np.arange(40, 480, 55)  # 8 isolated jumps
    norms[at] *= np.array([40.0, 80.0, 30.0, 90.0, 50.0, 70.0, 60.0, 45.0])
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, norms)})
    findings = detect_exploding_gradients(run)
    largest = sorted(at, key=lambda i: -norms[i] / np.median(norms[i - 20 : i]))[:5]
    assert [f.start_step for f in findings] == sorted(STEPS[largest])
    assert all(f.evidence["jumps_on_key"] == 8 for f in findings)
    assert len(detect_exploding_gradients(run, max_jumps=8)) == 8


@pytest.mark.parametrize("n", [0, 1, 3])
def test_exploding_short_series_give_nothing(tmp_path, n):
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS[:n], 10.0 ** np.arange(n))})
    assert detect_exploding_gradients(run) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 2}, "window must be at least 3 points"),
        ({"jump_factor": -1.0}, "jump_factor must be a finite number > 0"),
        ({"growth_decades": 0}, "growth_decades must be a finite number > 0"),
        ({"max_jumps": 0}, r"max_jumps must be at least 1 \(the number of jump findings\)"),
    ],
)
def test_exploding_invalid_arguments(tmp_path, kwargs, match):
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, healthy_total(0))})
    with pytest.raises(ValueError, match=match):
        detect_exploding_gradients(run, **kwargs)


# ---------------------------------------------------------------- vanishing


@pytest.mark.parametrize("seed", range(3))
def test_layers_ten_times_apart_are_healthy(tmp_path, seed):
    series = layer_norms(seed, {"fc1.weight": 0.1, "fc1.bias": 1e-6, "head.weight": 1.0})
    series["norms/grad_total"] = (STEPS, healthy_total(seed))
    series["scalars/loss"] = loss_curve(0.2)
    run = write_run(tmp_path / "r", series, meta=META)
    assert detect_vanishing_gradients(run) == []


def test_vanishing_ratio_span_and_evidence(tmp_path):
    fade = np.where(STEPS < 2000, 0.5, 1e-5)
    series = layer_norms(3, {"fc1.weight": fade})
    run = write_run(tmp_path / "r", series, meta=META)
    [finding] = detect_vanishing_gradients(run)
    ratio = series["norms/grad/fc1.weight"][1] / series["norms/grad/head.weight"][1]
    assert finding.severity is Severity.WARNING
    assert (finding.start_step, finding.end_step) == (2000, STEPS[-1])
    assert finding.evidence["median_ratio"] == pytest.approx(np.median(ratio[200:]))
    assert finding.evidence["fraction_out_of_band"] == 1.0
    assert (finding.evidence["first_tensor"], finding.evidence["last_tensor"]) == (
        "fc1.weight",
        "head.weight",
    )
    assert finding.evidence["low_ratio"] == 1e-3
    assert finding.keys == ("norms/grad/fc1.weight", "norms/grad/head.weight")
    assert "vanish" in finding.message


def test_first_layer_explosion(tmp_path):
    run = write_run(tmp_path / "r", layer_norms(4, {"fc1.weight": 1e5}), meta=META)
    [finding] = detect_vanishing_gradients(run)
    assert (finding.start_step, finding.end_step) == (0, STEPS[-1])
    assert finding.evidence["high_ratio"] == 1e3
    assert "explode" in finding.message


def test_sparse_excursions_are_not_persistent(tmp_path):
    scale = np.ones(N)
    scale[::3] = 1e-5  # a third of the measurements: never a majority of a window
    run = write_run(tmp_path / "r", layer_norms(5, {"fc1.weight": scale}), meta=META)
    assert detect_vanishing_gradients(run) == []
    [finding] = detect_vanishing_gradients(run, min_fraction=0.3)
    assert finding.evidence["fraction_out_of_band"] == pytest.approx(1 / 3, abs=0.01)


def test_weights_are_preferred_and_order_falls_back_without_meta(tmp_path):
    # the last tensor is a bias with tiny gradients: weights are compared instead
    series = layer_norms(6, {"head.bias": 1e-6})
    run = write_run(tmp_path / "r", series, meta=META)
    assert detect_vanishing_gradients(run) == []
    no_meta = write_run(tmp_path / "m", layer_norms(6, {"fc1.weight": 1e-5}))
    [finding] = detect_vanishing_gradients(no_meta)
    assert finding.evidence["first_tensor"] == "fc1.weight"


def test_collapse_with_stuck_loss_is_reported(tmp_path):
    norms = np.where(STEPS < 1000, 2.0, 1e-5) * healthy_total(7) / healthy_total(7).mean()
    series = {"norms/grad_total": (STEPS, norms), "scalars/loss": loss_curve(2.0)}
    run = write_run(tmp_path / "r", series)
    [finding] = detect_vanishing_gradients(run)
    early = np.median(norms[:5])
    assert (finding.start_step, finding.end_step) == (1000, STEPS[-1])
    assert finding.evidence["early_norm"] == pytest.approx(early)
    assert finding.evidence["median_norm"] == pytest.approx(np.median(norms[100:]))
    assert finding.evidence["loss"] == pytest.approx(np.median(series["scalars/loss"][1][100:]))
    assert finding.keys == ("norms/grad_total", "scalars/loss")


def test_collapse_of_a_converged_loss_is_healthy(tmp_path):
    norms = np.where(STEPS < 1000, 2.0, 1e-5)
    run = write_run(
        tmp_path / "r", {"norms/grad_total": (STEPS, norms), "scalars/loss": loss_curve(0.01)}
    )
    assert detect_vanishing_gradients(run) == []
    alone = write_run(
        tmp_path / "a", {"norms/grad_total": (STEPS, norms), "norms/grad/w.weight": (STEPS, norms)}
    )
    assert detect_vanishing_gradients(alone) == []  # no loss: cannot tell, so stay quiet


@pytest.mark.parametrize(("n", "expected"), [(0, 0), (1, 0), (2, 0), (3, 1), (5, 1)])
def test_vanishing_needs_three_measurements(tmp_path, n, expected):
    series = layer_norms(8, {"fc1.weight": 1e-6})
    series = {k: (s[:n], v[:n]) for k, (s, v) in series.items()}
    series["norms/grad_total"] = (STEPS[:n], np.ones(n))
    series["scalars/loss"] = (STEPS[:n], np.ones(n))
    run = write_run(tmp_path / "r", series, meta=META)
    assert len(detect_vanishing_gradients(run)) == expected


def test_unused_tensors_at_either_end_are_not_compared(tmp_path):
    # a pooler the loss never reaches (zero gradient) after the head, and a frozen stem
    params = ["stem.weight", *PARAMS, "pooler.weight"]
    series = layer_norms(9, {})
    series["norms/grad/pooler.weight"] = (STEPS, np.zeros(N))
    series["norms/grad/stem.weight"] = (STEPS, np.zeros(N))
    run = write_run(tmp_path / "r", series, meta={"model": {"params": params}})
    assert detect_vanishing_gradients(run) == []  # not "the first layer's gradients explode"
    assert end_tensors(run) == ("fc1.weight", "head.weight")


def test_zero_and_infinite_norms_are_dropped_from_the_ratio(tmp_path):
    series = layer_norms(10, {"fc1.weight": 1e-5})
    head = series["norms/grad/head.weight"][1]
    head[[3, 50, 400]] = 0.0  # a step whose last layer got no gradient
    head[[7, 60]] = np.inf  # and an overflow
    run = write_run(tmp_path / "r", series, meta=META)
    [finding] = detect_vanishing_gradients(run)
    fc1 = series["norms/grad/fc1.weight"][1]
    keep = np.isfinite(head) & (head > 0)
    assert finding.evidence["median_ratio"] == pytest.approx(np.median(fc1[keep] / head[keep]))
    json.dumps(finding.to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 1}, "window must be at least 3 points"),
        ({"low_ratio": 0.0}, "low_ratio must be a finite number > 0"),
        ({"low_ratio": 10.0, "high_ratio": 5.0}, r"low_ratio \(10.0\) must be smaller than"),
        ({"min_fraction": 1.0}, r"min_fraction must be a fraction in \[0, 1\)"),
        ({"converged_fraction": -0.1}, "converged_fraction must be a fraction"),
        ({"collapse_ratio": float("inf")}, "collapse_ratio must be a finite number > 0"),
    ],
)
def test_vanishing_invalid_arguments(tmp_path, kwargs, match):
    run = write_run(tmp_path / "r", layer_norms(0, {}), meta=META)
    with pytest.raises(ValueError, match=match):
        detect_vanishing_gradients(run, **kwargs)


def test_a_jump_below_the_level_the_run_held_is_not_an_explosion(tmp_path):
    """Near convergence a norm of 0.015 that jumps to 1.4 (91x its trailing median) is
    still below the level the run handled early on: a fit model's noise, not a blow-up."""
    t = np.arange(N)
    norms = np.exp(np.log(2.0) + (np.log(0.015) - np.log(2.0)) * t / N)  # 2 -> 0.015
    norms = norms * np.exp(np.random.default_rng(3).normal(0, 0.05, N))
    norms[N - 20] = 1.4
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, norms)})
    assert detect_exploding_gradients(run) == []
    norms[N - 20] = 50.0  # 25x anything the run held: an explosion
    run = write_run(tmp_path / "s", {"norms/grad_total": (STEPS, norms)})
    (jump,) = detect_exploding_gradients(run)
    assert jump.start_step == STEPS[N - 20] and jump.evidence["level_held"] > 1.5


def test_gradients_exploding_from_the_first_step_then_falling_are_found(tmp_path):
    """No baseline before the explosion but the first measurement: 0.13, then 8e4."""
    norms = np.concatenate([[0.13], 8e4 * np.exp(-np.arange(N - 1) / 40.0) + 0.5])
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, norms)})
    findings = detect_exploding_gradients(run)
    assert findings and findings[0].start_step == STEPS[1]
    assert findings[0].evidence["trailing_median"] == pytest.approx(0.13)


def test_growth_back_toward_the_level_held_at_the_float_floor_is_not_an_explosion(tmp_path):
    """A fit model's gradient at the float32 floor wandering 1e-20 -> 1e-17 (2.4 decades),
    after starting near 1: not growth toward anything the run has not held."""
    t = np.arange(N)
    norms = np.where(t < 50, np.exp(-t / 5.0), 5e-20 * 10 ** (2.4 * np.clip(t - 50, 0, None) / N))
    run = write_run(tmp_path / "r", {"norms/grad_total": (STEPS, norms)})
    assert not [f for f in detect_exploding_gradients(run) if "decades" in f.evidence]
