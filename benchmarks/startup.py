"""How long the ``trainprobe`` commands take to start, and whether they import torch.

Each command runs as a whole, fresh process (interpreter start, imports, work, exit), as a
user types it: ``trainprobe --help``, ``report`` on a demo run (which also rewrites the
run's dashboard.html, as it does by default), ``report --no-dashboard``, ``dashboard`` and
``export``, next to two references: the bare interpreter and ``import torch``. Every
process runs the console script's code inside a ``-c`` wrapper that reports, at exit,
whether ``torch`` ended up in ``sys.modules``. ``report``, ``dashboard``, ``export`` and
``--help`` need no torch; the table says whether each one loaded it anyway.

The run is a demo run (``trainprobe demo``, trained here in a temporary directory unless
``--run`` gives one, which is copied first so that ``report`` does not rewrite its
dashboard). Repetitions are interleaved (every command once per repetition, in a shuffled
order) after one untimed warm-up of each, so machine drift and the page cache hit them
alike. Bytecode is cached in the temporary directory (``PYTHONPYCACHEPREFIX``), as an
installed package has it, also where ``PYTHONDONTWRITEBYTECODE`` is set. The table gives
the median, min and max wall time over repetitions; the targets are those of issue 12
(2-core CPU VM): ``--help`` under 0.5 s, ``report`` under 1.5 s.

``src/`` of this checkout (or each ``--src``, e.g. a commit exported with ``git archive``)
comes first on ``PYTHONPATH``, so the numbers are those of that tree whether or not the
package is installed from it. Several ``--src`` are timed side by side, interleaved in one
run (the demo run is trained with the first):

    python benchmarks/startup.py [--repeat 7] [--run RUN_DIR] [--importtime] [--json out.json]
    mkdir /tmp/head && git archive HEAD src | tar -x -C /tmp/head
    python benchmarks/startup.py --src before=/tmp/head/src --src after=src
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MARK = "@@startup-bench torch imported: "

AT_EXIT = f"""import atexit, sys
atexit.register(lambda: print("\\n{MARK}" + str("torch" in sys.modules), file=sys.stderr))
"""
"""Says, when the process exits, whether torch was imported."""

WRAPPER = f"""{AT_EXIT}from trainprobe.cli.main import main
sys.exit(main())
"""
"""The console script's body (``from trainprobe.cli.main import main; sys.exit(main())``)."""


@dataclass(frozen=True)
class Command:
    """One timed process: ``python -c <code> <args>`` with ``env`` (its ``PYTHONPATH``)."""

    label: str
    code: str
    args: tuple[str, ...] = ()
    ok_codes: tuple[int, ...] = (0,)
    target_s: float | None = None
    torch_expected: bool = False
    env: Mapping[str, str] = field(default_factory=dict, repr=False)


def commands(run_dir: Path, out_dir: Path, trees: Mapping[str, Mapping[str, str]]) -> list:
    """The two references, then each ``trainprobe`` command once per tree (``{tag: env}``)."""
    run, html, csv = str(run_dir), str(out_dir / "dashboard.html"), str(out_dir / "series.csv")
    cli = {  # label: (arguments, accepted exit codes, target seconds)
        "trainprobe --help": (("--help",), (0,), 0.5),
        "trainprobe report RUN": (("report", run), (0, 1), 1.5),  # 1: a critical finding
        "trainprobe report --no-dashboard": (("report", run, "--no-dashboard"), (0, 1), None),
        "trainprobe dashboard RUN": (("dashboard", run, "-o", html), (0,), None),
        "trainprobe export RUN": (("export", run, "--out", csv), (0,), None),
    }
    first = next(iter(trees.values()))
    torch = f"{AT_EXIT}import torch\n"
    out = [
        Command("python (floor)", AT_EXIT, env=first),
        Command("python -c 'import torch'", torch, env=first, torch_expected=True),
    ]
    for tag, env in trees.items():
        suffix = f" [{tag}]" if len(trees) > 1 else ""
        out += [
            Command(label + suffix, WRAPPER, args, codes, target, env=env)
            for label, (args, codes, target) in cli.items()
        ]
    return out


def environment(src: Path, pycache: Path) -> dict[str, str]:
    """This environment with ``src`` first on ``PYTHONPATH`` and bytecode cached under
    ``pycache`` (as an installed package has it, even where PYTHONDONTWRITEBYTECODE is set;
    nothing is written into the trees)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPROFILEIMPORTTIME"):
        env.pop(name, None)
    return env


def run_once(command: Command, *flags: str) -> tuple[float, bool, str]:
    """``(wall seconds, torch imported, stderr)`` of one process; raises when it fails."""
    argv = [sys.executable, *flags, "-c", command.code, *command.args]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(command.env), timeout=600)
    seconds = time.perf_counter() - start
    marks = re.findall(rf"^{re.escape(MARK)}(True|False)$", done.stderr, re.MULTILINE)
    if done.returncode not in command.ok_codes or not marks:
        raise RuntimeError(
            f"{command.label} exited {done.returncode} (expected one of {command.ok_codes}):\n"
            f"{done.stderr[-3000:]}"
        )
    return seconds, marks[-1] == "True", done.stderr


def demo_run(tmp: Path, steps: int, env: Mapping[str, str]) -> Path:
    out = tmp / "demo"
    print(f"training the demo run ({steps} steps) in {out} ...", flush=True)
    args = ("demo", "--out", str(out), "--steps", str(steps))
    run_once(Command("demo", WRAPPER, args, env=env))
    return out / "run"


def measure(cmds: list[Command], repeat: int, seed: int) -> dict:
    times: dict[str, list[float]] = {c.label: [] for c in cmds}
    torch: dict[str, bool] = {}
    for c in cmds:  # warm-up: bytecode caches, page cache
        torch[c.label] = run_once(c)[1]
    order = list(cmds)
    rng = random.Random(seed)
    for rep in range(repeat):
        rng.shuffle(order)
        for c in order:
            seconds, imported, _ = run_once(c)
            times[c.label].append(seconds)
            torch[c.label] = torch[c.label] or imported
        print(f"repetition {rep + 1}/{repeat} done", file=sys.stderr, flush=True)
    return {
        c.label: {
            "median_s": statistics.median(times[c.label]),
            "min_s": min(times[c.label]),
            "max_s": max(times[c.label]),
            "times_s": times[c.label],
            "torch_imported": torch[c.label],
            "torch_expected": c.torch_expected,
            "target_s": c.target_s,
        }
        for c in cmds
    }


def table(result: dict) -> str:
    head = f"{'command':<44}{'median s':>9}{'min..max s':>15}  {'torch':<6}{'target':>7}  result"
    lines = [head]
    for label, r in result.items():
        spread = f"{r['min_s']:.2f}..{r['max_s']:.2f}"
        torch = "yes" if r["torch_imported"] else "no"
        target = f"<{r['target_s']:g}" if r["target_s"] else "-"
        verdict = "-" if r["torch_expected"] else ("ok" if _ok(r) else "FAIL")
        median = f"{r['median_s']:>9.2f}"
        lines.append(f"{label:<44}{median}{spread:>15}  {torch:<6}{target:>7}  {verdict}")
    return "\n".join(lines)


def _ok(r: dict) -> bool:
    """Torch loaded only where expected, and the median under its target (if any)."""
    fast = r["target_s"] is None or r["median_s"] < r["target_s"]
    return r["torch_imported"] == r["torch_expected"] and fast


def import_costs(command: Command, top: int) -> str:
    """Self import time summed by top-level package, for one run under ``-X importtime``."""
    stderr = run_once(command, "-X", "importtime")[2]
    by_root: dict[str, int] = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            root = m.group(2).split(".")[0]
            by_root[root] = by_root.get(root, 0) + int(m.group(1))
    total = sum(by_root.values())
    ranked = sorted(by_root.items(), key=lambda kv: -kv[1])[:top]
    parts = ", ".join(f"{name} {us / 1000:.0f}" for name, us in ranked)
    return f"{command.label:<44} {total / 1000:6.0f} ms: {parts}"


def _tree(spec: str, pycache: Path) -> tuple[str, dict[str, str]]:
    """``"tag=path"`` or ``"path"`` (tagged by the folder above ``src``) -> ``(tag, env)``."""
    tag, sep, path = spec.partition("=")
    src = Path(path if sep else spec).resolve()
    if not (src / "trainprobe" / "__init__.py").is_file():
        raise SystemExit(f"--src {spec}: {src} holds no trainprobe/__init__.py")
    return (tag if sep else src.parent.name), environment(src, pycache)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=7, help="interleaved repetitions")
    parser.add_argument(
        "--run",
        type=Path,
        default=None,
        help="a run to report on (copied first; default: the demo, trained in a temp dir)",
    )
    parser.add_argument(
        "--demo-steps", type=int, default=2000, help="demo steps when --run is not given"
    )
    parser.add_argument(
        "--importtime", action="store_true", help="also list import time by top-level package"
    )
    parser.add_argument(
        "--src",
        action="append",
        metavar="[TAG=]PATH",
        help=f"a src/ tree to time; repeat to compare trees (default: {SRC})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="trainprobe-startup-") as tmp_name:
        tmp = Path(tmp_name)
        trees = dict(_tree(spec, tmp / "pycache") for spec in args.src or [str(SRC)])
        if args.run is None:
            run_dir = demo_run(tmp, args.demo_steps, next(iter(trees.values())))
        else:
            run_dir = tmp / "run"
            shutil.copytree(args.run, run_dir)
        cmds = commands(run_dir, tmp, trees)
        result = measure(cmds, args.repeat, args.seed)
        print(f"\n{sys.executable} ({os.cpu_count()} CPUs), {args.repeat} interleaved repetitions")
        for tag, env in trees.items():
            print(f"  [{tag}] {env['PYTHONPATH'].split(os.pathsep)[0]}")
        print(table(result))
        if args.importtime:
            print("\nimport time (ms, self time summed by top-level package, one run):")
            for c in cmds:
                print(import_costs(c, top=6))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(_ok(r) for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
