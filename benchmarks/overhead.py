"""Training-step overhead of the monitor on a small CNN (CPU), and the cost of idle steps.

Three configurations train identical models on identical batches:

- ``none``: a plain loop, no monitor;
- ``every_1``: ``default_probes(every_n=1)``, every cheap probe due every step;
- ``every_10``: ``default_probes(every_n=10)`` (norms, updates, activations every 10th
  step; the non-finite guard and the learning rate every step).

Repetitions are interleaved (each repetition times ``K`` steps of every configuration,
in a shuffled order), so drift in machine speed hits all configurations alike. The
reported step time is the median over repetitions; the ratio's 95% interval is a
paired bootstrap over repetitions. ``K`` is a multiple of 10, so every block of
``every_10`` holds the same number of due steps.

Usage::

    python benchmarks/overhead.py            # about 1-2 minutes
    python benchmarks/overhead.py --quick    # about 15 s
    python benchmarks/overhead.py --json out.json --threads 4
    python benchmarks/overhead.py --per-probe  # adds each probe alone, due every step
    python benchmarks/overhead.py --profile    # where the every-step overhead goes
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import platform
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import (
    PROBES,
    ActivationStats,
    LayerNorms,
    LearningRate,
    NonFiniteGuard,
    UpdateNorms,
    at_steps,
    default_probes,
    every,
)

#: Configuration name -> probes (None: no monitor at all), and the issue's target ratio.
CONFIGS: dict[str, tuple[Callable[[], list] | None, float | None]] = {
    "none": (None, None),
    "every_1": (lambda: default_probes(every_n=1), 1.10),
    "every_10": (lambda: default_probes(every_n=10), 1.02),
}


def per_probe_configs() -> dict[str, tuple[Callable[[], list], None]]:
    """Each probe class alone, due every step (no target: it shows where overhead goes)."""
    return {
        f"only_{name}": (lambda cls=cls: [cls(schedule=every(1))], None)
        for name, cls in PROBES.items()
    }


def small_cnn() -> nn.Module:
    """conv 3->16->32 with BatchNorm, ReLU and pooling, a linear head: [B, 3, 32, 32] -> [B, 10]."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def make_batches(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, 10, (size,), generator=gen))
        for _ in range(count)
    ]


@dataclass
class Trainer:
    """One configuration's model, optimizer, monitor and step counter (persist across reps)."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    mon: trainprobe.Monitor | None
    step: int = 0
    seconds: list[float] = field(default_factory=list)  # per-step time of each rep

    def run(self, batches: list, steps: int) -> float:
        """Train ``steps`` steps; returns the elapsed wall time."""
        model, opt, mon = self.model, self.opt, self.mon
        start = time.perf_counter()
        for _ in range(steps):
            x, y = batches[self.step % len(batches)]
            if mon is None:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            else:
                with mon.step(self.step, batch=(x, y)) as s:
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    s.log(loss=loss)
            opt.step()
            opt.zero_grad()
            self.step += 1
        return time.perf_counter() - start


def make_trainers(
    stack: contextlib.ExitStack, root: Path, init: dict, configs: dict, *, flush_seconds: float
) -> dict[str, Trainer]:
    trainers = {}
    for name, (probes, _) in configs.items():
        model = small_cnn()
        model.load_state_dict(init)  # the same initial weights in every configuration
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        mon = None
        if probes is not None:
            mon = stack.enter_context(
                trainprobe.watch(
                    model, probes(), run_dir=root / name, optimizer=opt, flush_seconds=flush_seconds
                )
            )
        trainers[name] = Trainer(name, model, opt, mon)
    return trainers


def bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, *, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of ``median(num) / median(den)``, resampling repetitions in pairs."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(draws, len(num)))  # [draws, R]
    ratios = np.median(num[idx], axis=1) / np.median(den[idx], axis=1)  # [draws]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def idle_step_cost(root: Path, steps: int) -> dict[str, float]:
    """Microseconds per ``mon.step`` when no probe is due (every schedule far away)."""
    far = at_steps(10**12)
    probes = [
        LayerNorms(schedule=far),
        UpdateNorms(schedule=far),
        ActivationStats(schedule=far),
        NonFiniteGuard(schedule=far),
        LearningRate(schedule=far),
    ]
    model = small_cnn()
    loss = torch.tensor(1.0)
    out = {}
    start = time.perf_counter()
    for i in range(steps):
        with contextlib.nullcontext(i):
            pass
    out["baseline_us"] = (time.perf_counter() - start) / steps * 1e6
    with trainprobe.watch(model, probes, run_dir=root / "idle") as mon:
        start = time.perf_counter()
        for i in range(steps):
            with mon.step(i):
                pass
        out["nothing_due_us"] = (time.perf_counter() - start) / steps * 1e6
    with trainprobe.watch(model, probes, run_dir=root / "idle_log") as mon:
        start = time.perf_counter()
        for i in range(steps):
            with mon.step(i) as s:
                s.log(loss=loss)
        out["nothing_due_log_loss_us"] = (time.perf_counter() - start) / steps * 1e6
    return out


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    init = small_cnn().state_dict()
    batches = make_batches(args.batches, args.batch_size)
    configs = CONFIGS | (per_probe_configs() if args.per_probe else {})
    order = list(configs)
    shuffler = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainers = make_trainers(stack, Path(tmp), init, configs, flush_seconds=args.flush_seconds)
        for trainer in trainers.values():  # warm-up, not timed
            trainer.run(batches, args.warmup)
        for _ in range(args.reps):
            shuffler.shuffle(order)
            for name in order:
                gc.collect()
                trainer = trainers[name]
                trainer.seconds.append(trainer.run(batches, args.steps) / args.steps)
        stack.close()  # flush and close the monitors inside the tempdir
        final = {name: t.model.state_dict() for name, t in trainers.items()}
        identical = all(
            torch.equal(final["none"][k], final[name][k]) for name in final for k in final["none"]
        )
        idle = idle_step_cost(Path(tmp), args.idle_steps)
    base = np.array(trainers["none"].seconds)
    rows = []
    for name, (_, target) in configs.items():
        times = np.array(trainers[name].seconds)
        ratio = float(np.median(times) / np.median(base))
        low, high = bootstrap_ratio(times, base)
        rows.append(
            {
                "config": name,
                "median_ms": float(np.median(times) * 1e3),
                "min_ms": float(times.min() * 1e3),
                "max_ms": float(times.max() * 1e3),
                "ratio": ratio,
                "ratio_ci95": [low, high],
                "target": target,
                "pass": None if target is None else ratio <= target,
                "per_rep_ms": (times * 1e3).round(4).tolist(),
            }
        )
    return {
        "rows": rows,
        "idle": idle,
        "bit_identical_training": identical,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "profile")},
        "platform": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    }


def print_report(result: dict) -> None:
    settings = result["settings"]
    print(
        f"small CNN, batch {settings['batch_size']}, CPU, {settings['threads']} threads; "
        f"{settings['reps']} interleaved reps x {settings['steps']} steps, "
        f"{settings['warmup']} warm-up steps each"
    )
    print(
        f"{'config':<18} {'median ms/step':>15} {'min..max ms':>15} {'ratio':>7} "
        f"{'95% CI':>15} {'target':>7} {'result':>6}"
    )
    for row in result["rows"]:
        low, high = row["ratio_ci95"]
        target = "-" if row["target"] is None else f"<={row['target']:.2f}"
        verdict = "-" if row["pass"] is None else ("pass" if row["pass"] else "FAIL")
        print(
            f"{row['config']:<18} {row['median_ms']:>15.3f} "
            f"{row['min_ms']:>7.2f}..{row['max_ms']:<6.2f} {row['ratio']:>7.3f} "
            f"{f'{low:.3f}..{high:.3f}':>15} {target:>7} {verdict:>6}"
        )
    idle = result["idle"]
    print(
        f"idle steps (no probe due): {idle['nothing_due_us']:.1f} us/step "
        f"({idle['nothing_due_log_loss_us']:.1f} us with s.log(loss=...); empty `with` "
        f"{idle['baseline_us']:.2f} us)"
    )
    print(f"training bit-identical across configurations: {result['bit_identical_training']}")
    base = np.array(result["rows"][0]["per_rep_ms"])
    p10, p90 = np.percentile(base, [10, 90])
    if p90 > 1.25 * p10:
        print(
            f"warning: plain-loop step times spread {p10:.2f}..{p90:.2f} ms (10th..90th "
            "percentile); the machine was busy, rerun on an idle one (or with --threads 1)"
        )


def profile(args: argparse.Namespace) -> None:
    """cProfile of the every-step configuration: where the monitor's time goes."""
    torch.manual_seed(0)
    init = small_cnn().state_dict()
    batches = make_batches(args.batches, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainer = make_trainers(
            stack,
            Path(tmp),
            init,
            {"every_1": CONFIGS["every_1"]},
            flush_seconds=args.flush_seconds,
        )["every_1"]
        trainer.run(batches, args.warmup)
        profiler = cProfile.Profile()
        profiler.enable()
        trainer.run(batches, args.reps * args.steps // 4)
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
    stats.print_stats(r"trainprobe|overhead\.py|optim|functional", 30)
    print(text.getvalue())


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CI has 2 cores)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per repetition, a multiple of 10 (default 20; 10 with --quick)",
    )
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per config")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="distinct synthetic batches")
    parser.add_argument(
        "--flush-seconds",
        type=float,
        default=2.0,
        help="watch(flush_seconds=...) of the monitored configurations",
    )
    parser.add_argument("--idle-steps", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="about 15 s instead of 1-2 min")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument(
        "--per-probe", action="store_true", help="also time each probe alone, due every step"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the every-step configuration instead of timing",
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.quick else 20
    if args.steps <= 0 or args.steps % 10:
        parser.error(
            f"--steps must be a multiple of 10 (got {args.steps}) so every block of "
            "every_10 holds the same number of due steps"
        )
    if args.reps is None:
        args.reps = 12 if args.quick else 80
    if args.quick:
        args.warmup = min(args.warmup, 10)
        args.idle_steps = min(args.idle_steps, 5_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return 0
    result = measure(args)
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
