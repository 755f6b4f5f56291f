"""The ``trainprobe`` command: demo, report, dashboard, export, scan. Glue only.

Building the parser imports the standard library only (the command modules' top levels,
``export``, ``report_cli``, ``scan`` and ``serve``, do too); each command imports what it
needs in its handler. So ``--help`` is quick, and only ``demo`` and ``scan`` import torch
(tests/test_startup.py checks; benchmarks/startup.py times it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from .._version import __version__
from .export import add_parser as add_export_parser
from .report_cli import add_parser as add_report_parser
from .scan import add_parser as add_scan_parser
from .serve import add_arguments as serve_arguments

EPILOG = """examples:
  trainprobe demo                       train a small CNN, print findings, write the dashboard
  trainprobe report runs/exp1           findings; exit 1 critical, 3 run failed, 4 abandoned
  trainprobe report runs/exp1 --set exploding_gradients.jump_factor=20
  trainprobe dashboard runs/exp1 -o exp1.html
  trainprobe dashboard runs/exp1 --serve  live page on localhost, follows a run in progress
  trainprobe export runs/exp1 --format csv
  trainprobe scan ckpts/ --model mypkg.models:build --data mypkg.data:batches
"""


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _free_run_dir(out: Path) -> Path:
    """``out/run``, or ``out/run-2``, ``-3``, ... if earlier demos used it."""
    candidate, n = out / "run", 1
    while candidate.exists():
        n += 1
        candidate = out / f"run-{n}"
    return candidate


def _write_dashboard(run, findings, output: Path, hint: str = "pass -o PATH") -> Path:
    """Write the page; an ``OSError`` that names the file, the reason and ``hint``."""
    from ..dashboard import build, extra_figures, to_html

    html = to_html(build(run, findings), *extra_figures(run))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(html, encoding="utf-8")
    except OSError as err:
        raise OSError(
            f"cannot write the dashboard to {output}: {err.strerror or err}; {hint} to write "
            "it elsewhere"
        ) from err
    return output


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import analyze
    from ..store import Run
    from .demo import DemoConfig, run_demo
    from .report import format_findings

    if args.threads:
        torch.set_num_threads(args.threads)
    config = DemoConfig(steps=args.steps, seed=args.seed, mishap=not args.no_mishap)
    run_dir = _free_run_dir(Path(args.out))
    print(
        f"trainprobe demo: training a BatchNorm CNN on generated 8x8 digits for {config.steps} "
        f"steps -> {run_dir}"
    )
    if config.mishap:
        print(
            f"(the learning rate is raised {config.mishap_factor:g}x at steps "
            f"{config.mishap_start}-{config.mishap_start + config.mishap_steps - 1} on purpose, "
            "to give the detectors something real; --no-mishap trains cleanly)"
        )
    run_demo(config, run_dir)
    with Run(run_dir) as run, run.reading_once():  # analyze, report, dashboard: one read
        findings = analyze(run)
        print(format_findings(run, findings))
        html = _write_dashboard(run, findings, run_dir / "dashboard.html")
    print(f"\ndashboard: {html}  (one self-contained HTML file; open it in a browser)")
    print(f"again later: trainprobe report {run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..analysis import analyze
    from ..analysis.registry import DETECTORS, detector_settings
    from ..store import Run
    from .detector_config import parse_settings
    from .report import exit_code

    config = parse_settings(args.set)
    try:
        detector_settings(DETECTORS, config)  # before the run is read: a usage error, exit 2
    except (TypeError, ValueError) as err:
        raise ValueError(f"--set: {err}") from err
    with Run(args.run_dir) as run, run.reading_once():
        state = run.state()
        findings = analyze(run, config=config)
        _print_report(run, findings, state, args)
        _report_dashboard(run, findings, args)
    return exit_code(findings, state)


def _print_report(run, findings, state, args: argparse.Namespace) -> None:
    from .report import format_findings, format_summary, summary_dict

    if args.json:
        payload = {
            "run_dir": str(run.run_dir),
            "last_step": run.last_step(),
            "status": state.status,
            "state": state.name,
            "writer": state.writer,
            "findings": [f.to_dict() for f in findings],
            "series": summary_dict(run),
        }
        print(json.dumps(payload, indent=2))
    else:
        print(format_findings(run, findings, state))
        print("\n" + format_summary(run))


def _report_dashboard(run, findings, args: argparse.Namespace) -> None:
    """Refresh the run's dashboard (or write ``--dashboard-out``): where the run directory
    cannot be written, a one-line note on stderr instead; an unwritable ``--dashboard-out``
    is an error (exit 2)."""
    if args.no_dashboard:
        return
    hint = "pass --dashboard-out PATH (or --no-dashboard)"
    if args.dashboard_out:
        html = _write_dashboard(run, findings, Path(args.dashboard_out), hint)
    else:
        try:
            html = _write_dashboard(run, findings, run.run_dir / "dashboard.html", hint)
        except OSError as err:
            print(f"trainprobe report: dashboard not written: {err}", file=sys.stderr)
            return
    if not args.json:
        print(f"\ndashboard: {html}")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ..analysis import analyze
    from ..store import Run

    if args.serve:
        from .serve import serve

        return serve(args.run_dir, args.port, refresh_seconds=args.refresh)

    with Run(args.run_dir) as run, run.reading_once():
        output = Path(args.output) if args.output else run.run_dir / "dashboard.html"
        print(f"dashboard: {_write_dashboard(run, analyze(run), output)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainprobe",
        description="Training-dynamics diagnostics for PyTorch runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trainprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a small CNN on generated data, watched; report",
        description="Train a small BatchNorm CNN on generated 8x8 digits with "
        "the default probes, print the findings and write the dashboard.",
    )
    demo.add_argument(
        "--out",
        default="trainprobe-demo",
        help="directory for the run and dashboard (default: %(default)s)",
    )
    demo.add_argument(
        "--steps", type=_positive, default=2000, help="training steps (default: 2000)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--no-mishap",
        action="store_true",
        help="train without the deliberate learning-rate mistake",
    )
    demo.add_argument(
        "--threads",
        type=_non_negative,
        default=2,
        help="torch CPU threads (default: 2; 0 keeps torch's choice)",
    )
    demo.set_defaults(func=cmd_demo)

    add_report_parser(sub, cmd_report)

    dash = sub.add_parser(
        "dashboard",
        help="write the interactive HTML dashboard of a run",
        description="Write one self-contained HTML file (plotly.js embedded; "
        "opens offline) with every recorded series and the findings marked.",
    )
    dash.add_argument("run_dir", metavar="RUN_DIR")
    dash.add_argument("-o", "--output", help="HTML file (default: RUN_DIR/dashboard.html)")
    serve_arguments(dash)
    dash.set_defaults(func=cmd_dashboard)
    add_export_parser(sub)
    add_scan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # the reader went away (`| head`): end quietly, as Unix tools do
        with contextlib.suppress(OSError, ValueError):  # what is still buffered goes nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (OSError, ValueError) as err:  # FileNotFound, FileExists, Permission, RunError...
        print(f"trainprobe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: not 1, which means a critical finding
        traceback.print_exc()
        print(
            f"trainprobe {args.command}: internal error (exit 70); please report it with the "
            "traceback above",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
