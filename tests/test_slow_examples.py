"""Slow: the full demo (with and without its deliberate mistake) and the examples."""

from __future__ import annotations

import importlib
import runpy
import sys

import numpy as np
import pytest

from trainprobe import Run, Severity, analyze
from trainprobe.cli.demo import DemoConfig
from trainprobe.cli.main import main

pytestmark = pytest.mark.slow


EARLY_STEPS = 15
"""How far before the mishap's first affected loss a finding may start. ``loss_divergence``
starts where the loss leaves its level: the first point after which its excess over a
2-sigma noise band never cancels out (Page's CUSUM). A noise excursion above the band just
before the jump can pull that a few points earlier, never far: below the band the sum falls
by about 2 sigma a point (with the plateaus of 15 demo runs reshuffled 100 times each, the
earliest start was 9 points early). ``loss_spike`` and ``instability`` start at spike points
or at the divergence. This bounds the mechanism, not one floating-point trajectory: the CPU,
the thread count and the seed change the trajectory, not this bound."""

MISHAP_DETECTORS = {"loss_divergence", "loss_spike", "instability"}
"""What a 25-step 12x learning rate does to this demo: the loss jumps ~10x and stays several
times higher to the end (a divergence), often with spikes, and the episode that joins them."""


def assert_flags_the_mishap_and_only_it(findings: list, config: DemoConfig) -> None:
    first = config.mishap_start + 1  # the first loss computed after a raised learning rate
    last = config.mishap_start + config.mishap_steps
    serious = [f for f in findings if f.severity >= Severity.WARNING]
    [divergence] = [f for f in serious if f.detector == "loss_divergence"]
    assert first - EARLY_STEPS <= divergence.start_step <= last, divergence
    assert divergence.evidence["band"] == 2 * divergence.evidence["noise"]
    for f in serious:  # nothing fires elsewhere: each serious finding starts at the mishap
        assert f.detector in MISHAP_DETECTORS, f
        assert first - EARLY_STEPS <= f.start_step <= last and f.end_step >= first, f


def test_full_demo_flags_the_learning_rate_mistake_and_only_it(tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    findings = analyze(Run(tmp_path / "run"), fold=False)
    assert_flags_the_mishap_and_only_it(findings, DemoConfig())


def test_clean_demo_has_no_serious_findings(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--no-mishap"]) == 0
    findings = analyze(Run(tmp_path / "run"), fold=False)
    assert not [f for f in findings if f.severity >= Severity.WARNING], findings


def test_quickstart_example_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--out", str(tmp_path / "q")])
    runpy.run_path("examples/quickstart.py", run_name="__main__")
    run = Run(tmp_path / "q")
    assert run.series("scalars/loss").values[-1] < 0.2
    assert (tmp_path / "q" / "dashboard.html").is_file()


def test_edge_of_stability_example_fires_on_gd_and_not_on_the_control(tmp_path):
    sys.path.insert(0, "examples")
    try:
        import edge_of_stability as example
    finally:
        sys.path.remove("examples")
    results = example.main(tmp_path)
    large, small = example.STEP_SIZES
    assert [f.severity for f in results[large]] == [Severity.INFO]
    assert results[small] == []
    run = Run(tmp_path / f"eta_{large}")
    ratio = run.series("sharpness/ratio").values
    assert ratio[0] < 0.6 and 0.9 < float(np.median(ratio[len(ratio) // 2 :])) < 1.25
    control = Run(tmp_path / f"eta_{small}").series("sharpness/ratio").values
    assert control.max() < 0.2
    assert (tmp_path / f"eta_{large}" / "dashboard.html").is_file()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transformer_instability_example_fires_on_the_high_rate_only(tmp_path, seed):
    """Attention-logit growth at lr 0.1: the detector fires and the loss plateaus; the
    same rate with QK-layernorm and a 3e-3 control get no warning at all."""
    sys.path.insert(0, "examples")
    try:
        import transformer_instability as example
    finally:
        sys.path.remove("examples")
    for name, (lr, qk_norm) in example.SETTINGS.items():
        run = example.train(tmp_path / name, lr=lr, qk_norm=qk_norm, seed=seed)
        serious = [f for f in analyze(run) if f.severity >= Severity.WARNING]
        final = float(run.series("scalars/loss").values[-20:].mean())
        if name == "high_lr":
            assert "attention_logit_growth" in {f.detector for f in serious}, serious
            assert final > 2.2  # the plateau
        else:
            assert serious == [], (name, serious)
            assert final < 1.8
            assert run.series("attention/max_logit_max").values.max() < 100


def test_grokking_example_reports_the_delay_and_not_on_the_control(tmp_path):
    sys.path.insert(0, "examples")
    try:
        import grokking_modular_arithmetic as example
    finally:
        sys.path.remove("examples")
    results = example.main(tmp_path)
    (grok,) = [f for f in results["grok"] if f.detector == "grokking"]
    assert grok.message.startswith("Grokked") and grok.evidence["delay_steps"] >= 2000
    assert grok.start_step <= 300
    assert not [f for f in results["control"] if f.detector == "grokking"]
    run = Run(tmp_path / "grok")
    assert run.series("heldout/acc").values[-1] > 0.95
    assert (tmp_path / "grok" / "dashboard.html").is_file()


def test_gradient_starvation_example_fires_on_the_toy_and_not_on_its_control(tmp_path):
    sys.path.insert(0, "examples")
    try:
        import gradient_starvation as example
    finally:
        sys.path.remove("examples")
    results = example.main(tmp_path)
    (finding,) = [f for f in results["starved"] if f.detector == "gradient_starvation"]
    assert finding.evidence["starved_group"] == "hard" and finding.evidence["starved_share"] < 0.05
    assert finding.evidence["ntk_min_ratio"] < 0.1
    assert not results["control"]
    control = Run(tmp_path / "control")
    assert control.series("attribution/share/hard").values[-1] > 0.5


@pytest.mark.parametrize(
    ("name", "extra"), [("lightning_trainer", "lightning"), ("hf_trainer", "transformers")]
)
def test_integration_example_runs(name, extra, tmp_path):
    pytest.importorskip(extra)
    sys.path.insert(0, "examples")
    try:
        example = importlib.import_module(name)
    finally:
        sys.path.remove("examples")
    run = example.main(tmp_path / name, steps=100)
    loss = run.series("scalars/loss").values
    assert run.meta["status"] == "finished" and loss[-1] < 0.5 * loss[0]
    assert run.series("norms/grad_total").steps.tolist() == list(range(0, 100, 10))
