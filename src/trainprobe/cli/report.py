"""Terminal rendering of findings, the run's state and ``trainprobe report``'s exit codes.

The summary of every recorded series lives in :mod:`.summary` (re-exported here).
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Sequence

from ..analysis.findings import Finding, Severity
from ..store import Run, RunState
from .report_cli import EXIT_CODES
from .summary import GROUP_MIN, format_summary, summary_dict

__all__ = [
    "EXIT_CODES",
    "GROUP_MIN",
    "exit_code",
    "format_findings",
    "format_summary",
    "probe_notes",
    "summary_dict",
]

WIDTH = 100
_INDENT = " " * 4


def _steps(finding: Finding) -> str:
    if finding.start_step == finding.end_step:
        return f"step {finding.start_step}"
    return f"steps {finding.start_step}-{finding.end_step}"


def format_findings(run: Run, findings: Sequence[Finding], state: RunState | None = None) -> str:
    """A header about the run (last step, :meth:`Run.state`), then one block per finding,
    most severe first; a run with no records says so instead."""
    last = run.last_step()
    state = run.state() if state is None else state
    lines = [f"trainprobe report: {run.run_dir}"]
    if last is None:
        lines.append(f"status: {state.describe()}")
        lines.append(
            "No records: the run holds no recorded step yet (nothing was written, or the job "
            "stopped before its first flush), so there is nothing to analyse."
        )
        return "\n".join(lines)
    lines.append(f"last step {last}, status: {state.describe()}")
    for note in probe_notes(run):
        lines.extend(textwrap.wrap(note, WIDTH, subsequent_indent=_INDENT))
    if not findings:
        lines.append("No findings: no detector saw a problem in the recorded series.")
        return "\n".join(lines)
    counts = Counter(str(f.severity) for f in findings)
    order = [str(s) for s in sorted(Severity, reverse=True)]
    lines.append(
        f"{len(findings)} finding{'s' if len(findings) != 1 else ''}: "
        + ", ".join(f"{counts[s]} {s}" for s in order if counts[s])
    )
    for f in sorted(findings, key=lambda f: (-int(f.severity), f.start_step)):
        lines.append("")
        lines.append(f"{str(f.severity).upper():<9}{_steps(f):<22}{f.detector}")
        lines.extend(
            textwrap.wrap(f.message, WIDTH, initial_indent=_INDENT, subsequent_indent=_INDENT)
        )
        lines.extend(
            textwrap.wrap(
                f"-> {f.action}", WIDTH, initial_indent=_INDENT, subsequent_indent=_INDENT + "   "
            )
        )
    return "\n".join(lines)


def probe_notes(run: Run) -> list[str]:
    """What the run's metadata says probes did not measure: probes disabled (and why),
    steps skipped on a non-finite loss, default probes with nothing to read; and curvature
    probes whose ``engine="auto"`` fell back to finite differences (why, from when)."""
    meta = run.meta
    notes = [
        f"probe {name!r} disabled: {reason}"
        for name, reason in (meta.get("disabled_probes") or {}).items()
    ]
    for name, steps in (meta.get("skipped_steps") or {}).items():
        plural = "s" if len(steps) != 1 else ""
        notes.append(
            f"probe {name!r} skipped {len(steps)} step{plural} on a non-finite loss "
            f"(first: step {steps[0]})"
        )
    notes.extend(
        f"probe {name!r} recorded nothing at some steps: {reason}"
        for name, reason in (meta.get("idle_probes") or {}).items()
    )
    for name, how in (meta.get("measured_with") or {}).items():
        if isinstance(how, dict) and how.get("engine") == "fd" and how.get("fallback"):
            notes.append(
                f"probe {name!r} ran on finite differences (engine 'fd', attention "
                f"{how.get('attention') or '?'}) from step {how.get('since_step', '?')}: "
                f"{how['fallback']}; the products' largest estimated error is {name}/fd_error"
            )
    return notes


def exit_code(findings: Sequence[Finding], state: RunState | None = None) -> int:
    """The :data:`EXIT_CODES` code: 3 for a failed run, 4 for an abandoned one, else 1 when
    any finding is critical (so ``trainprobe report`` can gate CI), else 0."""
    if state is not None and state.name == "failed":
        return 3
    if state is not None and state.name == "abandoned":
        return 4
    return int(any(f.severity is Severity.CRITICAL for f in findings))
