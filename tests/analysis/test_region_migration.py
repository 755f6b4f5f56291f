"""detect_region_migration on synthetic local-complexity series (the corpus schedule:
log-spaced plus every 100 steps, 59 measurements over 3000 steps), checked against
numbers computed here; and the corpus' region cases, trained for real (slow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, detect_region_migration
from trainprobe.analysis.region_migration import migration_phases, relative_noise

KEY = "regions/train/total"
STEPS = np.array(
    sorted({0, *(round(10 ** (i / 10)) for i in range(35)), *range(0, 3000, 100), 2999})
)
N = STEPS.size


def phases(minimum: float, peak: float, end: float) -> np.ndarray:
    """An early descent 8 -> ``minimum`` by step 10, the ascent to ``peak`` at step 500,
    then a linear descent to ``end`` at step 2999 (the shape of the corpus' MLPs)."""
    return np.interp(STEPS, [0, 10, 500, 2999], [8.0, minimum, peak, end])


def noisy(count: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """``count`` times independent Gaussian factors ``1 + sigma z``."""
    return count * (1 + sigma * np.random.default_rng(seed).standard_normal(count.size))


def median3(x: np.ndarray) -> np.ndarray:
    """The running median of three, written out."""
    return np.array([sorted(x[i : i + 3])[1] for i in range(x.size - 2)])


def regions(tmp_path, count: np.ndarray, key: str = KEY):
    return write_run(tmp_path / "r", {key: (STEPS, count)})


def test_a_17_percent_descent_is_found(tmp_path):
    """The reported case: a real 17% fall after the peak, missed by the old 20%."""
    count = noisy(phases(6.0, 10.0, 8.3), 0.005, seed=0)
    run = regions(tmp_path, count)
    (finding,) = detect_region_migration(run)
    smooth = median3(count)
    peak = int(np.argmax(smooth))
    below = peak + int(np.flatnonzero(smooth[peak:] <= 0.9 * smooth[peak])[0])
    ev = finding.evidence
    assert finding.severity is Severity.INFO and finding.keys == (KEY,)
    assert ev["peak"] == pytest.approx(smooth[peak]) and ev["peak_step"] == STEPS[peak + 1]
    assert ev["descent_step"] == STEPS[below + 1] == finding.end_step
    assert ev["relative_descent"] == pytest.approx(1 - smooth[peak:].min() / smooth[peak])
    assert 0.15 < ev["relative_descent"] < 0.19 and ev["descent"] == 0.1
    assert ev["minimum_step"] == finding.start_step <= 20 and "early descent" in finding.message
    assert detect_region_migration(run, descent=0.2) == []  # the old threshold misses it
    json.dumps(finding.to_dict(), allow_nan=False)


@pytest.mark.parametrize("seed", range(8))
def test_noise_only_wiggles_are_quiet(tmp_path, seed):
    """A flat count on 32 fresh points a step (relative noise 0.1, as measured on the
    corpus' blobs): the smoothed series rises and falls by more than 10% by chance."""
    count = noisy(np.full(N, 7.0), 0.1, seed)
    run = regions(tmp_path, count)
    assert detect_region_migration(run) == []
    smooth = median3(count)
    assert smooth.max() / smooth.min() > 1.15  # wiggles a fixed 10% threshold would take


def test_the_noise_term_is_what_keeps_wiggles_quiet(tmp_path):
    fired = 0
    for seed in range(8):
        run = regions(tmp_path / str(seed), noisy(np.full(N, 7.0), 0.1, seed))
        fired += bool(detect_region_migration(run, noise_multiple=1e-9))
    assert fired >= 4


def test_a_large_descent_is_found_through_the_noise(tmp_path):
    count = noisy(phases(6.0, 12.0, 4.0), 0.1, seed=3)
    (finding,) = detect_region_migration(regions(tmp_path, count))
    ev = finding.evidence
    assert ev["noise"] == pytest.approx(relative_noise(count))
    assert 0.06 < ev["noise"] < 0.14
    assert ev["descent"] == ev["ascent"] == pytest.approx(4 * ev["noise"])
    assert 500 <= ev["peak_step"] <= 1100 and ev["relative_descent"] > ev["descent"]


@pytest.mark.parametrize(
    "count",
    [
        pytest.param(phases(6.0, 10.0, 12.0), id="still_rising"),
        pytest.param(np.interp(STEPS, [0, 10, 3000], [8.0, 6.0, 6.5]), id="flat_after_fit"),
        pytest.param(phases(6.0, 10.0, 9.5), id="plateau_5_percent_below"),
        pytest.param(np.interp(STEPS, [0, 100, 2999], [8.0, 6.0, 9.0]), id="still_fitting"),
        # a 30% dip while fitting, then a rise above that first top: no migration yet
        pytest.param(np.interp(STEPS, [0, 10, 30, 60, 2999], [7, 6, 8, 5.6, 10]), id="dip"),
    ],
)
def test_no_second_descent_is_quiet(tmp_path, count):
    assert detect_region_migration(regions(tmp_path, noisy(count, 0.005, seed=1))) == []


def test_the_first_set_present_is_read(tmp_path):
    count = phases(6.0, 10.0, 7.0)
    (finding,) = detect_region_migration(regions(tmp_path, count, "regions/test/total"))
    assert finding.keys == ("regions/test/total",)
    both = write_run(
        tmp_path / "b", {KEY: (STEPS, np.full(N, 7.0)), "regions/test/total": (STEPS, count)}
    )
    assert detect_region_migration(both) == []  # train first, and it is flat


def test_too_few_points_a_missing_key_and_zero_counts_are_quiet(tmp_path):
    count = phases(6.0, 10.0, 5.0)
    short = write_run(tmp_path / "a", {KEY: (STEPS[:5], count[:5])})
    assert detect_region_migration(short) == []
    assert (
        detect_region_migration(write_run(tmp_path / "b", {"scalars/loss": (STEPS, count)})) == []
    )
    assert detect_region_migration(regions(tmp_path / "c", np.zeros(N))) == []
    steps = np.arange(0, 3000, 100)  # a plain schedule of 30 measurements
    sparse = np.interp(steps, [0, 500, 2900], [6.0, 10.0, 8.0])
    (finding,) = detect_region_migration(write_run(tmp_path / "d", {KEY: (steps, sparse)}))
    smooth = median3(sparse)
    assert finding.evidence["relative_descent"] == pytest.approx(1 - smooth[-1] / smooth.max())


def test_relative_noise_recovers_the_spread_around_a_trend():
    trend = np.linspace(5.0, 15.0, 400)  # [400]
    estimate = relative_noise(noisy(trend, 0.05, seed=2))
    assert estimate == pytest.approx(0.05, rel=0.15)
    assert relative_noise(trend) == pytest.approx(0.0, abs=1e-12)
    assert relative_noise(np.array([3.0, 4.0])) == 0.0


def test_migration_phases_takes_the_peak_it_never_regains():
    smooth = np.array([8.0, 6.0, 9.0, 7.0, 12.0, 11.0, 9.0, 10.0])
    # 9.0 rose 50% and fell 22%, but 12.0 comes later: the peak is 12.0
    assert migration_phases(smooth, rise=0.2, fall=0.2) == (1, 4, 6)
    assert migration_phases(smooth, rise=0.2, fall=0.3) is None
    assert migration_phases(np.array([0.0, 5.0, 3.0]), rise=0.2, fall=0.1) is None


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"ascent": 0.0}, ValueError, r"ascent must be a fraction in \(0, 1\), got 0\.0"),
        ({"ascent": 1.0}, ValueError, r"ascent must be a fraction in \[0, 1\), got 1\.0"),
        ({"descent": -0.1}, ValueError, r"descent must be a fraction in \[0, 1\), got -0\.1"),
        ({"descent": 0}, ValueError, r"descent must be a fraction in \(0, 1\), got 0"),
        ({"noise_multiple": 0.0}, ValueError, r"noise_multiple must be a finite number > 0"),
        ({"noise_multiple": math.nan}, ValueError, r"noise_multiple must be a finite number > 0"),
        ({"window": 1}, ValueError, r"window must be at least 3 points"),
        ({"window": 4}, ValueError, r"window must be odd .*pass window=5"),
        ({"window": 3.0}, TypeError, r"window must be an int number of points, got float"),
        ({"min_points": 2}, ValueError, r"min_points must be at least 3 points"),
    ],
)
def test_bad_options_name_the_fix(tmp_path, options, error, match):
    run = regions(tmp_path, phases(6.0, 10.0, 7.0))
    with pytest.raises(error, match=match):
        detect_region_migration(run, **options)


# -- the corpus' region cases, trained for real ------------------------------------------


def test_the_region_cases_state_their_truth():
    from benchmarks.corpus import BY_NAME
    from benchmarks.corpus.regions_cases import CASES

    assert len(CASES) >= 12 and all(BY_NAME[c.name] is c for c in CASES)
    for case in CASES:
        if case.kind == "sick":
            (expected,) = case.expect
            assert expected.detectors == ("region_migration",) and expected.severity == "info"
            assert case.allowed_info == ("region_migration",)
        else:
            assert case.expect == () and "region_migration" not in case.allowed_info
    assert {c.kind for c in CASES} == {"healthy", "sick"}


QUICK = "regions_blobs_flat_noisy_batch"
"""The case run in the default tests (~2.5 s): noise the former fixed threshold took."""


def _region_cases():
    from benchmarks.corpus.regions_cases import CASES

    return [
        pytest.param(case, id=case.name, marks=[] if case.name == QUICK else [pytest.mark.slow])
        for case in CASES
    ]


@pytest.mark.parametrize("case", _region_cases())
def test_a_region_case_has_its_truth_and_its_finding(case, tmp_path):
    """The dense measurement says what the case claims, and the detector agrees: a
    migrating case gets the info finding within its span, a healthy one none at all."""
    import torch
    from benchmarks.corpus.regions_cases import true_phases
    from benchmarks.corpus.scoring import score

    import trainprobe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        case.train(tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    with trainprobe.Run(tmp_path / "run") as run:
        truth = true_phases(run)
        findings = [f.to_dict() for f in trainprobe.analyze(run)]
    found = [f for f in findings if f["detector"] == "region_migration"]
    if case.kind == "sick":
        assert truth["truth"] == "migrates", truth
        (expected,) = case.expect
        assert abs(truth["peak_step"] - expected.start) <= expected.tolerance, truth
        assert score(case, findings)["verdict"] == "ok", findings
    else:
        assert truth["truth"] == "stays", truth
        assert found == [], found
