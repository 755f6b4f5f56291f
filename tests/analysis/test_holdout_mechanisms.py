"""The three mechanisms the holdout exposed, end to end through ``analyze`` (what a user
sees), on synthetic series shaped like the holdout's recorded ones: a small tensor growing
into its scale (``ho_tiny_batches_label_noise``), a run unstable from its first step
(``ho_init_weights_x20``) and a class unlearned after convergence
(``ho_minority_relabelled``)."""

from __future__ import annotations

import numpy as np

from tests.synth import write_run
from trainprobe.analysis import Severity, analyze

STEPS = np.arange(0, 2000, 10)  # the default every-10 schedule of the norm probes


def alarms(run) -> list:
    return [f for f in analyze(run) if f.severity >= Severity.WARNING]


def test_a_tiny_batch_run_whose_output_bias_grows_into_its_scale_is_quiet(tmp_path):
    """Batches of 4 under plain SGD: the loss starts at ln 3 with little noise (nothing is
    learned yet, so the examples' losses are alike), then single-batch losses swing 10x
    around a falling level; the output bias starts at 0.14 and grows 12x to 1.7, moved by
    ~0.02 per step (ratio 0.15 while small, 0.012 once grown)."""
    rng = np.random.default_rng(0)
    every = np.arange(2000)
    level = 0.6 + 0.5 * np.exp(-every / 600)
    spread = np.minimum(0.05 + every / 100, 0.7)  # homogeneous at first, 10x swings later
    series = {"scalars/loss": (every, level * np.exp(rng.normal(0.0, spread)))}
    bias = 0.14 * np.exp(np.log(12.0) * np.clip((STEPS - 200) / 1200, 0.0, 1.0))
    norms = {"0.weight": np.full(STEPS.size, 4.6), "2.weight": np.full(STEPS.size, 4.6)}
    norms |= {"4.weight": np.linspace(1.0, 3.2, STEPS.size), "4.bias": bias}
    for name, norm in norms.items():
        step = 0.02 if name == "4.bias" else 5e-3 * norm
        series[f"norms/weight/{name}"] = (STEPS, norm)
        series[f"updates/ratio/{name}"] = (STEPS, step * rng.lognormal(0.0, 0.4, STEPS.size) / norm)
    series["norms/grad_total"] = (STEPS, rng.lognormal(0.0, 0.5, STEPS.size))
    assert np.median(series["updates/ratio/4.bias"][1][:20]) > 0.1  # the old false alarm
    assert alarms(write_run(tmp_path / "r", series)) == []


def test_a_run_unstable_from_its_first_step_is_found_at_its_start(tmp_path):
    """Weights 20x the default: the loss 3.7e3 at step 0 and 3.5e4 at step 1, then 1 to 30
    for the rest of the run, the gradient norm swinging 200x: no calm stretch to compare
    with, but the first update's 9.4x jump over the first value is a spike at the start."""
    rng = np.random.default_rng(1)
    every = np.arange(300)
    loss = (2.0 + 3.7e3 * np.exp(-every / 8)) * np.exp(rng.normal(0.0, 1.0, every.size))
    loss[0], loss[1] = 3689.0, 34689.0
    grad = 2.5e3 * np.exp(-np.arange(30) / 2) + rng.lognormal(1.0, 1.5, 30)  # [30]
    run = write_run(
        tmp_path / "r",
        {"scalars/loss": (every, loss), "norms/grad_total": (np.arange(0, 300, 10), grad)},
    )
    found = alarms(run)
    assert [(f.detector, f.start_step) for f in found] == [("loss_spike", 1)]
    assert found[0].message.startswith("At the start of training")
    assert found[0].evidence["first_loss"] == 3689.0


def test_both_episodes_of_a_relabelled_minority_are_found(tmp_path):
    """Five classes at 6:6:6:6:1 on a fixed batch: the minority's loss rises 1.5 -> 3.4
    over the first 20 steps while the batch loss falls (imbalance), is learned by ~60,
    and from step 200 its labels read another class: its loss climbs 0.85 -> 5.3 while
    the others stay learned and the batch loss rises only 0.26 -> 0.4."""
    steps = np.arange(0, 400, 4)
    learned = 0.22 + 1.4 * np.exp(-steps / 12)
    early = 1.5 + 1.9 * np.sin(np.pi * np.clip(steps / 40, 0.0, 1.0))
    minority = np.where(steps < 40, early, 0.85 + 0.6 * np.exp(-(steps - 40) / 10))
    minority = minority + np.where(steps >= 200, 4.5 * (1 - np.exp(-(steps - 200) / 40)), 0.0)
    losses = {0: learned, 1: learned * 0.9, 2: learned * 1.1, 3: learned, 4: minority}
    series = {}
    for c, loss in losses.items():
        series[f"conflict/loss/class_{c}"] = (steps, loss)
        series[f"conflict/count/class_{c}"] = (
            steps,
            np.full(steps.size, 35.0 if c == 4 else 245.0),
        )
        series[f"conflict/norm/class_{c}"] = (steps, loss)
    found = alarms(write_run(tmp_path / "r", series))
    assert [f.detector for f in found] == ["class_competition"] * 2
    rising, unlearned = sorted(found, key=lambda f: f.start_step)
    assert "batch loss falls" in rising.message and rising.start_step <= 42
    assert "holds steady" in unlearned.message and 200 <= unlearned.start_step <= 210
    assert unlearned.end_step == steps[-1]
