"""The detector corpus (``benchmarks/corpus``): its size, its scoring, and its fast cases
run for real: a healthy case gets no warning or critical finding, a sick case gets its
expected detector within its span.

A case that fails today because of a detector mechanism is a strict xfail naming the
mechanism: it turns red once the mechanism is fixed, and the mark is then removed.
``python benchmarks/detectors.py`` runs the whole corpus and reports per detector.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.corpus import BY_NAME, CASES, FAST, Case, Expected
from benchmarks.corpus.scoring import score, table

import trainprobe

ROOT = Path(__file__).resolve().parents[2]

MECHANISM: dict[str, str] = {}
"""Fast cases that fail today, and the detector mechanism that fails them (none now: the
loss at the float floor, mild task conflict and gradients exploding from the first step
were fixed in the detectors)."""


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params():
    for name in FAST:
        marks = (
            [pytest.mark.xfail(strict=True, reason=MECHANISM[name])] if name in MECHANISM else []
        )
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.filterwarnings("ignore:trainprobe:RuntimeWarning")  # the loop without optimizer
@pytest.mark.parametrize("name", list(_params()))
def test_fast_case(name: str, tmp_path: Path, one_thread: None) -> None:
    case = BY_NAME[name]
    case.train(tmp_path / "run")
    with trainprobe.Run(tmp_path / "run") as run:
        findings = [f.to_dict() for f in trainprobe.analyze(run)]
    scored = score(case, findings)
    if case.kind == "healthy":
        alarms = [f for f in findings if f["severity"] != "info"]
        assert not alarms, f"false alarms on healthy {name}: {alarms}"
    else:
        missed = [e for e in scored["expected"] if e["result"] != "hit"]
        assert not missed, f"{name}: {missed}; findings {findings}"


def test_corpus_sizes_and_names() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    assert sum(case.kind == "healthy" for case in CASES) >= 30
    assert sum(case.kind == "sick" for case in CASES) >= 20
    assert set(FAST) <= set(names)
    assert {BY_NAME[n].kind for n in FAST} == {"healthy", "sick"}
    for case in CASES:
        assert case.note, f"{case.name} needs a note saying what it is"


def _finding(detector: str, severity: str, start: int, end: int) -> dict:
    return {
        "detector": detector,
        "severity": severity,
        "start_step": start,
        "end_step": end,
        "message": "",
        "evidence": {},
    }


def test_scoring_roles() -> None:
    sick = Case(
        "toy",
        "sick",
        lambda run_dir: None,
        expect=(Expected(("exploding_gradients", "instability"), 100, 120, 10),),
        also=("loss_spike",),
        note="toy",
    )
    hit = score(sick, [_finding("instability", "critical", 125, 200)])
    assert hit["verdict"] == "ok" and hit["expected"][0]["by"] == "instability"
    late = score(sick, [_finding("exploding_gradients", "warning", 300, 310)])
    assert late["expected"][0]["result"] == "late"
    early_alarm = score(
        sick,
        [
            _finding("loss_spike", "warning", 10, 12),  # before the mishap: a false alarm
            _finding("loss_spike", "warning", 150, 150),  # a side effect after it
            _finding("instability", "info", 100, 100),  # info does not count
        ],
    )
    assert early_alarm["expected"][0]["result"] == "miss"
    assert early_alarm["false_alarms"] == [0] and early_alarm["accepted"] == [1]
    assert early_alarm["verdict"] == "MISS + FALSE ALARM"
    healthy = Case("calm", "healthy", lambda run_dir: None, allowed_info=("grokking",), note="x")
    found = [_finding("noise_scale", "info", 0, 9), _finding("loss_spike", "warning", 5, 5)]
    calm = score(healthy, found)
    assert calm["false_alarms"] == [1] and calm["unlisted_info"] == [0]
    rows = table(
        [
            {"case": "calm", "findings": found, "score": calm},
            {"case": "toy", "findings": [], "score": late},
        ],
        ["loss_spike"],
    )
    assert rows["loss_spike"]["fp"] == 1 and rows["loss_spike"]["worst"]["case"] == "calm"
    assert rows["exploding_gradients"]["off_span"] == 1


@pytest.mark.slow
def test_runner_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "detectors.json"
    subprocess.run(
        [sys.executable, "benchmarks/detectors.py", "--fast", "--json", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    results = json.loads(out.read_text())
    assert sorted(c["case"] for c in results["cases"]) == sorted(FAST)
    assert not results["summary"]["errors"]
    assert out.with_suffix(".md").read_text().count("| `") >= len(results["detectors"])
