"""Scoring a case's findings against its ground truth (plain Python: findings as the
dicts ``Finding.to_dict`` gives), and the per-detector table over many cases."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .base import SEVERITIES, Case, Expected

Found = Mapping[str, Any]  # Finding.to_dict(): detector, severity, start_step, end_step, ...
RANK = {name: i for i, name in enumerate(SEVERITIES)}


def alarming(finding: Found) -> bool:
    """A warning or critical finding."""
    return RANK[finding["severity"]] >= RANK["warning"]


def overlaps(finding: Found, window: tuple[int, int]) -> bool:
    return finding["start_step"] <= window[1] and finding["end_step"] >= window[0]


def _fits(finding: Found, expected: Expected) -> bool:
    return (
        finding["detector"] in expected.detectors
        and RANK[finding["severity"]] >= RANK[expected.severity]
    )


def score(case: Case, findings: Sequence[Found]) -> dict[str, Any]:
    """Each expectation's result and each finding's role, and the case's verdict.

    An expectation is a *hit* when a finding of one of its detectors, at its severity or
    above, overlaps ``[start - tolerance, end + tolerance]``; *late* or *early* when such
    a finding exists only after or before that window; else a *miss*. A warning or
    critical finding is a *false alarm* on a healthy case; on a sick case when it matches
    no expectation and either ends before the earliest expected window (the run was
    still healthy then) or comes from a detector neither expected nor listed in
    ``case.also`` (true side effects of the mishap). Info findings of detectors outside
    ``case.allowed_info`` are listed as *unlisted info* (not counted as false alarms).
    """
    expected_rows, matched = [], set()
    for exp in case.expect:
        window = exp.window
        fitting = [i for i, f in enumerate(findings) if _fits(f, exp)]
        inside = [i for i in fitting if overlaps(findings[i], window)]
        if inside:
            matched.update(inside)
            result, by = "hit", findings[inside[0]]["detector"]
        elif fitting:
            later = findings[fitting[0]]["start_step"] > window[1]
            result, by = ("late" if later else "early"), findings[fitting[0]]["detector"]
        else:
            result, by = "miss", None
        expected_rows.append(
            {
                "detectors": list(exp.detectors),
                "start": exp.start,
                "end": exp.end,
                "tolerance": exp.tolerance,
                "severity": exp.severity,
                "result": result,
                "by": by,
            }
        )
    onset = min((e.window[0] for e in case.expect), default=None)
    known = {d for e in case.expect for d in e.detectors} | set(case.also)
    false_alarms, accepted, unlisted = [], [], []
    for i, f in enumerate(findings):
        if i in matched:
            continue
        if not alarming(f):
            if f["detector"] not in case.allowed_info:
                unlisted.append(i)
        elif case.kind == "healthy" or f["end_step"] < onset or f["detector"] not in known:
            false_alarms.append(i)
        else:
            accepted.append(i)
    problems = [row["result"].upper() for row in expected_rows if row["result"] != "hit"]
    if false_alarms:
        problems.append("FALSE ALARM")
    return {
        "expected": expected_rows,
        "false_alarms": false_alarms,
        "accepted": accepted,
        "unlisted_info": unlisted,
        "verdict": " + ".join(dict.fromkeys(problems)) or "ok",
    }


def table(results: Iterable[Mapping[str, Any]], detectors: Iterable[str]) -> dict[str, dict]:
    """Per detector: true positives (hits credited to the detector that made them), false
    alarms, misses and off-span results (credited to an expectation's first detector),
    and the worst false alarm (highest severity, then the longest span)."""
    rows: dict[str, dict] = {
        d: {"tp": 0, "fp": 0, "miss": 0, "off_span": 0, "worst": None} for d in detectors
    }

    def row(name: str) -> dict:
        return rows.setdefault(name, {"tp": 0, "fp": 0, "miss": 0, "off_span": 0, "worst": None})

    for result in results:
        if "score" not in result:
            continue
        found = result["findings"]
        for exp in result["score"]["expected"]:
            if exp["result"] == "hit":
                row(exp["by"])["tp"] += 1
            elif exp["result"] == "miss":
                row(exp["detectors"][0])["miss"] += 1
            else:
                row(exp["detectors"][0])["off_span"] += 1
        for i in result["score"]["false_alarms"]:
            f = found[i]
            r = row(f["detector"])
            r["fp"] += 1
            key = (RANK[f["severity"]], f["end_step"] - f["start_step"])
            if r["worst"] is None or key > r["worst"]["key"]:
                r["worst"] = {"key": key, "case": result["case"], **f}
    return rows
