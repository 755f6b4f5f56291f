"""``trainprobe report``'s command line: its arguments, its help and its exit codes as data.
The standard library only: ``trainprobe --help`` builds this parser."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

EXIT_CODES = {
    0: "the run finished (or is still being written by a live process, or records no "
    "status) and no finding is critical",
    1: "a critical finding (in a run that finished or is still running)",
    2: "usage error: not a run, an unreadable run, a bad --set, an unwritable --dashboard-out",
    3: "the training failed: the watched code raised (status 'failed: ...')",
    4: "the run was abandoned: its status says running but no process writes it any more "
    "(killed, e.g. SIGKILL or out of memory, or its machine stopped)",
}
"""``trainprobe report``'s exit codes (3 and 4 take precedence over 1); also 130 when
interrupted and 141 when its output pipe closes early (``| head``), as Unix tools."""


def codes_help(width: int = 88) -> str:
    """:data:`EXIT_CODES` as indented lines of at most ``width`` columns, for ``--help``."""
    lines = []
    for code, text in EXIT_CODES.items():
        lines.extend(
            textwrap.wrap(
                text,
                width,
                initial_indent=f"  {code:<4}",
                subsequent_indent=" " * 6,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


REPORT_HELP = """Analyse a run directory (or its run.db), print its state and findings (most
severe first) and refresh RUN_DIR/dashboard.html (where RUN_DIR cannot be written, a note
says so and the exit code is that of the findings).

The state: finished; failed (the watched code raised); running (a live process holds the
run's writer lock, RUN_DIR/writer.lock); abandoned (the status says running but no process
holds the lock any more: the writer was killed or its machine stopped; the operating
system drops the lock of a dead process, SIGKILL included).

exit codes (3 and 4 take precedence over 1):
{codes}
  70  an internal error (a traceback follows); 130 interrupted; 141 the output pipe
      closed early (e.g. | head), as Unix tools
"""


def add_parser(subparsers: Any, func: Callable[[argparse.Namespace], int]) -> None:
    """Register ``report`` on ``parser.add_subparsers()``, handled by ``func``."""
    report = subparsers.add_parser(
        "report",
        help="print the state and findings of a run; exit 1 critical, 3 failed, 4 abandoned",
        description=REPORT_HELP.format(codes=codes_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or its run.db")
    report.add_argument("--json", action="store_true", help="print findings as JSON")
    report.add_argument(
        "--no-dashboard", action="store_true", help="do not rewrite RUN_DIR/dashboard.html"
    )
    report.add_argument(
        "--dashboard-out",
        metavar="PATH",
        help="write the dashboard to PATH instead of RUN_DIR/dashboard.html",
    )
    report.add_argument(
        "--set",
        action="append",
        metavar="DETECTOR.PARAM=VALUE",
        help="a detector threshold, e.g. exploding_gradients.jump_factor=20 (repeatable; "
        "VALUE is read as true/false, an int, a float, or text)",
    )
    report.set_defaults(func=func)
