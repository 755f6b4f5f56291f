"""detect_update_ratio: layers updating far faster or slower than ||dw|| / ||w|| ~ 1e-3."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, detect_update_ratio

STEPS = np.arange(0, 2000, 10)  # 200 measurements
N = STEPS.size
LAYERS = ["embed.weight", "fc1.weight", "fc1.bias", "fc2.weight", "head.weight"]


def ratios(seed: int, level: dict[str, float | np.ndarray]) -> dict:
    """``updates/ratio/<layer>``: log-normal noise around ``level`` (default 1e-3)."""
    rng = np.random.default_rng(seed)
    return {
        f"updates/ratio/{layer}": (STEPS, level.get(layer, 1e-3) * np.exp(rng.normal(0.0, 0.5, N)))
        for layer in LAYERS
    }


def peak_window_median(values: np.ndarray, window: int = 20) -> float:
    return max(np.median(values[j : j + window]) for j in range(values.size - window + 1))


def zero_init(steps: np.ndarray, *, tau: float = 200.0, scale: float = 0.1) -> tuple:
    """A zero-initialised tensor (LayerScale gamma, LoRA B): ``||w||`` and the probe's ratio.

    ``||w_t|| = scale * (1 - exp(-t / tau))`` grows to its settled norm; each step moves
    it by the growth plus a healthy 1e-3. The probe writes ``||dw|| / (||w|| + 1e-12)``:
    about 1e9 at ``w = 0``, then ``~1/t`` while ``t << tau``.
    """
    norm = scale * (1.0 - np.exp(-steps / tau))
    delta = scale / tau * np.exp(-steps / tau) + 1e-3 * norm
    return norm, delta / (norm + 1e-12)


WEIGHT_NORMS = {"embed.weight": 10.0, "fc1.weight": 5.0, "fc1.bias": 0.05, "head.weight": 3.0}


@pytest.mark.parametrize("seed", range(3))
def test_healthy_band_and_zero_initialised_tensors_are_quiet(tmp_path, seed):
    """A tensor small by design (a bias that stays near zero, ||w|| 1% of the others')
    moves by a large share of its tiny norm: read from its norm, not its name, it is
    left alone; a zero-initialised matrix growing to its norm is a transient."""
    series = ratios(seed, {"fc1.bias": 0.5, "embed.weight": 3e-4, "head.weight": 3e-3})
    norm, ratio = zero_init(STEPS, tau=30.0, scale=5.0)
    series["updates/ratio/fc2.weight"] = (STEPS, ratio)
    assert series["updates/ratio/fc2.weight"][1][0] > 1e10  # the probe at w = 0
    series |= {f"norms/weight/{k}": (STEPS, np.full(N, v)) for k, v in WEIGHT_NORMS.items()}
    series["norms/weight/fc2.weight"] = (STEPS, norm)
    run = write_run(tmp_path / "r", series)
    assert detect_update_ratio(run) == []
    del series["norms/weight/fc1.bias"]  # no norm to read: the bias is judged like the rest
    (finding,) = detect_update_ratio(write_run(tmp_path / "s", series))
    assert finding.keys == ("updates/ratio/fc1.bias",)


def test_one_step_that_moves_a_tensor_by_ten_times_its_norm_is_a_blow_up(tmp_path):
    series = ratios(3, {})
    series |= {f"norms/weight/{k}": (STEPS, np.full(N, v)) for k, v in WEIGHT_NORMS.items()}
    series["updates/ratio/fc1.weight"][1][120] = 340.0  # one step, hundreds of times ||w||
    findings = detect_update_ratio(write_run(tmp_path / "r", series))
    (blowup,) = findings
    assert blowup.severity is Severity.CRITICAL and blowup.start_step == STEPS[120]
    assert blowup.message.startswith("Parameter blow-up") and "'fc1.weight' (340" in blowup.message
    assert blowup.evidence["peak[fc1.weight]"] == 340.0


@pytest.mark.parametrize("weights", [True, False])
def test_zero_init_transient_measured_every_step_is_quiet(tmp_path, weights):
    steps = np.arange(2000)
    norm, ratio = zero_init(steps)
    assert np.median(ratio[:20]) > 0.1  # what a 20-measurement window used to flag
    series = {"updates/ratio/gamma": (steps, ratio)}
    if weights:
        series["norms/weight/gamma"] = (steps[::10], norm[::10])
    assert detect_update_ratio(write_run(tmp_path / "r", series)) == []


def test_weight_norms_decide_the_transient(tmp_path):
    ratio = np.where(STEPS < 300, 0.5, 1e-3)  # 15% of the run, longer than skip_start
    norm = np.where(STEPS < 300, 1e-4, 1.0)  # ...while the tensor had no norm yet
    series = {"updates/ratio/lora_b.weight": (STEPS, ratio)}
    [finding] = detect_update_ratio(write_run(tmp_path / "a", series))
    assert (finding.start_step, finding.severity) == (100, Severity.WARNING)
    series["norms/weight/lora_b.weight"] = (STEPS, norm)
    assert detect_update_ratio(write_run(tmp_path / "b", series)) == []
    series["norms/weight/lora_b.weight"] = (STEPS, np.ones(N))  # a real norm: too fast
    [finding] = detect_update_ratio(write_run(tmp_path / "c", series))
    assert finding.start_step == 0


def growing_bias(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """An output bias starting at ||w|| = 0.3 and updated by ~0.05 per step (SGD on tiny
    batches): its ``norms/weight`` and ``updates/ratio``. ``"grows"``: after 250 steps its
    norm climbs 13x, to 4, while the updates keep their size (the ratio falls from 0.17
    to 0.0125); ``"flat"``: its norm stays at 0.3 (it oscillates); ``"blows_up"``: its
    norm climbs the same 13x with the updates growing alongside (the ratio stays 0.17)."""
    rng = np.random.default_rng(7)
    norm = np.full(N, 0.3)
    if kind != "flat":
        norm = 0.3 * np.exp(np.log(4.0 / 0.3) * np.clip((STEPS - 250) / 750, 0.0, 1.0))
    update = 0.05 * np.exp(rng.normal(0.0, 0.3, N))  # [N]
    if kind == "blows_up":
        update *= norm / 0.3
    return norm, update / norm


@pytest.mark.parametrize(
    ("kind", "flagged"), [("grows", False), ("flat", True), ("blows_up", True)]
)
def test_a_small_tensor_growing_into_its_scale_is_not_a_learning_rate_too_high(
    tmp_path, kind, flagged
):
    """Holdout ``ho_tiny_batches_label_noise``: the output bias starts at 0.136 and grows
    to 1.2, and its ratio is high (200-step median 0.18) only while it is small. Judged
    against the norm it grows into it is in band; the same updates on a tensor that does
    not grow, or that grows because its updates grow with it, are too fast."""
    norm, ratio = growing_bias(kind)
    assert np.median(ratio[:20]) > 0.1  # what the first window's median shows, every kind
    series = ratios(0, {})
    series |= {f"norms/weight/{k}": (STEPS, np.full(N, v)) for k, v in WEIGHT_NORMS.items()}
    series["updates/ratio/head.bias"] = (STEPS, ratio)
    series["norms/weight/head.bias"] = (STEPS, norm)
    findings = detect_update_ratio(write_run(tmp_path / "r", series))
    if not flagged:
        assert findings == []
        return
    (finding,) = findings
    assert finding.keys == ("updates/ratio/head.bias",) and finding.start_step == 0
    assert finding.evidence["growth"] == 4.0


@pytest.mark.parametrize("every", [1, 10])
def test_window_is_a_span_of_steps(tmp_path, every):
    steps = np.arange(0, 3000, every)
    short = np.where((steps >= 1000) & (steps < 1060), 0.5, 1e-3)  # 60 steps: under half
    long = np.where((steps >= 1000) & (steps < 1150), 0.5, 1e-3)  # 150 of 200 steps
    run = write_run(
        tmp_path / "r",
        {"updates/ratio/a.weight": (steps, short), "updates/ratio/b.weight": (steps, long)},
    )
    [finding] = detect_update_ratio(run)
    assert finding.keys == ("updates/ratio/b.weight",)
    assert finding.evidence["window_steps"] == 200
    assert 900 <= finding.start_step <= 1000 and 1149 <= finding.end_step <= 1250


def test_too_large_warning_and_critical_list_layers_by_deviation(tmp_path):
    series = ratios(0, {"fc1.weight": 0.3})
    run = write_run(tmp_path / "r", series)
    [warning] = detect_update_ratio(run, blowup=1e9)
    assert warning.severity is Severity.WARNING
    settled = series["updates/ratio/fc1.weight"][1][10:]  # no weight norms: skip 5% of steps
    assert warning.evidence["peak_median[fc1.weight]"] == pytest.approx(peak_window_median(settled))
    assert (warning.start_step, warning.end_step) == (100, STEPS[-1])
    assert warning.keys == ("updates/ratio/fc1.weight",)
    assert warning.message.startswith("1 layer update too fast")

    series = ratios(1, {"fc1.weight": 0.3, "head.weight": 3.0})
    [critical] = detect_update_ratio(write_run(tmp_path / "c", series), blowup=1e9)
    assert critical.severity is Severity.CRITICAL
    assert critical.keys == ("updates/ratio/head.weight", "updates/ratio/fc1.weight")
    assert critical.evidence["layers"] == 2
    assert critical.evidence["critical"] == 1.0
    assert critical.message.startswith("Learning rate too high for these layers")


def test_too_large_span_covers_the_flagged_windows(tmp_path):
    level = np.where((STEPS >= 500) & (STEPS < 1000), 0.5, 1e-3)
    series = ratios(2, {"fc2.weight": level})
    [finding] = detect_update_ratio(write_run(tmp_path / "r", series))
    values = series["updates/ratio/fc2.weight"][1]
    over = [j for j in range(N - 19) if np.median(values[j : j + 20]) > 0.1]
    assert (finding.start_step, finding.end_step) == (STEPS[over[0]], STEPS[over[-1] + 19])
    assert 300 <= finding.start_step <= 600 and 900 <= finding.end_step <= 1200


def test_layers_that_barely_move_are_info(tmp_path):
    series = ratios(3, {"fc1.weight": 1e-8})
    series["updates/ratio/fc2.weight"] = (STEPS, np.zeros(N))  # dead layer
    [finding] = detect_update_ratio(write_run(tmp_path / "r", series))
    assert finding.severity is Severity.INFO
    assert finding.keys == ("updates/ratio/fc2.weight", "updates/ratio/fc1.weight")
    assert finding.evidence["median[fc1.weight]"] == pytest.approx(
        np.median(series["updates/ratio/fc1.weight"][1])
    )
    assert finding.evidence["median[fc2.weight]"] == 0.0
    assert "barely move" in finding.message


def test_a_late_learning_rate_decay_is_not_persistent(tmp_path):
    level = np.where(STEPS < 1800, 1e-3, 1e-8)  # cosine tail: last 10% of the run
    run = write_run(tmp_path / "r", ratios(4, {"fc1.weight": level}))
    assert detect_update_ratio(run) == []


def test_both_directions_and_top_limit(tmp_path):
    series = ratios(
        5, {"embed.weight": 0.2, "fc1.weight": 0.3, "fc2.weight": 0.5, "head.weight": 1e-9}
    )
    large, small = detect_update_ratio(write_run(tmp_path / "r", series), top=2)
    assert (large.severity, small.severity) == (Severity.WARNING, Severity.INFO)
    assert "and 1 more" in large.message
    assert sorted(k for k in large.evidence if k.startswith("peak_median")) == [
        "peak_median[fc1.weight]",
        "peak_median[fc2.weight]",
    ]
    assert len(large.keys) == 3


def test_skip_patterns_choose_the_ignored_layers(tmp_path):
    run = write_run(tmp_path / "r", ratios(6, {"fc1.bias": 0.5, "embed.weight": 0.5}))
    assert detect_update_ratio(run, skip=("*bias", "embed.*")) == []
    [finding] = detect_update_ratio(run, skip=())
    assert finding.evidence["layers"] == 2


@pytest.mark.parametrize("n", [0, 1, 2])
def test_short_series_give_nothing(tmp_path, n):
    series = {k: (s[:n], v[:n]) for k, (s, v) in ratios(7, {"fc1.weight": 5.0}).items()}
    assert detect_update_ratio(write_run(tmp_path / "r", series)) == []


def test_series_shorter_than_the_window_use_all_points(tmp_path):
    series = {k: (s[:4], v[:4]) for k, (s, v) in ratios(8, {"fc1.weight": 5.0}).items()}
    series |= {f"norms/weight/{k.split('/')[-1]}": (s, np.ones(4)) for k, (s, _) in series.items()}
    [finding] = detect_update_ratio(write_run(tmp_path / "r", series), blowup=1e9)
    assert finding.evidence["peak_median[fc1.weight]"] == pytest.approx(
        np.median(series["updates/ratio/fc1.weight"][1])
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_steps": 0}, r"window_steps must be at least 1 \(the number of steps per median"),
        ({"min_points": 2}, "min_points must be at least 3 points"),
        ({"top": 0}, r"top must be at least 1 \(the number of layers named per finding\), got 0"),
        ({"high": -1.0}, "high must be a finite number > 0"),
        ({"low": 0.5}, r"low \(0.5\) must be smaller than high"),
        ({"critical": 0.05}, r"high \(0.1\) must be smaller than critical"),
        ({"blowup": 0.5}, r"critical \(1.0\) must be smaller than blowup"),
        ({"min_weight_share": 1.0}, r"min_weight_share must be a fraction in \[0, 1\)"),
        ({"skip_start": -0.1}, r"skip_start must be a fraction in \[0, 1\)"),
        ({"growth": 1.0}, r"growth must be a finite factor > 1 .* got 1.0; pass growth=4"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    run = write_run(tmp_path / "r", ratios(0, {}))
    with pytest.raises(ValueError, match=match):
        detect_update_ratio(run, **kwargs)


def test_counts_must_be_ints(tmp_path):
    run = write_run(tmp_path / "r", ratios(0, {}))
    with pytest.raises(TypeError, match=r"window_steps must be an int \(the number of steps"):
        detect_update_ratio(run, window_steps=200.0)


def test_skip_as_a_bare_string_is_refused(tmp_path):
    run = write_run(tmp_path / "r", ratios(0, {}))
    with pytest.raises(TypeError, match=r"skip must be a tuple of fnmatch patterns"):
        detect_update_ratio(run, skip="*bias")


def test_the_pruned_window_search_equals_every_window_median():
    """_too_large computes medians only where half a window lies above the threshold; on
    random series near the threshold (odd and even widths, uneven steps) its result must
    equal the brute force over every window."""
    from trainprobe.analysis._series import step_windows, window_medians
    from trainprobe.analysis.update_ratio import _too_large

    rng = np.random.default_rng(0)
    flagged = 0
    for trial in range(60):
        n = int(rng.integers(5, 400))
        steps = np.cumsum(rng.integers(1, 4, n))
        wave = (rng.random() < 0.5) * np.sin(steps / 30)
        level = 0.1 * rng.uniform(0.6, 1.2)  # below, near or above the threshold
        ratios = level * np.exp(rng.normal(0, 0.4, n)) * (1 + wave)
        window = (int(rng.integers(2, 60)), int(rng.integers(2, 9)))
        starts, ends = step_windows(steps, *window)
        medians = window_medians(ratios, starts, ends)
        over = np.flatnonzero(medians > 0.1)
        got = _too_large("w", steps, ratios, window, 0.1)
        if not over.size:
            assert got == [], trial
            continue
        flagged += 1
        (layer,) = got
        assert layer.start_step == steps[starts[over[0]]]
        assert layer.end_step == steps[ends[over[-1]] - 1]
        assert layer.level == pytest.approx(float(medians.max()))
    assert 10 < flagged < 50  # both outcomes were exercised
