"""Detectors over the gradient-structure probes: conflict, class competition, noise scale."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import (
    Severity,
    analyze,
    detect_class_competition,
    detect_gradient_conflict,
    detect_noise_scale,
)

STEPS = np.arange(0, 1000, 10)  # 100 measurements
N = STEPS.size


def noisy(level, seed: int, scale: float = 0.05) -> np.ndarray:
    return np.asarray(level, dtype=float) + np.random.default_rng(seed).normal(0, scale, N)


# -- gradient_conflict -------------------------------------------------------------------


def test_aligned_tasks_and_isolated_negative_readings_are_quiet(tmp_path):
    spiky = noisy(0.3, 1)
    spiky[[10, 40, 41, 70]] = -0.9  # single bad readings, never a rolling-median majority
    run = write_run(
        tmp_path / "r",
        {
            "conflict/cos/depth__seg": (STEPS, noisy(0.5, 0)),
            "conflict/cos/depth__normals": (STEPS, spiky),
        },
    )
    assert detect_gradient_conflict(run) == []


@pytest.mark.parametrize(("weak", "harmful"), [(1.0, False), (0.7, False), (0.05, True)])
def test_mild_conflict_counts_only_when_the_sum_raises_the_weaker_task(tmp_path, weak, harmful):
    """cos -0.2 with task b's gradient ``weak`` times task a's: the summed update changes
    b's loss by -(|g_b|^2 + |g_a||g_b| cos), an increase only when cos < -|g_b|/|g_a|."""
    series = {
        "conflict/cos/task_a__task_b": (STEPS, noisy(-0.2, 5, 0.03)),
        "conflict/norm/task_a": (STEPS, np.ones(N)),
        "conflict/norm/task_b": (STEPS, np.full(N, weak)),
    }
    findings = detect_gradient_conflict(write_run(tmp_path / "r", series))
    assert bool(findings) is harmful
    if harmful:
        assert findings[0].severity is Severity.WARNING


def test_persistent_conflict_is_a_warning_with_its_span(tmp_path):
    cos = noisy(0.4, 2)
    cos[30:60] = noisy(-0.3, 3)[30:60]  # steps 300..590
    run = write_run(
        tmp_path / "r",
        {
            "conflict/cos/depth__seg": (STEPS, cos),
            "conflict/pcgrad_shift": (STEPS, np.full(N, 0.25)),
        },
    )
    (finding,) = detect_gradient_conflict(run)
    assert finding.severity is Severity.WARNING
    assert 270 <= finding.start_step <= 320 and 570 <= finding.end_step <= 620
    assert finding.evidence["median_cos[depth__seg]"] == pytest.approx(-0.3, abs=0.05)
    assert finding.evidence["median_pcgrad_shift"] == pytest.approx(0.25)
    assert "depth vs seg" in finding.message and "PCGrad" in finding.action
    assert finding.keys == ("conflict/cos/depth__seg",)


def test_strong_lasting_conflict_is_critical_and_short_strong_conflict_is_not(tmp_path):
    long_fight = noisy(-0.7, 4)
    long_fight[:10] = 0.5  # aligned at first, then fighting for 90% of training
    short_fight = noisy(0.5, 5)
    short_fight[50:60] = -0.8
    run = write_run(
        tmp_path / "r",
        {"conflict/cos/a__b": (STEPS, long_fight), "conflict/cos/a__c": (STEPS, short_fight)},
    )
    findings = {f.severity: f for f in detect_gradient_conflict(run)}
    assert set(findings) == {Severity.CRITICAL, Severity.WARNING}
    assert findings[Severity.CRITICAL].keys == ("conflict/cos/a__b",)
    assert findings[Severity.WARNING].keys == ("conflict/cos/a__c",)


@pytest.mark.parametrize(
    ("update", "severity"),
    [
        ("pcgrad", Severity.INFO),  # the loop projects: nothing to advise
        ("sum", Severity.CRITICAL),  # the plain sum: offset 0, the weaker task loses
        ("reweighted_but_harmful", Severity.CRITICAL),  # moved, yet a task still loses
        ("unrecorded", Severity.CRITICAL),  # no .grad (scan, evaluation): as before
    ],
)
def test_conflict_the_update_already_resolves_is_information(tmp_path, update, severity):
    """A PCGrad step has cos >= 0 with every task and moves C by PCGrad's own shift."""
    series = {
        "conflict/cos/depth__seg": (STEPS, noisy(-0.7, 8)),
        "conflict/pcgrad_shift": (STEPS, noisy(0.6, 9, 0.02)),
    }
    applied = {
        "pcgrad": (noisy(0.3, 10), noisy(0.002, 11, 0.001), noisy(0.6, 12, 0.02)),
        "sum": (noisy(0.4, 10), noisy(-0.3, 11), np.zeros(N)),
        "reweighted_but_harmful": (noisy(0.4, 10), noisy(-0.2, 11), noisy(0.5, 12, 0.02)),
    }.get(update)
    if applied is not None:
        series["conflict/applied_cos/depth"] = (STEPS, applied[0])
        series["conflict/applied_cos/seg"] = (STEPS, applied[1])
        series["conflict/applied_offset"] = (STEPS, applied[2])
    (finding,) = detect_gradient_conflict(write_run(tmp_path / "r", series))
    assert finding.severity is severity
    if severity is Severity.INFO:
        assert "already resolves" in finding.message and "Nothing to project" in finding.action
        assert finding.evidence["median_applied_min_cos[depth__seg]"] >= 0
    else:
        assert "PCGrad" in finding.action


def test_class_and_microbatch_pairs_are_left_to_other_detectors(tmp_path):
    """Per-class gradients near -0.9 are normal in healthy balanced classification."""
    run = write_run(
        tmp_path / "r",
        {
            "conflict/cos/class_0__class_1": (STEPS, noisy(-0.9, 6)),
            "conflict/cos/micro_0__micro_1": (STEPS, noisy(-0.5, 7)),
        },
    )
    assert detect_gradient_conflict(run) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 2}, "window must be at least 3"),
        ({"conflict_cos": 0.1}, r"conflict_cos \(0.1\) must be smaller than 0"),
        ({"critical_cos": -0.05}, r"critical_cos \(-0.05\) must be smaller than conflict_cos"),
        ({"critical_share": 1.0}, r"critical_share must be a fraction in \[0, 1\)"),
        ({"top": 0}, "top must be at least 1"),
        ({"resolved_cos": -2}, r"resolved_cos must be a cosine in \[-1, 1\]"),
        ({"resolved_offset": 0}, r"resolved_offset must be in \(0, 1\]"),
    ],
)
def test_conflict_arguments_are_checked(tmp_path, kwargs, match):
    run = write_run(tmp_path / "r", {"conflict/cos/a__b": (STEPS, noisy(0.5, 0))})
    with pytest.raises(ValueError, match=match):
        detect_gradient_conflict(run, **kwargs)


# -- class_competition ---------------------------------------------------------------------


def classes(losses: dict[int, np.ndarray], counts: dict[int, float], norms: dict) -> dict:
    series = {}
    for c, loss in losses.items():
        series[f"conflict/loss/class_{c}"] = (STEPS, loss)
        series[f"conflict/count/class_{c}"] = (STEPS, np.full(N, counts[c]))
        series[f"conflict/norm/class_{c}"] = (STEPS, norms[c])
    return series


def falling(start: float, end: float) -> np.ndarray:
    return end + (start - end) * np.exp(-np.arange(N) / 15)


def test_balanced_classes_learned_together_are_quiet(tmp_path):
    losses = {0: falling(0.69, 0.1), 1: falling(0.69, 0.12)}
    norms = {0: falling(1.0, 0.2), 1: falling(1.0, 0.25)}
    run = write_run(tmp_path / "r", classes(losses, {0: 32, 1: 32}, norms))
    assert detect_class_competition(run) == []


def test_a_minority_loss_rising_while_the_batch_loss_falls(tmp_path):
    """The early minority-loss rise under imbalance (Francazi et al. 2023)."""
    rise = 0.69 + 0.4 * np.sin(np.pi * np.minimum(np.arange(N), 40) / 80)  # up until step 400
    losses = {
        0: falling(0.69, 0.05),
        1: np.maximum(rise - 0.01 * np.maximum(np.arange(N) - 40, 0), 0.2),
    }
    norms = {0: falling(1.0, 0.1), 1: np.full(N, 1.0)}
    run = write_run(tmp_path / "r", classes(losses, {0: 60, 1: 4}, norms))
    (finding,) = detect_class_competition(run)
    assert finding.severity is Severity.WARNING and "class_1" in finding.message
    assert finding.start_step <= 40 and 400 <= finding.end_step <= 800  # until it is back down
    assert finding.evidence["loss_peak[class_1]"] > 1.0
    assert finding.evidence["count_share[class_1]"] == pytest.approx(4 / 64)
    assert finding.keys == ("conflict/loss/class_1",)


def test_class_losses_at_exactly_zero_are_not_losing_ground(tmp_path):
    """A class fit to the float32 floor reads 0 at its minimum and after: 0 >= 0 is no rise,
    and a batch loss of exactly 0 is not falling (a fit run, not a competition)."""
    zero_after = np.where(np.arange(N) < 30, falling(0.69, 0.0), 0.0)
    losses = {0: zero_after, 1: zero_after.copy()}
    norms = {0: np.where(np.arange(N) < 30, 1.0, 1e-14), 1: np.where(np.arange(N) < 30, 1.0, 1e-14)}
    run = write_run(tmp_path / "r", classes(losses, {0: 32, 1: 4}, norms))
    assert detect_class_competition(run) == []


def test_a_balanced_class_wobbling_against_its_peers_is_not_losing_ground(tmp_path):
    """The minority rise of Francazi et al. needs a minority: the same rising curve on a
    class with a quarter of the examples (4 balanced classes) is peers trading places."""
    rise = 0.69 + 0.4 * np.sin(np.pi * np.minimum(np.arange(N), 40) / 80)
    losses = {c: falling(0.69, 0.05) for c in range(3)}
    losses[3] = np.maximum(rise - 0.01 * np.maximum(np.arange(N) - 40, 0), 0.2)
    norms = {c: np.ones(N) for c in range(4)}
    run = write_run(tmp_path / "r", classes(losses, dict.fromkeys(range(4), 16), norms))
    assert detect_class_competition(run) == []


def relabelled(counts: dict[int, float], changed: list[int], *, wobble: bool = False) -> dict:
    """Classes learned together to 0.2 by step ~500; from step 500 the classes in
    ``changed`` climb to 5.2 (their labels now contradict what was learned) while the rest
    stay put; ``wobble``: a learned class instead rises to 0.6 for four measurements."""
    i = np.arange(N)
    base = falling(0.69, 0.2)
    climb = np.where(i >= 50, 5.0 * (1 - np.exp(-(i - 50) / 10)), 0.0)
    losses = {c: base + (climb if c in changed else 0.0) for c in counts}
    if wobble:
        losses[0] = np.where((i >= 60) & (i < 64), 0.6, base)
    return classes(losses, counts, losses)  # gradient norms follow the losses


@pytest.mark.parametrize(
    "counts", [{0: 60, 1: 60, 2: 60, 3: 60, 4: 10}, dict.fromkeys(range(4), 16)]
)
def test_a_class_unlearned_while_the_others_hold_steady(tmp_path, counts):
    """Holdout ``ho_minority_relabelled``: after convergence one class's labels change and
    its loss climbs 0.9 -> 5.3 while the batch loss rises only 0.26 -> 0.39 (by the
    class's share): no fall of the batch loss, yet a class-specific deterioration, for a
    minority and for a balanced class alike."""
    changed = max(counts, key=lambda c: (counts[c] < 60, c))  # the minority, or the last
    run = write_run(tmp_path / "r", relabelled(counts, [changed]))
    (finding,) = detect_class_competition(run)
    assert finding.severity is Severity.WARNING and f"class_{changed}" in finding.message
    assert "holds steady" in finding.message and 500 <= finding.start_step <= 510
    assert finding.end_step == STEPS[-1]
    assert finding.evidence[f"loss_peak[class_{changed}]"] > 5.0
    assert abs(finding.evidence[f"others_loss_at_peak[class_{changed}]"] - 0.2) < 0.02
    assert finding.keys == (f"conflict/loss/class_{changed}",)


def test_every_class_rising_or_a_short_wobble_is_not_class_specific(tmp_path):
    """All classes climbing together is a global deterioration (the instability detectors'
    business); a learned class's loss up for four measurements (30 steps) is noise."""
    counts = dict.fromkeys(range(4), 16)
    assert (
        detect_class_competition(write_run(tmp_path / "a", relabelled(counts, [0, 1, 2, 3]))) == []
    )
    assert (
        detect_class_competition(write_run(tmp_path / "b", relabelled(counts, [], wobble=True)))
        == []
    )


def test_a_class_starved_of_gradient(tmp_path):
    losses = {0: falling(0.69, 0.1), 1: np.full(N, 0.7), 2: falling(0.69, 0.1)}
    norms = {0: falling(1.0, 0.3), 1: np.full(N, 0.002), 2: falling(1.0, 0.3)}
    run = write_run(tmp_path / "r", classes(losses, {0: 20, 1: 20, 2: 20}, norms))
    (finding,) = detect_class_competition(run)
    assert "starved" in finding.message and "class_1" in finding.message
    assert finding.evidence["grad_share[class_1]"] < 0.01
    assert finding.evidence["loss_share[class_1]"] > 0.3


def test_class_competition_arguments_are_checked(tmp_path):
    run = write_run(tmp_path / "r", {"conflict/loss/class_0": (STEPS, np.ones(N))})
    with pytest.raises(ValueError, match="rise must be a finite number > 0"):
        detect_class_competition(run, rise=0.0)
    with pytest.raises(ValueError, match=r"min_loss_share must be a fraction in \[0, 1\)"):
        detect_class_competition(run, min_loss_share=1.5)
    with pytest.raises(ValueError, match="steady must be a finite number > 0"):
        detect_class_competition(run, steady=0.0)
    with pytest.raises(ValueError, match=r"lasting must be at least 1 \(the number of steps"):
        detect_class_competition(run, lasting=0)
    assert detect_class_competition(run) == []  # one class: nothing to compete with


# -- noise_scale ---------------------------------------------------------------------------


def noise_run(tmp_path, trace: float, signal: np.ndarray | float, batch: int):
    rng = np.random.default_rng(0)
    return write_run(
        tmp_path / "r",
        {
            "grad_noise/trace_cov": (STEPS, trace * (1 + 0.2 * rng.normal(size=N))),
            "grad_noise/grad_sq": (STEPS, np.broadcast_to(signal, (N,)).astype(float)),
            "grad_noise/batch_size": (STEPS, np.full(N, batch)),
        },
    )


@pytest.mark.parametrize(
    ("trace", "signal", "batch", "side"),
    [
        (1000.0, 1.0, 32, "below"),
        (2.0, 1.0, 512, "above"),
        (100.0, 1.0, 64, None),
        (10.0, -0.5, 256, "below"),  # the signal is below one batch's noise
    ],
)
def test_batch_size_against_the_noise_scale(tmp_path, trace, signal, batch, side):
    findings = detect_noise_scale(noise_run(tmp_path, trace, signal, batch))
    if side is None:
        assert findings == []
        return
    (finding,) = findings
    assert finding.severity is Severity.INFO and f"far {side}" in finding.message
    assert finding.evidence["batch_size"] == batch
    if signal > 0:
        assert finding.evidence["noise_scale"] == pytest.approx(trace, rel=0.15)
    assert finding.start_step >= 700  # the last quarter of the run


def test_the_noise_scale_is_a_ratio_of_means_not_a_mean_of_ratios(tmp_path):
    """Per-step |G|² swings through zero; the mean of S/|G|² would be meaningless."""
    signal = np.tile([3.0, -1.0], N // 2)  # mean 1
    (finding,) = detect_noise_scale(noise_run(tmp_path, 1000.0, signal, 16))
    assert finding.evidence["noise_scale"] == pytest.approx(1000.0, rel=0.15)


def test_noise_scale_arguments_are_checked(tmp_path):
    run = noise_run(tmp_path, 10.0, 1.0, 8)
    with pytest.raises(ValueError, match="far must be > 1"):
        detect_noise_scale(run, far=0.5)
    with pytest.raises(ValueError, match=r"tail must be a share of the run in \(0, 1\)"):
        detect_noise_scale(run, tail=0.0)
    with pytest.raises(ValueError, match="min_points must be at least 3"):
        detect_noise_scale(run, min_points=2)


def test_analyze_runs_the_gradient_detectors(tmp_path):
    series = {"conflict/cos/depth__seg": (STEPS, noisy(-0.7, 9))}
    series |= classes(
        {0: falling(0.69, 0.1), 1: falling(0.69, 0.1)}, {0: 8, 1: 8}, {0: np.ones(N), 1: np.ones(N)}
    )
    names = {f.detector for f in analyze(write_run(tmp_path / "r", series))}
    assert names == {"gradient_conflict"}


def _train_classes(tmp_path, counts: list[int], seed: int = 0, steps: int = 60):
    """Full-batch GD on Gaussian blobs, ``GradConflict(by="class")`` on a fixed batch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    import trainprobe
    from trainprobe.curvature import criterion_loss
    from trainprobe.probes import GradConflict, every

    gen = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(len(counts), 10, generator=gen)
    pairs = zip(means, counts, strict=True)
    x = torch.cat([m + torch.randn(n, 10, generator=gen) for m, n in pairs])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, len(counts)))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    probe = GradConflict(schedule=every(1), data=(x, y), layers=False)
    with trainprobe.watch(
        model,
        [probe],
        run_dir=tmp_path / "run",
        optimizer=opt,
        loss_fn=criterion_loss(nn.CrossEntropyLoss()),
    ) as mon:
        for step in range(steps):
            with mon.step(step) as s:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    return trainprobe.Run(tmp_path / "run")


def test_a_trained_imbalanced_run_fires_and_its_balanced_control_does_not(tmp_path):
    """Measured over 5 seeds and lr 0.1 / 0.5: balanced 2-, 3- and 4-class runs 0 of 30
    findings, 1000:50 and 1000:1000:20 imbalance 18 of 20, each naming the minority."""
    (finding,) = detect_class_competition(_train_classes(tmp_path / "a", [1000, 1000, 20]))
    assert "class_2" in finding.message and finding.start_step == 0
    assert finding.evidence["loss_peak[class_2]"] > 2 * finding.evidence["loss_low[class_2]"]
    assert detect_class_competition(_train_classes(tmp_path / "b", [500, 500, 500])) == []


def test_a_class_recorded_with_zero_counts_does_not_divide_by_zero(tmp_path):
    losses = {0: falling(0.69, 0.1), 1: falling(0.69, 0.1)}
    series = classes(losses, {0: 8, 1: 0}, {0: np.ones(N), 1: np.ones(N)})
    series["conflict/count/class_0"] = (STEPS, np.zeros(N))  # every count zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect_class_competition(write_run(tmp_path / "r", series)) == []
