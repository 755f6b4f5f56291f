"""detect_adam_eps_domination on synthetic series: steps shrunk by ε for a sustained
stretch fire with the span, the shrunk tensors, ε and lr / ε from the metadata; a mild
shrink, a brief dip and a missing series do not."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, analyze, detect_adam_eps_domination

STEPS = np.arange(0, 400, 10)
OPTIMIZER = {"class": "AdamW", "param_groups": [{"lr": 3e-3, "eps": 0.1, "num_params": 9}]}


def _run(tmp_path, total: np.ndarray, *, meta=None, share: float | None = 1.0):
    series = {
        "adam/eps_shrink_total": (STEPS, total),
        "adam/eps_shrink/head.weight": (STEPS, total / 2),
        "adam/eps_shrink/blocks.0.qkv.weight": (STEPS, total),
        "adam/eps_shrink/tok.weight": (STEPS, np.minimum(total * 5, 1.0)),
    }
    if share is not None:
        series["adam/eps_share_total"] = (STEPS, np.full(STEPS.size, share))
    return write_run(tmp_path / "r", series, meta=meta)


def test_a_sustained_shrink_is_reported_with_its_tensors_and_the_sgd_rate(tmp_path):
    total = np.concatenate([[0.9, 0.4], np.full(STEPS.size - 2, 0.016)])
    run = _run(tmp_path, total, meta={"optimizer": OPTIMIZER})
    (finding,) = detect_adam_eps_domination(run)
    assert finding.severity == Severity.WARNING
    assert (finding.start_step, finding.end_step) == (20, 390)
    assert finding.evidence["median_step_factor"] == pytest.approx(0.016)
    assert finding.evidence["eps"] == 0.1
    assert finding.evidence["lr_over_eps"] == pytest.approx(0.03)
    assert finding.evidence["eps_dominated_share"] == 1.0
    assert finding.evidence["most_shrunk"].startswith("head.weight (0.008)")
    assert "adam/eps_shrink/head.weight" in finding.keys
    assert "eps" in finding.action and "SGD" in finding.message
    assert [f.detector for f in analyze(run)] == ["adam_eps_domination"]


def test_without_optimizer_metadata_or_share_the_finding_still_stands(tmp_path):
    (finding,) = detect_adam_eps_domination(_run(tmp_path, np.full(STEPS.size, 0.05), share=None))
    assert "eps" not in finding.evidence and "eps_dominated_share" not in finding.evidence
    assert (finding.start_step, finding.end_step) == (0, 390)


def test_the_longest_stretch_is_the_span(tmp_path):
    total = np.full(STEPS.size, 0.5)
    total[3:6] = 0.05  # 3 points
    total[20:30] = 0.05  # 10 points
    (finding,) = detect_adam_eps_domination(_run(tmp_path, total))
    assert (finding.start_step, finding.end_step) == (200, 290)
    assert finding.evidence["dominated_stretches"] == 2


@pytest.mark.parametrize(
    "total",
    [
        np.full(STEPS.size, 0.999),  # ε negligible
        np.full(STEPS.size, 0.37),  # ε = 1e-3 on the corpus decoder: shrunk, unharmed
        np.where(np.arange(STEPS.size) % 10 == 5, 0.05, 0.8),  # single dips
        np.full(2, 0.01),  # too few measurements
    ],
    ids=["negligible", "mild", "brief", "short"],
)
def test_no_finding_without_a_sustained_order_of_magnitude(tmp_path, total):
    steps = STEPS[: total.size]
    run = write_run(tmp_path / "r", {"adam/eps_shrink_total": (steps, total)})
    assert detect_adam_eps_domination(run) == []


def test_thresholds_are_checked(tmp_path):
    run = _run(tmp_path, np.full(STEPS.size, 0.05))
    with pytest.raises(ValueError, match="limit"):
        detect_adam_eps_domination(run, limit=0)
    with pytest.raises(ValueError, match="min_points"):
        detect_adam_eps_domination(run, min_points=0)


def test_the_limit_sits_between_the_harmed_and_the_unharmed_corpus_runs(tmp_path):
    """0.12 (the loss scaled by 1e-6 on the copy task, unsolved) fires; 0.37 (ε = 1e-3 on
    the decoder, unharmed) does not."""
    assert detect_adam_eps_domination(_run(tmp_path / "a", np.full(STEPS.size, 0.12)))
    assert not detect_adam_eps_domination(_run(tmp_path / "b", np.full(STEPS.size, 0.37)))
