"""The detector corpus: train every generated run, analyse it, score it against its
ground truth, and report true positives, false alarms and misses per detector.

    python benchmarks/detectors.py [--only NAME_SUBSTR] [--fast | --holdout] [--json PATH]
                                   [--workers N] [--keep DIR]

Healthy runs (``benchmarks/corpus/healthy_*.py``) must get no warning or critical
finding; sick runs (``sick_*.py``) must get their expected detector's finding within
its span. Each case trains on one CPU thread; ``--workers`` cases run at once (default
2). Writes the results as JSON (default ``benchmarks/results/detectors.json``) and the
per-detector table as markdown beside it (``detectors.md``), and prints both.

``--holdout`` runs and scores the holdout cases instead (``benchmarks/corpus/holdout.py``:
runs the thresholds were never revised on), into ``detectors_holdout.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks.corpus` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.corpus import BY_NAME, CASES, FAST  # noqa: E402
from benchmarks.corpus.holdout import HOLDOUT, HOLDOUT_BY_NAME  # noqa: E402
from benchmarks.corpus.scoring import score, table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHOWN_EVIDENCE = 8
ANY_CASE = {**BY_NAME, **HOLDOUT_BY_NAME}
"""The corpus and the holdout by name (their names are distinct), for the workers."""
if len(ANY_CASE) != len(BY_NAME) + len(HOLDOUT_BY_NAME):
    raise ValueError(f"holdout names repeat corpus names: {set(BY_NAME) & set(HOLDOUT_BY_NAME)}")


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def run_case(name: str, keep: str | None = None) -> dict[str, Any]:
    """Train case ``name`` into a fresh run directory, analyse and score it."""
    import torch

    import trainprobe

    torch.set_num_threads(1)
    case = ANY_CASE[name]
    out: dict[str, Any] = {"case": name, "kind": case.kind, "note": case.note}
    with contextlib.ExitStack() as stack:
        if keep is None:
            parent = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            parent = Path(keep)
            parent.mkdir(parents=True, exist_ok=True)
        run_dir = parent / name
        if run_dir.exists():  # a run kept by an earlier --keep: train it afresh
            shutil.rmtree(run_dir)
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                case.train(run_dir)
            out["train_seconds"] = time.perf_counter() - start
            with trainprobe.Run(run_dir) as run:
                findings = trainprobe.analyze(run)
            out["findings"] = [_plain(f.to_dict()) for f in findings]
            out["score"] = score(case, out["findings"])
        except Exception:  # a case that cannot run is reported, not fatal
            out["error"] = traceback.format_exc(limit=6)
        out["seconds"] = time.perf_counter() - start
        out["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught})
    return out


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars as Python numbers, NaN/Inf as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
        return str(value)
    return value


def _detector_names() -> list[str]:
    from trainprobe.analysis import DETECTORS

    return [d.name for d in DETECTORS]


def case_line(result: dict[str, Any]) -> str:
    """One line: the case, its kind, its warning/critical findings and the verdict."""
    if "error" in result:
        last = result["error"].strip().splitlines()[-1]
        return f"{result['case']:<36} {result['kind']:<8} ERROR: {last}"
    alarms = [
        f"{f['detector']}[{f['severity'][0].upper()}] {f['start_step']}-{f['end_step']}"
        for f in result["findings"]
        if f["severity"] != "info"
    ]
    info = [f"{f['detector']}[i]" for f in result["findings"] if f["severity"] == "info"]
    verdict = result["score"]["verdict"]
    return (
        f"{result['case']:<36} {result['kind']:<8} {result['seconds']:5.1f}s  {verdict:<22} "
        f"{', '.join(alarms) or '-'}" + (f"  (info: {', '.join(info)})" if info else "")
    )


def _evidence(finding: dict[str, Any]) -> str:
    items = list(finding.get("evidence", {}).items())[:SHOWN_EVIDENCE]
    return ", ".join(f"{k}={_short(v)}" for k, v in items)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 90 else text[:87] + "..."


def summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    healthy = [r for r in results if r["kind"] == "healthy"]
    sick = [r for r in results if r["kind"] == "sick"]
    scored = [r for r in results if "score" in r]
    return {
        "cases": len(results),
        "healthy": len(healthy),
        "sick": len(sick),
        "errors": [r["case"] for r in results if "error" in r],
        "healthy_with_false_alarm": [
            r["case"] for r in healthy if "score" in r and r["score"]["false_alarms"]
        ],
        "healthy_false_alarms": sum(
            len(r["score"]["false_alarms"]) for r in healthy if "score" in r
        ),
        "sick_detected": [
            r["case"]
            for r in sick
            if "score" in r and all(e["result"] == "hit" for e in r["score"]["expected"])
        ],
        "sick_with_false_alarm": [
            r["case"] for r in sick if "score" in r and r["score"]["false_alarms"]
        ],
        "unlisted_info": [
            f"{r['case']}: {r['findings'][i]['detector']}"
            for r in scored
            for i in r["score"]["unlisted_info"]
        ],
    }


def markdown(results: Sequence[dict[str, Any]], rows: dict[str, dict], info: dict) -> str:
    """The per-detector table, the targets' summary and every failing case."""
    detected = len(info["sick_detected"])
    lines = [
        f"{info.get('title', 'Detector corpus')}: {info['healthy']} healthy and {info['sick']} "
        f"sick runs (`{info.get('command', 'python benchmarks/detectors.py')}`, "
        f"{info.get('wall_seconds', 0):.0f} s with "
        f"{info.get('workers', 1)} workers, trainprobe {info.get('commit', '?')}).",
        "",
        f"- healthy runs with a warning or critical finding: "
        f"{len(info['healthy_with_false_alarm'])} of {info['healthy']} (target 0)",
        f"- sick runs detected by the right detector within their span: {detected} of "
        f"{info['sick']} ({100 * detected / max(1, info['sick']):.0f}%, target >= 95%)",
        "",
        "| detector | true positives | false positives | misses | off span | worst false alarm |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        worst = r["worst"]
        shown = (
            f"{worst['case']}: {worst['severity']} {worst['start_step']}-{worst['end_step']}: "
            f"{worst['message']}".replace("|", "\\|")
            if worst
            else ""
        )
        lines.append(
            f"| `{name}` | {r['tp']} | {r['fp']} | {r['miss']} | {r['off_span']} | {shown} |"
        )
    failing = [r for r in results if "error" in r or r["score"]["verdict"] != "ok"]
    if failing:
        lines += ["", "| case | kind | verdict | warning/critical findings |", "|---|---|---|---|"]
        for r in failing:
            if "error" in r:
                lines.append(f"| `{r['case']}` | {r['kind']} | ERROR | |")
                continue
            alarms = "; ".join(
                f"{f['detector']} {f['severity']} {f['start_step']}-{f['end_step']}"
                for f in r["findings"]
                if f["severity"] != "info"
            )
            lines.append(
                f"| `{r['case']}` | {r['kind']} | {r['score']['verdict']} | {alarms or '-'} |"
            )
    return "\n".join(lines) + "\n"


def report(results: Sequence[dict[str, Any]], rows: dict[str, dict]) -> str:
    """The false alarms and misses in full: message and evidence of each."""
    lines = []
    for r in results:
        if "score" not in r:
            continue
        for i in r["score"]["false_alarms"]:
            f = r["findings"][i]
            lines.append(
                f"FALSE ALARM {r['case']} ({r['kind']}): {f['detector']} {f['severity']} "
                f"{f['start_step']}-{f['end_step']}: {f['message']}\n    evidence: {_evidence(f)}"
            )
        for e in r["score"]["expected"]:
            if e["result"] != "hit":
                lines.append(
                    f"{e['result'].upper()} {r['case']}: expected {' | '.join(e['detectors'])} "
                    f"in {e['start']}-{e['end']} (±{e['tolerance']})"
                    + (f", found {e['by']} outside it" if e["by"] else "")
                )
    lines.append("")
    lines.append("Worst false alarm per detector:")
    for name, r in rows.items():
        if r["worst"]:
            w = r["worst"]
            lines.append(f"  {name}: {w['case']}: {w['message']}\n    evidence: {_evidence(w)}")
    return "\n".join(lines)


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+local changes in src" if dirty else "")


def select(only: Sequence[str], fast: bool, holdout: bool = False) -> list[str]:
    names = [c.name for c in (HOLDOUT if holdout else CASES) if not fast or c.name in FAST]
    if only:
        names = [n for n in names if any(part in n for part in only)]
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME_SUBSTR",
        help="run the cases whose name contains this (repeatable)",
    )
    parser.add_argument("--fast", action="store_true", help="only the fast subset")
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="run the holdout cases (benchmarks/corpus/holdout.py) instead of the corpus",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results path (default benchmarks/results/detectors.json; with --holdout "
        "detectors_holdout.json)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the run directories under this folder"
    )
    args = parser.parse_args(argv)
    if args.holdout and args.fast:
        parser.error("--fast selects corpus cases; it does not combine with --holdout")
    if args.json is None:
        args.json = RESULTS / ("detectors_holdout.json" if args.holdout else "detectors.json")
    names = select(args.only, args.fast, args.holdout)
    if not names:
        known = [c.name for c in (HOLDOUT if args.holdout else CASES)]
        parser.error(f"no case matches {args.only}; names are {known}")
    keep = None if args.keep is None else str(args.keep)
    start = time.perf_counter()
    results = []
    print(f"{len(names)} cases, {args.workers} workers")
    if args.workers <= 1:
        _init_worker()
        stream = (run_case(n, keep) for n in names)
        results = _collect(stream)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_init_worker) as pool:
            results = _collect(pool.imap_unordered(_run_star, [(n, keep) for n in names]))
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: order[r["case"]])
    rows = table(results, _detector_names())
    info = summary(results)
    info |= {
        "wall_seconds": time.perf_counter() - start,
        "workers": args.workers,
        "commit": _commit(),
    }
    if args.holdout:
        info |= {"title": "Holdout", "command": "python benchmarks/detectors.py --holdout"}
    text = markdown(results, rows, info)
    print()
    print(report(results, rows))
    print()
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    plain_rows = {k: {**v, "worst": _strip(v["worst"])} for k, v in rows.items()}
    args.json.write_text(
        json.dumps({"summary": info, "detectors": plain_rows, "cases": results}, indent=1),
        encoding="utf-8",
    )
    args.json.with_suffix(".md").write_text(text, encoding="utf-8")
    print(
        f"wall time {info['wall_seconds']:.0f} s; results in {args.json} and "
        f"{args.json.with_suffix('.md')}"
    )
    return info


def _strip(worst: dict | None) -> dict | None:
    return None if worst is None else {k: v for k, v in worst.items() if k != "key"}


def _run_star(args: tuple[str, str | None]) -> dict[str, Any]:
    return run_case(*args)


def _collect(stream) -> list[dict[str, Any]]:
    results = []
    for result in stream:
        print(case_line(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
