"""detect_loss_divergence: a loss climbing well above its best level, and healthy controls."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, detect_loss_divergence, detect_loss_spikes

N = 1300
STEPS = np.arange(N)


def noisy(curve: np.ndarray, seed: int, sigma: float = 0.05) -> np.ndarray:
    """``curve`` with multiplicative (log-normal) mini-batch noise."""
    return curve * np.exp(np.random.default_rng(seed).normal(0.0, sigma, curve.size))


def diverging(seed: int, *, top: float = 17.0) -> np.ndarray:
    """Falls from 2.3 to 0.37 by step 300, then rises steadily to ``top`` over 1000 steps."""
    fall = 0.37 + 1.93 * np.exp(-STEPS / 60)
    rise = 0.37 * (top / 0.37) ** ((STEPS - 300) / 1000)
    return noisy(np.where(STEPS < 300, fall, rise), seed)


def rolling_median(x: np.ndarray, width: int = 50) -> np.ndarray:
    return np.array([np.median(x[j : j + width]) for j in range(x.size - width + 1)])


def test_smooth_divergence_is_critical_where_spikes_see_nothing(tmp_path):
    loss = diverging(0)
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    assert detect_loss_spikes(run) == []  # the trailing median follows the rise
    [finding] = detect_loss_divergence(run)
    smooth = np.exp(rolling_median(np.log(loss)))
    low = int(np.argmin(smooth))
    assert finding.severity is Severity.CRITICAL
    assert finding.evidence["min_median"] == pytest.approx(smooth[low])
    assert finding.evidence["min_step"] == low + 24  # window centre
    assert finding.evidence["final_median"] == pytest.approx(smooth[-1])
    assert finding.evidence["peak_median"] == pytest.approx(smooth.max())
    # a gradual rise starts once it clears the 2-sigma band: about band / slope steps late
    slope = np.log(17.0 / 0.37) / 1000  # per step, in log units
    assert finding.evidence["noise"] == pytest.approx(0.05, rel=0.15)
    assert finding.evidence["band"] == pytest.approx(2 * finding.evidence["noise"])
    assert 300 <= finding.start_step <= 300 + finding.evidence["band"] / slope + 10
    assert finding.start_step == finding.evidence["rise_step"] and finding.end_step == N - 1
    assert finding.evidence["peak_median"] / finding.evidence["min_median"] > 30
    assert "no recovery" in finding.message and "Lower the learning rate" in finding.action
    assert f"left its level at step {finding.start_step}" in finding.message
    assert f"before step {finding.start_step}" in finding.action
    assert finding.keys == ("scalars/loss",) and finding.detector == "loss_divergence"


DEPART = 800
"""Where the series of :func:`departing` leave their level."""


def departing(shape: str, seed: int) -> np.ndarray:
    """A loss on a plateau (0.3) or still decaying, that jumps 5x at ``DEPART`` or ramps up
    from there (``e^(t / 50)``), with 5% mini-batch noise, or 30% for the ``noisy`` ones."""
    t = STEPS
    base = 0.3 + 2.0 * np.exp(-t / 150) if "decay" in shape else np.full(N, 0.3)
    ramp = base[DEPART] * np.exp((t - DEPART) / 50)
    rise = 5.0 * base[DEPART] if shape.endswith("jump") else ramp
    return noisy(np.where(t < DEPART, base, rise), seed, 0.3 if "noisy" in shape else 0.05)


SHAPES = ["flat_jump", "decay_jump", "flat_ramp", "decay_ramp"]
SHAPES += [f"noisy_{shape}" for shape in ("flat_jump", "decay_jump", "decay_ramp")]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", SHAPES)
def test_the_span_starts_where_the_loss_leaves_its_level(tmp_path, shape, seed):
    """The start is the first point of the sustained rise, never the plateau's noise dip: a
    jump within a few steps of it, a ramp once it clears the 2-sigma band (band / slope)."""
    loss = departing(shape, seed)
    [finding] = detect_loss_divergence(write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)}))
    late = 3 if shape.endswith("jump") else finding.evidence["band"] / (1 / 50) * 1.5 + 3
    assert DEPART - 3 <= finding.start_step <= DEPART + late
    assert finding.evidence["min_step"] <= finding.start_step
    assert finding.evidence["noise"] == pytest.approx(0.3 if "noisy" in shape else 0.05, rel=0.2)
    if shape == "flat_jump":  # the old start, the minimum, was a noise dip far before
        assert finding.evidence["min_step"] < DEPART - 50


def test_a_bump_that_settles_back_does_not_start_the_span(tmp_path):
    loss = departing("noisy_flat_jump", 7)
    loss[600:640] *= 2.0  # 2x for 40 steps, then back: not where the divergence began
    [finding] = detect_loss_divergence(write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)}))
    assert DEPART - 3 <= finding.start_step <= DEPART + 3


def test_divergence_that_recovers_is_a_warning(tmp_path):
    loss = diverging(1)
    loss[900:] = noisy(np.full(N - 900, 0.4), 2)  # e.g. the learning rate was cut
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    [finding] = detect_loss_divergence(run)
    assert finding.severity is Severity.WARNING
    assert 880 <= finding.end_step <= 920  # the drop at step 900, seen at window centres
    assert finding.evidence["final_median"] == pytest.approx(np.median(loss[-50:]))
    assert "came back to" in finding.message


def test_overfitting_validation_loss_suggests_early_stopping(tmp_path):
    val = noisy(
        np.where(STEPS < 400, 0.3 + 2.0 * np.exp(-STEPS / 80), 0.3 * np.exp((STEPS - 400) / 700)), 3
    )
    run = write_run(tmp_path / "r", {"scalars/val_loss": (STEPS, val)})
    [finding] = detect_loss_divergence(run)
    assert finding.severity is Severity.CRITICAL
    assert "early stopping" in finding.action
    assert "before it" in finding.action  # a slow rise (1/700 a step) clears the band late
    assert 400 <= finding.start_step <= 400 + 1.5 * finding.evidence["band"] * 700


def test_signed_loss_is_judged_in_loss_units(tmp_path):
    rng = np.random.default_rng(4)
    loss = -1.0 + rng.normal(0.0, 0.05, N)  # e.g. a negative ELBO
    assert detect_loss_divergence(write_run(tmp_path / "q", {"scalars/loss": (STEPS, loss)})) == []
    loss[600:] += np.linspace(0.0, 4.0, N - 600)  # climbs 4 above its best -1
    [finding] = detect_loss_divergence(write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)}))
    assert finding.severity is Severity.CRITICAL
    assert finding.evidence["min_median"] == pytest.approx(-1.0, abs=0.05)
    assert "higher" in finding.message
    slope = 4.0 / (N - 600)  # it starts once it clears the band, in loss units
    assert 600 <= finding.start_step <= 600 + finding.evidence["band"] / slope + 10


@pytest.mark.parametrize("seed", range(3))
def test_healthy_curves_are_quiet(tmp_path, seed):
    t = np.arange(3000)
    lr = 0.5 * (1.0 + np.cos(np.pi * t / t.size))
    warmup = np.where(
        t < 200,
        2.3 * (1.0 + 0.5 * t / 200),  # rises 1.5x during warm-up
        3.45 * np.exp(-(t - 200) / 300) + 0.15,
    )
    curves = {
        "decay": noisy(2.0 * np.exp(-t / 300) + 0.1, seed, 0.1),
        "batch_mean": np.random.default_rng(seed).gamma(8.0, (2.0 * np.exp(-t / 400) + 0.05) / 8),
        "cosine": noisy(0.2 + 2.1 * np.exp(-np.cumsum(lr) / 300), seed, 0.08),
        "warmup": noisy(warmup, seed),
        "plateau": noisy(np.maximum(2.3 * np.exp(-t / 50), 0.9), seed, 0.1),
        # converged to 1e-4, then wanders 5x: a negligible rise, not a divergence
        "tiny": noisy(2.3 * np.exp(-t / 100) + 1e-4 * (1.0 + 4.0 * (t > 2000)), seed, 0.3),
    }
    series = {f"scalars/{name}_loss": (t, curve) for name, curve in curves.items()}
    assert detect_loss_divergence(write_run(tmp_path / "r", series)) == []


def test_zeros_and_loss_scale_are_ignored(tmp_path):
    kl = noisy(5.0 * np.exp(-(STEPS - 500) / 200) + 0.5, 5)
    kl[:500] = 0.0  # a KL term switched on at step 500: not a rise from 0
    scale = 2.0 ** (16 + np.minimum(STEPS // 200, 8))  # GradScaler's scale grows 256x
    run = write_run(
        tmp_path / "r", {"scalars/kl_loss": (STEPS, kl), "scalars/loss_scale": (STEPS, scale)}
    )
    assert detect_loss_divergence(run) == []


@pytest.mark.parametrize("n", [0, 1, 10, 19])
def test_short_series_give_nothing(tmp_path, n):
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS[:n], np.geomspace(1, 100, n))})
    assert detect_loss_divergence(run) == []


def test_short_series_use_a_quarter_of_the_points(tmp_path):
    loss = diverging(6)[::13]  # logged every 13 steps: 100 points
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS[::13], loss)})
    [finding] = detect_loss_divergence(run)
    assert finding.evidence["window"] == 25 and finding.severity is Severity.CRITICAL


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window": 4}, ValueError, "window must be at least 5 points"),
        ({"window": 50.0}, TypeError, "window must be an int"),
        ({"factor": 1.0}, ValueError, r"factor must be a finite number > 1"),
        ({"min_rise": 0.0}, ValueError, "min_rise must be a finite number > 0"),
    ],
)
def test_invalid_arguments_name_the_fix(tmp_path, kwargs, error, match):
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, diverging(0))})
    with pytest.raises(error, match=match):
        detect_loss_divergence(run, **kwargs)
