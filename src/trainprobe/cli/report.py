"""Terminal rendering of findings (fits in 100 columns)."""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Sequence

from ..analysis.findings import Finding, Severity
from ..store import Run

WIDTH = 100
_INDENT = " " * 4


def _steps(finding: Finding) -> str:
    if finding.start_step == finding.end_step:
        return f"step {finding.start_step}"
    return f"steps {finding.start_step}-{finding.end_step}"


def format_findings(run: Run, findings: Sequence[Finding]) -> str:
    """A header line about the run, then one block per finding, most severe first."""
    last = run.last_step()
    status = run.meta.get("status", "unknown")
    lines = [f"trainprobe report: {run.run_dir}", f"last step {last}, status: {status}"]
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


def exit_code(findings: Sequence[Finding]) -> int:
    """1 when any finding is critical (so ``trainprobe report`` can gate CI), else 0."""
    return int(any(f.severity is Severity.CRITICAL for f in findings))
