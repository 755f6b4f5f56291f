"""Detectors of issue 5 on synthetic series: grokking, region migration, gradient starvation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis.findings import Severity
from trainprobe.analysis.gradient_starvation import detect_gradient_starvation
from trainprobe.analysis.grokking import detect_grokking
from trainprobe.analysis.region_migration import detect_region_migration

STEPS = np.arange(0, 8000, 100)  # 80 measurements
N = STEPS.size


def sigmoid(steps: np.ndarray, at: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(steps - at) / width))


def accuracies(tmp_path, train: np.ndarray, heldout: np.ndarray, **extra):
    series = {"heldout/train_acc": (STEPS, train), "heldout/acc": (STEPS, heldout)}
    series |= {k: (STEPS, v) for k, v in extra.items()}
    return write_run(tmp_path / "r", series)


TRAIN_FIT = 0.02 + 0.98 * sigmoid(STEPS, 150, 40)  # fit by step ~300


# -- grokking ----------------------------------------------------------------------------


def test_grokked_with_the_delay(tmp_path):
    """The modular-addition shape: train fit at ~300, held-out jumps at ~4300."""
    run = accuracies(tmp_path, TRAIN_FIT, 0.01 + 0.99 * sigmoid(STEPS, 4000, 200))
    (finding,) = detect_grokking(run)
    assert finding.severity is Severity.INFO and finding.message.startswith("Grokked")
    assert 200 <= finding.start_step <= 400 and 4000 <= finding.end_step <= 4700
    assert finding.evidence["delay_steps"] == finding.end_step - finding.start_step
    # the climb's onset: the sigmoid centred at 4000 (width 200) leaves its plateau near 3600
    assert 3400 <= finding.evidence["onset_step"] <= 3900 and "began near step" in finding.message


def test_an_ordinary_run_whose_heldout_follows_is_quiet(tmp_path):
    follows = accuracies(tmp_path / "a", TRAIN_FIT, 0.97 * sigmoid(STEPS, 250, 60))
    assert detect_grokking(follows) == []
    gap = accuracies(tmp_path / "b", TRAIN_FIT, 0.7 * sigmoid(STEPS, 200, 50))  # overfits
    assert detect_grokking(gap) == []


def test_memorising_then_under_way(tmp_path):
    flat = accuracies(tmp_path / "a", TRAIN_FIT, np.full(N, 0.02))
    (finding,) = detect_grokking(flat)
    assert finding.message.startswith("Memorising") and finding.severity is Severity.INFO
    rising = accuracies(tmp_path / "b", TRAIN_FIT, 0.02 + 0.6 * sigmoid(STEPS, 7000, 300))
    (finding,) = detect_grokking(rising)
    assert finding.message.startswith("Grokking under way")
    assert finding.evidence["heldout_last"] > finding.evidence["heldout_at_plateau"] + 0.2


def test_a_collapse_that_takes_over_only_at_the_end_stalls_grokking(tmp_path):
    """Softmax collapse rising to 0.9 only in the last tenth of the run: where the run is
    now, so the stall is reported (a median over the last quarter read 0.1)."""
    collapse = np.where(np.arange(N) >= N - 8, 0.9, 0.1)
    run = accuracies(tmp_path, TRAIN_FIT, np.full(N, 0.02), **{"grok/softmax_collapse": collapse})
    (finding,) = detect_grokking(run)
    assert finding.severity is Severity.WARNING and finding.message.startswith("Grokking stalled")
    assert finding.evidence["softmax_collapse"] == pytest.approx(0.9)


def test_stalled_by_softmax_collapse_not_by_nlm_alignment_alone(tmp_path):
    collapse = np.clip(STEPS / 2000, 0, 0.9)
    aligned = np.full(N, 0.97)
    run = accuracies(
        tmp_path / "a",
        TRAIN_FIT,
        np.full(N, 0.02),
        **{"grok/softmax_collapse": collapse, "grok/nlm_cos": aligned},
    )
    (finding,) = detect_grokking(run)
    assert finding.severity is Severity.WARNING and "stalled" in finding.message
    assert finding.evidence["softmax_collapse"] == pytest.approx(0.9)
    assert "NLM cosine 0.97" in finding.message and finding.evidence["nlm_cos"] == 0.97
    assert "StableMax" in finding.action and "grok/softmax_collapse" in finding.keys
    only_nlm = accuracies(
        tmp_path / "b",
        TRAIN_FIT,
        np.full(N, 0.02),
        **{"grok/softmax_collapse": np.zeros(N), "grok/nlm_cos": aligned},
    )
    (finding,) = detect_grokking(only_nlm)  # grokking runs sit there too: no stall
    assert finding.severity is Severity.INFO and finding.message.startswith("Memorising")


def test_no_fit_or_too_early_is_quiet(tmp_path):
    assert detect_grokking(accuracies(tmp_path / "a", np.full(N, 0.5), np.full(N, 0.1))) == []
    late_fit = 0.02 + 0.98 * sigmoid(STEPS, 6000, 100)  # fit at ~6300, run ends at 7900
    assert detect_grokking(accuracies(tmp_path / "b", late_fit, np.full(N, 0.02))) == []


def test_grokking_arguments_are_checked(tmp_path):
    run = accuracies(tmp_path, TRAIN_FIT, TRAIN_FIT)
    with pytest.raises(ValueError, match=r"fit must be a fraction in \[0, 1\)"):
        detect_grokking(run, fit=1.5)
    with pytest.raises(ValueError, match="delay must be a finite number > 0"):
        detect_grokking(run, delay=0)


# -- region_migration --------------------------------------------------------------------


def regions(tmp_path, total: np.ndarray, key: str = "regions/train/total"):
    return write_run(tmp_path / "r", {key: (STEPS, total)})


def test_descent_ascent_and_second_descent(tmp_path):
    t = STEPS / STEPS[-1]
    count = (
        40 - 20 * np.minimum(t / 0.1, 1) + 60 * np.exp(-(((t - 0.35) / 0.12) ** 2))
    )  # peak ~0.35
    (finding,) = detect_region_migration(regions(tmp_path, count))
    ev = finding.evidence
    assert ev["minimum_step"] < ev["peak_step"] < ev["descent_step"]
    assert (
        2400 <= ev["peak_step"] <= 3200 and ev["after_descent"] <= (1 - ev["descent"]) * ev["peak"]
    )
    assert "early descent" in finding.message and finding.severity is Severity.INFO


def test_a_count_that_keeps_rising_is_quiet(tmp_path):
    assert detect_region_migration(regions(tmp_path / "a", 10 + STEPS / 100)) == []
    plateau = 10 + 30 * sigmoid(STEPS, 2000, 300)  # rises, then flat: no descent
    assert detect_region_migration(regions(tmp_path / "b", plateau)) == []


def test_the_test_set_is_read_when_train_is_missing(tmp_path):
    count = 20 + 30 * np.exp(-(((STEPS - 3000) / 1000) ** 2))
    (finding,) = detect_region_migration(regions(tmp_path, count, "regions/test/total"))
    assert finding.keys == ("regions/test/total",)
    with pytest.raises(ValueError, match=r"ascent must be a fraction in \(0, 1\)"):
        detect_region_migration(regions(tmp_path / "x", count), ascent=0.0)


# -- gradient_starvation -----------------------------------------------------------------


def test_a_starved_feature_and_its_control(tmp_path):
    easy, hard = 0.98 - 0.01 * np.exp(-STEPS / 500), 0.02 + 0.01 * np.exp(-STEPS / 500)
    starved = write_run(
        tmp_path / "a",
        {
            "attribution/share/easy": (STEPS, easy),
            "attribution/share/hard": (STEPS, hard),
            "ntk_response/min_ratio": (STEPS, np.full(N, 0.03)),
        },
    )
    (finding,) = detect_gradient_starvation(starved)
    assert finding.severity is Severity.WARNING and "'hard'" in finding.message
    assert finding.evidence["starved_share"] == pytest.approx(0.02, abs=1e-3)
    assert finding.evidence["ntk_min_ratio"] == pytest.approx(0.03)
    assert finding.start_step >= 5900 and finding.end_step == STEPS[-1]
    control = write_run(
        tmp_path / "b",
        {
            "attribution/share/easy": (STEPS, np.full(N, 0.6)),
            "attribution/share/hard": (STEPS, np.full(N, 0.4)),
            "ntk_response/min_ratio": (STEPS, np.full(N, 0.5)),
        },
    )
    assert detect_gradient_starvation(control) == []


def test_starvation_early_in_training_only_is_not_reported(tmp_path):
    hard = np.where(STEPS < 4000, 0.01, 0.4)  # the hard feature is learned later
    run = write_run(
        tmp_path / "r",
        {"attribution/share/easy": (STEPS, 1 - hard), "attribution/share/hard": (STEPS, hard)},
    )
    assert detect_gradient_starvation(run) == []
    with pytest.raises(ValueError, match=r"ratio must be a fraction in \(0, 1\)"):
        detect_gradient_starvation(run, ratio=0.0)


def test_a_run_fit_before_its_first_measurement_is_not_called_grokked(tmp_path):
    """Held-out climbing steadily after a fit that happened before step 100: no yardstick."""
    steps = np.arange(100, 1100, 100)
    heldout = np.minimum(0.5 + 0.1 * np.arange(10), 0.96)
    run = write_run(
        tmp_path / "r",
        {"heldout/train_acc": (steps, np.full(10, 0.99)), "heldout/acc": (steps, heldout)},
    )
    assert detect_grokking(run) == []
