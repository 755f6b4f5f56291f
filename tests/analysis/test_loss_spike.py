"""detect_loss_spikes: robust spikes on realistic loss curves, checked against direct numbers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, detect_loss_spikes
from trainprobe.analysis._series import is_loss_key, loss_keys
from trainprobe.analysis.loss_spike import spike_period

STEPS = np.arange(1000)


def decaying_loss(seed: int, *, sigma: float = 0.05, n: int = 1000) -> np.ndarray:
    """Exponentially decaying loss with multiplicative (log-normal) mini-batch noise."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    return (2.0 * np.exp(-steps / 300) + 0.1) * np.exp(rng.normal(0.0, sigma, n))


def trailing_reference(values: np.ndarray, i: int, window: int = 50) -> tuple[float, float]:
    """Trailing median and robust z of point ``i`` in log space, computed directly."""
    ref = np.log(values[max(0, i - window) : i])
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
    after = loss[finding.end_step + 1 : finding.end_step + 51]
    assert finding.evidence["median_after"] == pytest.approx(np.median(after))
    assert "did not recover" in finding.message
    assert "step 500" in finding.action


def test_periodic_recurrent_spikes_are_one_summary(tmp_path):
    loss = decaying_loss(3)
    at = [150, 300, 450, 600, 750, 900]
    loss[at] *= 5.0
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    [finding] = detect_loss_spikes(run)
    assert finding.severity is Severity.CRITICAL
    assert (finding.start_step, finding.end_step) == (150, 900)
    assert finding.evidence["spikes_on_key"] == 6
    assert finding.evidence["spike_steps"] == "150, 300, 450, 600, 750, ..."
    assert finding.evidence["period"] == 150
    worst = max(at, key=lambda i: trailing_reference(loss, i)[1])
    assert finding.evidence["peak_step"] == worst
    assert finding.evidence["z_score"] == pytest.approx(trailing_reference(loss, worst)[1])
    assert "spiked 6 times" in finding.message and "periodic, every 150 steps" in finding.message
    assert "drop_last=True" in finding.action


def test_epoch_end_spikes_with_gaps_are_periodic(tmp_path):
    # every epoch (100 steps) ends on a tiny remainder batch; two epochs end mildly
    loss = decaying_loss(9)
    ends = np.arange(99, 1000, 100)
    loss[ends] *= [6.0, 5.0, 1.0, 6.0, 5.0, 6.0, 1.0, 5.0, 6.0, 5.0]
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    [finding] = detect_loss_spikes(run)
    assert finding.evidence["spikes_on_key"] == 8
    assert finding.evidence["period"] == 100
    assert "data order" in finding.action


def test_irregular_recurrent_spikes_are_not_called_periodic(tmp_path):
    loss = decaying_loss(10)
    at = [130, 210, 460, 530, 800, 870]
    loss[at] *= 5.0
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    [finding] = detect_loss_spikes(run)
    assert finding.severity is Severity.CRITICAL
    assert "period" not in finding.evidence and "periodic" not in finding.message
    assert "keeps spiking" in finding.action


def test_findings_per_key_are_capped_largest_first(tmp_path):
    loss = decaying_loss(3)
    at = [150, 300, 450, 600, 750, 900]
    loss[at] *= [5.0, 3.0, 6.0, 4.0, 8.0, 7.0]
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss)})
    findings = detect_loss_spikes(run, recurrent_count=7, max_per_key=3)
    largest = sorted(at, key=lambda i: -trailing_reference(loss, i)[1])[:3]
    assert [f.start_step for f in findings] == sorted(largest)
    assert all(
        f.severity is Severity.WARNING and f.evidence["spikes_on_key"] == 6 for f in findings
    )
    assert len(detect_loss_spikes(run, recurrent_count=7)) == 5  # the default cap


def test_spike_period_needs_most_gaps_to_agree():
    assert spike_period(np.array([0, 100, 200, 300, 400])) == 100
    assert spike_period(np.array([0, 100, 201, 300, 500, 600])) == 100  # +-1 step, one gap 2x
    assert spike_period(np.array([0, 100, 200, 300])) == 100
    assert spike_period(np.array([0, 100, 200])) is None  # two gaps prove nothing
    assert spike_period(np.array([0, 100, 250, 300, 480, 700])) is None


def hinge_loss(seed: int, *, active: float = 0.1, n: int = 1000) -> np.ndarray:
    """A triplet/hinge loss: exactly 0 while the margin holds, else a half-normal value."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < active, np.abs(rng.normal(0.0, 0.2, n)), 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_mostly_zero_hinge_loss_has_no_spikes(tmp_path, seed):
    run = write_run(tmp_path / "r", {"scalars/triplet_loss": (STEPS, hinge_loss(seed))})
    assert detect_loss_spikes(run) == []  # the trailing median is 0: no flood


def test_hinge_loss_spike_is_still_found(tmp_path):
    loss = hinge_loss(1)
    active = np.flatnonzero(loss)
    loss[active[75]] = 20.0 * np.median(loss[active])
    run = write_run(tmp_path / "r", {"scalars/triplet_loss": (STEPS, loss)})
    [finding] = detect_loss_spikes(run)
    assert finding.start_step == finding.evidence["peak_step"] == active[75]
    root = np.sqrt(loss[active[25:75]])  # scored on the square root of the active values
    assert finding.evidence["trailing_median"] == pytest.approx(np.median(root) ** 2)


@pytest.mark.parametrize("seed", range(3))
def test_loss_term_switched_on_late_has_no_spikes(tmp_path, seed):
    kl = decaying_loss(seed) * 5.0
    kl[:500] = 0.0  # a KL term switched on at step 500, exactly 0 before
    run = write_run(tmp_path / "r", {"scalars/kl_loss": (STEPS, kl)})
    assert detect_loss_spikes(run) == []


def test_loss_scale_keys_are_not_losses(tmp_path):
    scale = 2.0 ** (16 + np.minimum(STEPS // 200, 8))  # GradScaler: doubles every 200 steps
    scale[[450, 730]] /= 2.0  # and backs off on an overflow
    run = write_run(
        tmp_path / "r",
        {
            "scalars/loss": (STEPS, decaying_loss(0)),
            "scalars/loss_scale": (STEPS, scale),
            "scalars/scaled_loss": (STEPS, decaying_loss(1) * scale),
        },
    )
    assert detect_loss_spikes(run) == []
    assert loss_keys(run) == ["scalars/loss"]
    assert [
        is_loss_key(k)
        for k in ("scalars/val_loss", "scalars/Loss_Scale", "scalars/loss", "norms/loss")
    ] == [True, False, True, False]


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
    run = write_run(
        tmp_path / "r",
        {
            "scalars/loss": (STEPS, decaying_loss(6)),
            "scalars/val_loss": (np.arange(100) * 10, val),
            "scalars/accuracy": (np.arange(100) * 10, acc),
        },
    )
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


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window": 2}, ValueError, "window must be at least 3 points"),
        ({"window": 50.0}, TypeError, "window must be an int"),
        ({"recovery_window": 0}, ValueError, "recovery_window must be at least 1"),
        ({"recurrent_count": 1}, ValueError, r"recurrent_count must be at least 2 \(the number"),
        ({"recurrent_count": 2.0}, TypeError, "recurrent_count must be an int"),
        ({"max_per_key": 0}, ValueError, "max_per_key must be at least 1"),
        ({"z_threshold": 0.0}, ValueError, "z_threshold must be a finite number > 0"),
        ({"min_rel_increase": float("nan")}, ValueError, "min_rel_increase must be a finite"),
        ({"start_factor": 1.0}, ValueError, r"start_factor must be a finite factor > 1 .*=4"),
    ],
)
def test_invalid_arguments_name_the_fix(tmp_path, kwargs, error, match):
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, decaying_loss(0))})
    with pytest.raises(error, match=match):
        detect_loss_spikes(run, **kwargs)


def test_a_tiny_loss_doubling_near_the_float_floor_is_not_a_spike(tmp_path):
    """A loss of 1e-3 that doubles late in training is 0.04% of its starting 2.3: noise of
    a fit model, not a spike; a rise back to a quarter of the start is one."""
    steps = np.arange(1000)
    loss = 2.3 * np.exp(-steps / 120) + 1e-3 * (1 + 0.01 * np.sin(steps))
    loss[900] = 2e-3
    run = write_run(tmp_path / "r", {"scalars/loss": (steps, loss)})
    assert detect_loss_spikes(run) == []
    loss[900] = 0.6
    run = write_run(tmp_path / "s", {"scalars/loss": (steps, loss)})
    (spike,) = detect_loss_spikes(run)
    assert spike.start_step == 900 and spike.evidence["min_level_share"] == 0.1


def unstable_from_the_start(seed: int) -> np.ndarray:
    """Weights 20x the default: the loss 3.7e3 at step 0 and 3.5e4 at step 1, down to ~2 by
    step 60 and swinging 10x between batches from there on (log-normal, sigma 1): no calm
    stretch for the trailing reference to learn the noise from."""
    rng = np.random.default_rng(seed)
    steps = np.arange(300)
    level = 2.0 + 3.7e3 * np.exp(-steps / 8)  # [300]
    loss = level * np.exp(rng.normal(0.0, 1.0, steps.size))
    loss[0], loss[1] = 3.7e3, 3.5e4
    return loss


def test_a_loss_that_jumps_at_the_first_update_is_a_spike_at_the_start(tmp_path):
    """Holdout ``ho_init_weights_x20``: the trailing test needs 10 points before it judges,
    and after them the loss swings so much that nothing stands out; the first update's
    9.5x jump, judged against the first value, does."""
    loss = unstable_from_the_start(0)
    run = write_run(tmp_path / "r", {"scalars/loss": (np.arange(300), loss)})
    (finding,) = detect_loss_spikes(run)
    assert (finding.start_step, finding.end_step, finding.severity) == (1, 1, Severity.WARNING)
    assert finding.message.startswith("At the start of training, scalars/loss spiked to 3.5e+04")
    assert "9.459x the first value 3700" in finding.message
    assert finding.evidence["first_loss"] == 3.7e3 and finding.evidence["start_factor"] == 4.0
    assert 1.0 < finding.evidence["settled_level"] < 5.0
    assert "z_score" not in finding.evidence  # no spread to score against at step 1
    assert detect_loss_spikes(run, start_factor=10.0) == []


@pytest.mark.parametrize("seed", range(3))
def test_the_first_points_of_healthy_runs_are_not_spikes(tmp_path, seed):
    """At initialisation the per-example losses are alike, so the first points move little:
    an RMSprop-like first update that doubles the loss, and a loss term climbing from
    near zero and staying up (a VAE's KL leaving the prior), are not spikes at the start."""
    loss = decaying_loss(seed)
    loss[1] = 2.1 * loss[0]  # the largest healthy overshoot measured (holdout, RMSprop)
    kl = 30.0 * (1.0 - np.exp(-STEPS / 3.0)) + 0.01  # 0.01 -> 30 within ten steps
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss), "scalars/kl_loss": (STEPS, kl)})
    assert detect_loss_spikes(run) == []


GRAD = "norms/grad_total"


def grad_norms(seed: int, n: int = 1000) -> np.ndarray:
    """A global gradient norm near 1 that swings ~30% between mini-batches (log-normal)."""
    return np.exp(np.random.default_rng(100 + seed).normal(0.0, 0.3, n))


def spiked_run(tmp_path, *, loss_at, grad_at=(), grad_steps=STEPS, seed=0):
    """A decaying loss spiking 5x at ``loss_at``; the grad norm, recorded at ``grad_steps``,
    20x at the steps ``grad_at``."""
    loss = decaying_loss(seed)
    loss[list(loss_at)] *= 5.0
    grad = grad_norms(seed, grad_steps.size)
    grad[np.searchsorted(grad_steps, list(grad_at))] *= 20.0
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS, loss), GRAD: (grad_steps, grad)})
    return run, grad


def test_a_grad_norm_spike_3_steps_ahead_is_reported_with_its_lead(tmp_path):
    run, grad = spiked_run(tmp_path, loss_at=[600], grad_at=[597])
    [finding] = detect_loss_spikes(run)
    ev = finding.evidence
    median, _ = trailing_reference(grad, 597)  # the norm's own trailing median, direct
    assert ev["grad_spike_before"] is True
    assert (ev["grad_spike_step"], ev["grad_lead_steps"], ev["grad_lead_resolution"]) == (597, 3, 1)
    assert ev["grad_spike_ratio"] == pytest.approx(grad[597] / median)
    assert ev["grad_lookback_steps"] == 50  # the steps the loss's own reference covers
    assert ev["grad_norm"] == (
        f"{GRAD} {grad[597] / median:.4g}x its trailing median {median:.4g} at step 597, "
        "3 steps before"
    )
    assert "gave 3 steps of warning" in finding.action
    assert f"max_norm about {median:.4g}" in finding.action
    assert finding.keys == ("scalars/loss",)  # the evidence is extra; the finding is the loss's


def test_a_grad_norm_spike_at_the_same_step_has_lead_0(tmp_path):
    run, _ = spiked_run(tmp_path, loss_at=[600], grad_at=[600])
    [finding] = detect_loss_spikes(run)
    assert (finding.evidence["grad_spike_step"], finding.evidence["grad_lead_steps"]) == (600, 0)
    assert finding.evidence["grad_norm"].endswith("at step 600, the same step")
    assert "warning" not in finding.action  # no time gained: the action stays as it was


def test_no_grad_norm_spike_before_is_reported_absent(tmp_path):
    # a grad spike 100 steps earlier is outside the window; one before the first loss spike
    # is not credited to the next, 20 steps later
    run, _ = spiked_run(tmp_path, loss_at=[400, 420, 600], grad_at=[398, 500])
    first, second, third = detect_loss_spikes(run)
    assert first.evidence["grad_lead_steps"] == 2
    for finding, searched in ((second, 19), (third, 50)):  # steps 401-420 and 550-600
        ev = finding.evidence
        assert ev["grad_spike_before"] is False
        assert not {"grad_spike_step", "grad_lead_steps", "grad_spike_ratio"} & set(ev)
        assert ev["grad_lookback_steps"] == searched
        assert ev["grad_norm"] == f"no {GRAD} spike in the {searched} steps before " + (
            f"({searched + 1} measurements scored)"
        )
        assert "warning" not in finding.action


def test_without_the_grad_norm_the_finding_says_nothing_about_it(tmp_path):
    loss = decaying_loss(0)
    loss[600] *= 5.0
    bare = write_run(tmp_path / "bare", {"scalars/loss": (STEPS, loss)})
    [finding] = detect_loss_spikes(bare)
    assert not [k for k in finding.evidence if k.startswith("grad")]
    with_grad, _ = spiked_run(tmp_path, loss_at=[600], grad_at=[597])
    [other] = detect_loss_spikes(with_grad)
    # the grad norm only adds evidence and a sentence: the spike itself is unchanged
    same = ("start_step", "end_step", "severity", "message", "keys")
    assert [getattr(other, a) for a in same] == [getattr(finding, a) for a in same]
    assert finding.evidence.items() <= other.evidence.items()
    assert other.action.startswith(finding.action)


@pytest.mark.parametrize(
    ("loss_step", "grad_step", "lead"), [(597, 590, "7 steps before"), (600, 600, "the same step")]
)
def test_a_coarse_grad_norm_schedule_gives_the_leads_resolution(
    tmp_path, loss_step, grad_step, lead
):
    """Recorded every 10 steps (the probe's default) against a loss every step: the spike
    measured at step 590 was seen 7 steps ahead, but it may have begun at step 581."""
    every_10 = np.arange(0, 1000, 10)
    run, grad = spiked_run(tmp_path, loss_at=[loss_step], grad_at=[grad_step], grad_steps=every_10)
    [finding] = detect_loss_spikes(run)
    ev = finding.evidence
    assert (ev["grad_spike_step"], ev["grad_lead_resolution"]) == (grad_step, 10)
    assert ev["grad_lead_steps"] == loss_step - grad_step
    median, _ = trailing_reference(grad, grad_step // 10)  # over its own 50 measurements
    assert ev["grad_spike_ratio"] == pytest.approx(grad[grad_step // 10] / median)
    assert ev["grad_norm"].endswith(
        f"at step {grad_step}, {lead} (to within 10 steps, the spacing of the measurements)"
    )


@pytest.mark.parametrize(("until", "lasted"), [(1000, 600), (570, 560)])
def test_a_grad_norm_spike_begun_before_the_window_is_no_onset(tmp_path, until, lasted):
    """Every 10 steps, the norm jumps 20x at step 500 and stays (or comes down at step 570):
    at the loss spike at step 600 it is far above its 50-measurement median, but it rose
    100 steps before: no warning of this spike. At step 590 it dips to 3x, under the z test
    but still high: the same spike goes on."""
    every_10 = np.arange(0, 1000, 10)
    grad_at = [s for s in range(500, until, 10) if s != 590]
    run, grad = spiked_run(tmp_path, loss_at=[600], grad_at=grad_at, grad_steps=every_10)
    if until == 1000:
        grad[59] *= 3.0
        loss = run.series("scalars/loss").values
        run = write_run(tmp_path / "s", {"scalars/loss": (STEPS, loss), GRAD: (every_10, grad)})
        _, z = trailing_reference(grad, 59)
        assert z < 6.0  # under the z test on its own
    [finding] = detect_loss_spikes(run)
    ev = finding.evidence
    assert ev["grad_spike_before"] is False and "warning" not in finding.action
    assert (ev["grad_spike_began"], ev["grad_spike_lasted_to"]) == (500, lasted)
    assert ev["grad_norm"] == (
        f"no new {GRAD} spike in the 50 steps before: one that began at step 500 lasted to "
        f"step {lasted}"
    )


def test_recurrent_spikes_count_those_the_grad_norm_spiked_before(tmp_path):
    at = [150, 300, 450, 600, 750, 900]
    run, _ = spiked_run(tmp_path, loss_at=at, grad_at=[148, 298, 449, 600])
    [finding] = detect_loss_spikes(run)
    ev = finding.evidence
    assert (ev["grad_spikes_before"], ev["grad_spikes_judged"]) == (4, 6)
    assert (ev["grad_lead_min"], ev["grad_lead_max"], ev["grad_lead_median"]) == (0, 2, 1.5)
    assert ev["grad_norm"] == f"{GRAD} spiked before 4 of the 6 spikes judged, 0-2 steps before"
    assert "gave 2 steps of warning (median over 3 of 6 spikes)" in finding.action


def test_a_spike_at_the_start_is_not_judged_on_the_grad_norm(tmp_path):
    """The first points have no grad-norm reference either: the evidence says so."""
    loss = unstable_from_the_start(0)
    steps = np.arange(300)
    run = write_run(
        tmp_path / "r", {"scalars/loss": (steps, loss), GRAD: (steps, grad_norms(0, 300))}
    )
    (finding,) = detect_loss_spikes(run)
    assert finding.start_step == 1 and "grad_spike_before" not in finding.evidence
    assert finding.evidence["grad_norm"].startswith("not judged: no norms/grad_total point")
