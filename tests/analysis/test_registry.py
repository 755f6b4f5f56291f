"""The detector registry, analyze(), and the shared numeric kernels of trainprobe.analysis."""

from __future__ import annotations

import ast
import importlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import trainprobe.analysis as analysis
from tests.synth import write_run
from trainprobe.analysis import (
    DETECTORS,
    Detector,
    Finding,
    Severity,
    analyze,
    detect_instability,
    instability,
)
from trainprobe.analysis._series import (
    LOSS_PATTERN,
    step_windows,
    trailing_median_mad,
    true_runs,
    window_cover,
    window_medians,
)

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
    return write_run(
        tmp_path / "r",
        {
            "scalars/loss": (STEPS, loss),
            "nonfinite/loss": (STEPS, bad),
            "norms/grad_total": (measured, total),
            "norms/grad/fc1.weight": (measured, 1e-6 * total),  # warning from 0
            "norms/grad/head.weight": (measured, total),
            "updates/ratio/fc1.weight": (measured, np.full(measured.size, 1e-9)),  # info from 0
        },
        meta={"model": {"params": PARAMS}},
    )


def test_analyze_orders_by_severity_then_start_step(tmp_path):
    findings = analyze(troubled_run(tmp_path), fold=False)
    symptoms = [f for f in findings if f.detector != "instability"]
    assert [(f.detector, f.severity, f.start_step) for f in symptoms] == [
        ("nonfinite", Severity.CRITICAL, 550),
        ("vanishing_gradients", Severity.WARNING, 0),
        ("loss_spike", Severity.WARNING, 100),
        ("exploding_gradients", Severity.WARNING, 400),
        ("update_ratio", Severity.INFO, 0),
    ]
    json.dumps([f.to_dict() for f in findings], allow_nan=False)  # plain, finite numbers


def nasty_run(tmp_path: Path):
    """Every detector fires on series full of zeros, infinities, NaN and 1e9 ratios."""
    rng = np.random.default_rng(1)
    measured = STEPS[::10]
    n = measured.size
    loss = (2.0 * np.exp(-STEPS / 200) + 0.1) * np.exp(rng.normal(0.0, 0.05, STEPS.size))
    loss[[100, 200, 300, 400, 500]] *= 6.0
    loss[[150, 151]] = [np.nan, np.inf]
    triplet = np.where(rng.random(STEPS.size) < 0.1, 0.2, 0.0)
    val = 0.3 * np.exp(np.maximum(STEPS - 100, 0) / 120)  # climbs to 18x its best
    total = np.exp(rng.normal(0.0, 0.2, n))
    total[[5, 6]] = [0.0, np.inf]
    total[30] *= 50.0
    grad = {"fc1.weight": 1e-6 * total, "head.weight": total.copy(), "pooler.weight": np.zeros(n)}
    grad["head.weight"][[8, 9]] = [0.0, np.inf]
    norm, ratio = np.minimum(measured / 100, 1.0), np.full(n, 1e-3)
    ratio[0] = 1e-3 / 1e-12  # the probe's value at w = 0
    flags = np.zeros(STEPS.size)
    flags[[57, 420]] = 1.0
    sharp = 40.0 * np.minimum(0.2 + measured / 400, 1.0) * np.exp(rng.normal(0.0, 0.03, n))
    sharp[[3, 40]], threshold = [np.nan, np.inf], np.full(n, 40.0)
    threshold[[7, 50]] = [0.0, np.nan]
    attention = np.where(measured < 100, 2.0, 5e3)  # grows past the saturation limit
    attention[[12, 20]] = [np.nan, np.inf]
    shrink = np.where(measured < 100, 0.9, 0.01)  # ε dominates from step 100
    shrink[[14, 25]] = [np.nan, np.inf]
    log_z = 8.0 - measured / 20.0  # drifting below its start
    log_z[[3, 40]] = [np.nan, -np.inf]
    return write_run(
        tmp_path / "nasty",
        {
            "scalars/loss": (STEPS, loss),
            "scalars/triplet_loss": (STEPS, triplet),
            "scalars/val_loss": (STEPS, val),
            "scalars/loss_scale": (STEPS, 2.0 ** (16 + STEPS // 100)),
            "nonfinite/loss": (STEPS, np.zeros(STEPS.size)),
            "nonfinite/grad": (STEPS, flags),
            "nonfinite/param": (STEPS, np.zeros(STEPS.size)),
            "norms/grad_total": (measured, total),
            **{f"norms/grad/{p}": (measured, g) for p, g in grad.items()},
            "updates/ratio/gamma": (measured, ratio),
            "attention/max_logit_max": (measured, attention),
            "adam/eps_shrink_total": (measured, shrink),
            "logits/log_z_mean": (measured, log_z),
            "adam/eps_shrink/fc1.weight": (measured, shrink),
            "adam/eps_share_total": (measured, np.where(measured < 100, np.nan, 1.0)),
            "norms/weight/gamma": (measured, norm),
            "updates/ratio/fc1.weight": (measured, np.full(n, 0.5)),
            "activations/zero_frac/fc1": (measured, np.where(measured < 100, 0.5, 1.0)),
            "activations/zero_frac/fc2": (measured, np.full(n, np.nan)),
            "updates/ratio/head.weight": (measured, np.full(n, 1e-9)),
            "sharpness/lambda_max": (measured, sharp),
            "sharpness/threshold": (measured, threshold),
            **gradient_structure(measured),
        },
        meta={"model": {"params": ["fc1.weight", "head.weight", "pooler.weight"]}},
    )


def gradient_structure(measured: np.ndarray) -> dict:
    """Tasks in conflict (NaN cosines where a gradient was zero), a minority class whose
    loss climbs while the majority's falls (one count of 0, one infinite loss), and a noise
    signal below zero on average (an infinite noise scale)."""
    n = measured.size
    cos = np.full(n, -0.8)
    cos[[4, 9]] = np.nan
    minority = 0.7 + np.minimum(measured, 200) / 100
    minority[20] = np.inf
    majority = 0.7 * np.exp(-measured / 100)
    grad_sq = np.full(n, -1.0)
    grad_sq[3] = np.nan
    fit = np.minimum(measured / 100, 1.0)  # train accuracy: fit by step 100
    heldout = np.where(measured < 600, 0.0, 1.0)  # then held-out at 600: grokked
    heldout[[10, 11]] = [np.nan, np.inf]
    regions = 10 + 30 * np.exp(-(((measured - 300) / 150) ** 2))  # up, then down
    regions[[2, 30]] = [np.nan, 0.0]
    ratio = np.full(n, 0.01)
    ratio[:5] = np.nan  # undefined at the start
    return {
        "heldout/train_acc": (measured, fit),
        "heldout/acc": (measured, heldout),
        "regions/train/total": (measured, regions),
        "attribution/share/easy": (measured, np.full(n, 0.999)),
        "attribution/share/hard": (measured, np.zeros(n)),
        "ntk_response/min_ratio": (measured, ratio),
        "conflict/cos/depth__seg": (measured, cos),
        "conflict/loss/class_0": (measured, majority),
        "conflict/loss/class_1": (measured, minority),
        "conflict/count/class_0": (measured, np.full(n, 60.0)),
        "conflict/count/class_1": (measured, np.where(measured == measured[7], 0.0, 4.0)),
        "conflict/norm/class_0": (measured, np.ones(n)),
        "conflict/norm/class_1": (measured, np.ones(n)),
        "grad_noise/trace_cov": (measured, np.full(n, 5.0)),
        "grad_noise/grad_sq": (measured, grad_sq),
        "grad_noise/batch_size": (measured, np.full(n, 32.0)),
    }


def test_no_detector_puts_nan_or_inf_into_evidence(tmp_path):
    run = nasty_run(tmp_path)
    findings = analyze(run, fold=False)
    assert {f.detector for f in findings} == {d.name for d in DETECTORS}
    for finding in findings:
        json.dumps(finding.to_dict(), allow_nan=False)
    assert not any("pooler" in f.message for f in findings)
    assert "scalars/loss_scale" not in {k for f in findings for k in f.keys}


def test_finding_span_must_be_ordered():
    with pytest.raises(ValueError, match=r"start_step <= end_step, got 5\.\.4"):
        Finding("x", Severity.INFO, 5, 4, "seen", "act")


def test_analyze_skips_detectors_whose_keys_are_missing(tmp_path):
    calls = []

    def never(run):
        raise AssertionError("a detector without its keys must not run")

    def loss_only(run):
        calls.append(run)
        return [Finding("custom", Severity.INFO, 3, 4, "seen", "act")]

    run = write_run(tmp_path / "r", {"scalars/loss": (STEPS[:10], np.ones(10))})
    detectors = (
        Detector("never", never, ("norms/grad/*", "scalars/loss")),
        Detector("custom", loss_only, ("scalars/*loss*",)),
    )
    [finding] = analyze(run, detectors=detectors)
    assert finding.detector == "custom" and calls == [run]
    assert analyze(run) == []  # the default detectors skip or find nothing


def test_every_detector_tolerates_one_or_two_points(tmp_path):
    for n in (1, 2):
        series = {
            key: (np.arange(n), np.full(n, 1e-9))
            for key in (
                "scalars/loss",
                "norms/grad_total",
                "norms/grad/a.weight",
                "norms/grad/b.weight",
                "updates/ratio/a.weight",
                "sharpness/lambda_max",
                "sharpness/threshold",
            )
        }
        series["nonfinite/grad"] = (np.arange(n), np.zeros(n))
        assert analyze(write_run(tmp_path / f"r{n}", series)) == []


def test_registry_is_consistent():
    names = [d.name for d in DETECTORS]
    assert names == [
        "nonfinite",
        "loss_spike",
        "loss_divergence",
        "exploding_gradients",
        "vanishing_gradients",
        "update_ratio",
        "dead_units",
        "edge_of_stability",
        "gradient_conflict",
        "class_competition",
        "noise_scale",
        "grokking",
        "region_migration",
        "gradient_starvation",
        "attention_logit_growth",
        "adam_eps_domination",
        "output_logit_drift",
        "instability",
    ]
    for detector in DETECTORS:
        assert detector.func.__name__ in analysis.__all__
        assert detector.needs and all(isinstance(p, str) for p in detector.needs)
    loss_detectors = [d for d in DETECTORS if d.name.startswith("loss_")]
    assert all(d.needs == (LOSS_PATTERN,) for d in loss_detectors)  # narrowed by is_loss_key
    for detector in DETECTORS:  # the registry reads each module's declarations
        module = importlib.import_module(detector.func.__module__)
        assert (detector.name, detector.needs) == (module.NAME, module.NEEDS)
    [combining] = [d for d in DETECTORS if d.combines]
    assert combining.name == "instability"
    assert combining.combines == tuple(func for _, func in instability.SYMPTOMS)
    assert combining.needs == (
        "nonfinite/* | scalars/*loss* | norms/grad_total | norms/grad/* | grad_flow/ratio/* "
        "| sharpness/lambda_max",
    )


def test_detector_applies_to_glob_patterns():
    detector = Detector("x", lambda run: [], ("norms/grad/*", "scalars/*loss*"))
    assert detector.applies_to(["norms/grad/fc.weight", "scalars/val_loss"])
    assert not detector.applies_to(["norms/grad_total", "scalars/val_loss"])


def test_invalid_registry_entries_name_the_fix(tmp_path):
    with pytest.raises(TypeError, match=r"needs must be a tuple of glob patterns"):
        Detector("x", lambda run: [], "norms/grad/*")
    with pytest.raises(TypeError, match=r"combines must be a tuple of detector functions"):
        Detector("x", lambda run: [], ("norms/grad/*",), combines=("loss_spike",))
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
        ref = x[max(0, i - 30) : i]
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


def test_step_windows_span_steps_with_a_minimum_count():
    dense = np.arange(0, 1000)
    starts, ends = step_windows(dense, 200, 5)
    assert (ends - starts)[:800].tolist() == [200] * 800  # 200 points when measured every step
    assert (starts[-1], ends[-1]) == (800, 1000)  # windows stop at the one reaching the end
    sparse = np.arange(0, 2000, 100)
    starts, ends = step_windows(sparse, 200, 5)
    assert (ends - starts).tolist() == [5] * 16  # widened to min_points
    irregular = np.array([0, 1, 2, 50, 300, 301, 302, 303, 600])
    starts, ends = step_windows(irregular, 100, 3)
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == [
        (0, 4),
        (1, 4),
        (2, 5),
        (3, 6),
        (4, 8),
        (5, 8),
        (6, 9),
    ]
    assert step_windows(np.arange(4), 100, 5)[1].tolist() == [4]  # short: one window
    assert step_windows(np.empty(0, dtype=np.int64), 100, 5)[0].size == 0


def test_window_medians_match_direct_computation():
    x = np.random.default_rng(2).normal(size=9000)
    steps = np.cumsum(np.random.default_rng(3).integers(1, 4, size=9000))
    starts, ends = step_windows(steps, 40, 5)
    medians = window_medians(x, starts, ends)
    for k in [0, 1, 17, 4095, 4096, 4097, starts.size - 1]:
        assert medians[k] == pytest.approx(np.median(x[starts[k] : ends[k]]))


def test_instability_folds_the_symptoms_of_one_episode(tmp_path):
    """Loss spike, exploding gradients and NaN close together: one episode finding, the
    worst severity, every symptom in its evidence; apart from it, a lone symptom stays."""
    run = troubled_run(tmp_path)
    everything = analyze(run, fold=False)
    (episode,) = [f for f in everything if f.detector == "instability"]
    folded = analyze(run)
    assert episode in folded and episode.severity is Severity.CRITICAL
    inside = [
        f
        for f in everything
        if f.detector in ("loss_spike", "exploding_gradients", "nonfinite", "vanishing_gradients")
        and episode.start_step <= f.start_step
        and f.end_step <= episode.end_step
    ]
    assert len(inside) >= 2 and not [f for f in inside if f in folded]
    assert episode.evidence["symptoms"] == len(inside)
    assert set(episode.keys) >= {k for f in inside for k in f.keys}
    assert [f for f in folded if f.detector == "update_ratio"]  # not a symptom: kept


def by_severity(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-int(f.severity), f.start_step))


def counting(calls: Counter):
    """Wraps a detector function so that each call counts under its name."""

    def wrap(func):
        def counted(run, **kwargs):
            calls[func.__name__] += 1
            return func(run, **kwargs)

        return counted

    return wrap


@pytest.mark.parametrize("fold", [False, True])
def test_analyze_runs_each_detector_once_with_the_same_findings(tmp_path, monkeypatch, fold):
    """instability folds the symptom findings analyze already has: every detector function
    runs once, and the findings are those of each detector run on its own."""
    run = nasty_run(tmp_path)  # every detector finds something
    alone = {d.name: d.func(run) for d in DETECTORS}  # instability re-runs its six symptoms
    expected = by_severity([f for found in alone.values() for f in found])
    if fold:
        episodes = alone["instability"]
        inside = [m for e in episodes for m in instability.members(e, expected)]
        expected = [f for f in expected if not any(f is m for m in inside)]
    calls: Counter = Counter()
    wrapped = {d.func: counting(calls)(d.func) for d in DETECTORS}
    symptoms = tuple((name, wrapped[func]) for name, func in instability.SYMPTOMS)
    monkeypatch.setattr(instability, "SYMPTOMS", symptoms)
    detectors = tuple(
        replace(d, func=wrapped[d.func], combines=tuple(wrapped[f] for f in d.combines))
        for d in DETECTORS
    )
    assert analyze(run, detectors=detectors, fold=fold) == expected
    assert calls == {d.func.__name__: 1 for d in DETECTORS}
    assert alone["instability"] and len(alone["instability"]) < len(expected)


def test_instability_alone_runs_its_symptoms_itself(tmp_path):
    """Without the symptom detectors (or with custom ones) the episode still comes from the
    default-threshold symptoms, as detect_instability finds them by itself."""
    run = troubled_run(tmp_path)
    [alone] = [d for d in DETECTORS if d.name == "instability"]
    assert analyze(run, detectors=(alone,), fold=False) == detect_instability(run)
    strict = Detector("loss_spike", lambda run: [], ("scalars/*loss*",))
    findings = analyze(run, detectors=(strict, alone), fold=False)
    assert findings == detect_instability(run) and findings


def test_instability_folds_the_findings_it_is_given(tmp_path):
    run = troubled_run(tmp_path)
    computed = {func: func(run) for _, func in instability.SYMPTOMS}
    assert detect_instability(run, computed=computed) == detect_instability(run)
    nothing = {func: [] for _, func in instability.SYMPTOMS}
    assert detect_instability(run, computed=nothing) == []
    with pytest.raises(TypeError, match="computed must map symptom detector functions"):
        detect_instability(run, computed=[])


def test_a_folded_loss_spike_keeps_its_gradient_norm_lead(tmp_path):
    """The gradient norm jumps 50x 3 steps before the loss spikes: one episode (exploding
    gradients, then the loss spike) that keeps the spike's grad-norm sentence and lead,
    which folding would otherwise drop; the rest of the episode is as without them."""
    rng = np.random.default_rng(0)
    steps = np.arange(1000)
    loss = (2.0 * np.exp(-steps / 300) + 0.1) * np.exp(rng.normal(0.0, 0.05, steps.size))
    loss[600] *= 5.0
    grad = np.exp(rng.normal(0.0, 0.3, steps.size))
    grad[597] *= 50.0
    run = write_run(
        tmp_path / "r", {"scalars/loss": (steps, loss), "norms/grad_total": (steps, grad)}
    )
    everything = analyze(run, fold=False)
    [spike] = [f for f in everything if f.detector == "loss_spike"]
    assert spike.evidence["grad_lead_steps"] == 3
    folded = analyze(run)
    [episode] = [f for f in folded if f.detector == "instability"]
    assert spike not in folded and episode.evidence["symptom[1]"].startswith("loss_spike")
    carried = {k: v for k, v in episode.evidence.items() if "." in k}
    assert carried == {
        "symptom[1].grad_norm": spike.evidence["grad_norm"],
        "symptom[1].grad_lead_steps": 3,
    }
    assert carried["symptom[1].grad_norm"].endswith("at step 597, 3 steps before")
    bare = [
        replace(f, evidence={k: v for k, v in f.evidence.items() if not k.startswith("grad")})
        for f in everything
    ]
    [plain] = instability.episodes(bare, 50)
    assert plain == replace(
        episode, evidence={k: v for k, v in episode.evidence.items() if k not in carried}
    )
