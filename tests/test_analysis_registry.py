"""The detector registry, analyze(), and the shared numeric kernels of trainprobe.analysis."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import trainprobe.analysis as analysis
from tests.synth import write_run
from trainprobe.analysis import DETECTORS, Detector, Finding, Severity, analyze
from trainprobe.analysis._series import trailing_median_mad, true_runs, window_cover

STEPS = np.arange(600)
PARAMS = ["fc1.weight", "fc1.bias", "head.weight"]


def troubled_run(tmp_path: Path):
    """A run where every detector finds something, at known steps."""
    rng = np.random.default_rng(0)
    loss = (2.0 * np.exp(-STEPS / 200) + 0.1) * np.exp(rng.normal(0.0, 0.05, STEPS.size))
    loss[100] *= 5.0  # warning at 100
    bad = np.zeros(STEPS.size)
    bad[550:] = 1.0  # critical at 550
    measured = STEPS[::10]
    total = np.exp(rng.normal(0.0, 0.2, measured.size))
    total[40] *= 50.0  # warning at 400
    return write_run(tmp_path / "r", {
        "scalars/loss": (STEPS, loss),
        "nonfinite/loss": (STEPS, bad),
        "norms/grad_total": (measured, total),
        "norms/grad/fc1.weight": (measured, 1e-6 * total),  # warning from 0
        "norms/grad/head.weight": (measured, total),
        "updates/ratio/fc1.weight": (measured, np.full(measured.size, 1e-9)),  # info from 0
    }, meta={"model": {"params": PARAMS}})


def test_analyze_orders_by_severity_then_start_step(tmp_path):
    findings = analyze(troubled_run(tmp_path))
    assert [(f.detector, f.severity, f.start_step) for f in findings] == [
        ("nonfinite", Severity.CRITICAL, 550),
        ("vanishing_gradients", Severity.WARNING, 0),
        ("loss_spike", Severity.WARNING, 100),
        ("exploding_gradients", Severity.WARNING, 400),
        ("update_ratio", Severity.INFO, 0),
    ]
    json.dumps([f.to_dict() for f in findings])  # evidence is plain numbers and strings


def test_analyze_skips_detectors_whose_keys_are_missing(tmp_path):
    calls = []

    def never(run):
        raise AssertionError("a detector without its keys must not run")

    def loss_only(run):
        calls.append(run)
        return [Finding("custom", Severity.INFO, 3, 4, "seen", "act")]

    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS[:10], np.ones(10))})
    detectors = (Detector("never", never, ("norms/grad/*", "scalars/loss")),
                 Detector("custom", loss_only, ("scalars/*loss*",)))
    [finding] = analyze(run, detectors=detectors)
    assert finding.detector == "custom" and calls == [run]
    assert analyze(run) == []  # the default detectors skip or find nothing


def test_every_detector_tolerates_one_or_two_points(tmp_path):
    for n in (1, 2):
        series = {key: (np.arange(n), np.full(n, 1e-9)) for key in (
            "scalars/loss", "norms/grad_total", "norms/grad/a.weight", "norms/grad/b.weight",
            "updates/ratio/a.weight")}
        series["nonfinite/grad"] = (np.arange(n), np.zeros(n))
        assert analyze(write_run(tmp_path / f"r{n}", series)) == []


def test_registry_is_consistent():
    names = [d.name for d in DETECTORS]
    assert names == ["nonfinite", "loss_spike", "exploding_gradients", "vanishing_gradients",
                     "update_ratio"]
    for detector in DETECTORS:
        assert detector.func.__name__ in analysis.__all__
        assert detector.needs and all(isinstance(p, str) for p in detector.needs)


def test_detector_applies_to_glob_patterns():
    detector = Detector("x", lambda run: [], ("norms/grad/*", "scalars/*loss*"))
    assert detector.applies_to(["norms/grad/fc.weight", "scalars/val_loss"])
    assert not detector.applies_to(["norms/grad_total", "scalars/val_loss"])


def test_invalid_registry_entries_name_the_fix(tmp_path):
    with pytest.raises(TypeError, match=r"needs must be a tuple of glob patterns"):
        Detector("x", lambda run: [], "norms/grad/*")
    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS[:3], np.ones(3))})
    with pytest.raises(TypeError, match="detectors must hold Detector objects, got function"):
        analyze(run, detectors=(lambda run: [],))


def test_analysis_never_imports_torch():
    package = Path(analysis.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert "torch" not in roots, f"{source.name} imports torch"


def test_trailing_median_mad_matches_direct_computation():
    x = np.random.default_rng(1).normal(size=4200)  # crosses a 4096-row chunk boundary
    med, mad = trailing_median_mad(x, 30, min_periods=5)
    for i in [0, 4, 5, 17, 29, 30, 31, 2000, 4125, 4126, 4127, 4199]:
        ref = x[max(0, i - 30):i]
        if ref.size < 5:
            assert np.isnan(med[i]) and np.isnan(mad[i])
        else:
            assert med[i] == pytest.approx(np.median(ref))
            assert mad[i] == pytest.approx(np.median(np.abs(ref - np.median(ref))))


def test_true_runs_and_window_cover():
    mask = np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool)
    assert true_runs(mask) == [(0, 1), (3, 3), (6, 6)]
    assert true_runs(np.zeros(3, dtype=bool)) == []
    cover = window_cover(np.array([0, 1, 0, 0, 1], dtype=bool), 3, 7)
    assert cover.tolist() == [False, True, True, True, True, True, True]
