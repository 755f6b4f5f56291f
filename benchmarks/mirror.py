"""What ``watch(mirror=SummaryWriter(...))`` costs: per flush, and per training step.

Two measurements, both on the CPU:

- ``flush``: a deep narrow MLP whose default probes, all due every step, write about 1000
  keys per step; ``flush_seconds=0`` so every step is one flush. The time of each
  ``mon.flush()`` is recorded with and without a TensorBoard ``SummaryWriter`` mirror (and
  the time inside the mirror's own ``write``): the median per flush, and per key.
- ``step``: a small MLP trained with ``default_probes(every_n=10)`` and the default
  ``flush_seconds`` (2 s), three loops on identical batches: ``off`` (no monitor), ``store``
  (the monitor, no mirror) and ``tensorboard`` (the monitor mirroring to a
  ``SummaryWriter``). Repetitions are interleaved in a shuffled order so drift hits every
  configuration alike; the step time is the median over repetitions, and the mirror's
  overhead is given two ways: the paired difference ``tensorboard - store`` over the
  ``store`` step time (with a 95% bootstrap interval over repetitions), and the time
  spent inside the mirror (the trackers' own cost, in this thread) over the ``store`` step
  time. The SummaryWriter's background thread writes the file; the paired difference
  includes what it takes from the training thread.

Usage::

    pip install -e ".[tensorboard]"
    python benchmarks/mirror.py               # about 1 minute
    python benchmarks/mirror.py --quick       # about 15 s
    python benchmarks/mirror.py --json out.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import default_probes

INPUTS, WIDTH, DEPTH, BATCH = 784, 512, 3, 128  # the small MLP: MNIST-shaped, 669,706 params
FLUSH_LAYERS = 75  # about 1000 keys per step in the flush benchmark (width 16)


def _mlp(width: int, depth: int, n_in: int = INPUTS, n_out: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(n_in, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def _batches(n: int, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, INPUTS, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(n)
    ]


def _timed(record: list[float], fn: Callable[..., None]) -> Callable[..., None]:
    def wrapper(*args, **kwargs) -> None:
        start = time.perf_counter()
        fn(*args, **kwargs)
        record.append(time.perf_counter() - start)

    return wrapper


def _writer(folder: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))


def _train(model, batches, folder: Path, *, mirror, probes, flush_seconds, warmup=10):
    """Train on ``batches`` (the first ``warmup`` untimed); return the timed (wall, process
    CPU) seconds (the steps after warm-up, a last explicit flush and the SummaryWriter's
    own flush, so every value is written inside the timing; CPU time counts every thread,
    the SummaryWriter's writer thread too), every flush's seconds, the seconds inside the
    mirror, and the close's seconds (with a mirror: the analysis and the findings)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    flushes: list[float] = []
    inside: list[float] = []
    mon = trainprobe.watch(
        model, probes, run_dir=folder, optimizer=opt, mirror=mirror, flush_seconds=flush_seconds
    )
    with mon:
        mon.flush = _timed(flushes, mon.flush)
        mon._mirror.write = _timed(inside, mon._mirror.write)  # the trackers' own cost
        for i, (x, y) in enumerate(batches):
            if i == warmup:
                mon.flush()
                begin, cpu, flushes[:], inside[:] = time.perf_counter(), time.process_time(), [], []
            with mon.step(i) as s:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
        mon.flush()
        if mirror is not None:
            mirror.flush()  # waits for the writer thread: its queue holds up to 10 events
        took = (time.perf_counter() - begin, time.process_time() - cpu)
        closing = time.perf_counter()
    return took, flushes, sum(inside), time.perf_counter() - closing


def _train_off(model, batches) -> tuple[float, float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    begin, cpu = time.perf_counter(), time.process_time()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - begin, time.process_time() - cpu


def bench_flush(steps: int, tmp: Path) -> dict:
    """Flush time with and without a SummaryWriter, on about 1000 keys per flush: the
    median wall time of ``mon.flush()`` (the training thread's wait) and the process CPU
    time per step (every thread: the SummaryWriter's writer thread too)."""
    batches = _batches(steps, batch=16)
    flushes: dict[str, list[float]] = {"store": [], "tensorboard": []}
    cpu: dict[str, list[float]] = {"store": [], "tensorboard": []}
    for rep, name in enumerate(("store", "tensorboard") * 3):
        torch.manual_seed(0)
        model = _mlp(16, FLUSH_LAYERS)
        mirror = _writer(tmp / f"tb-flush-{rep}") if name == "tensorboard" else None
        (_, seconds), took, _, _ = _train(
            model,
            batches,
            tmp / f"flush-{rep}",
            mirror=mirror,
            probes=default_probes(every_n=1),
            flush_seconds=0.0,
            warmup=2,
        )
        if mirror is not None:
            mirror.close()
        flushes[name] += took[:-1]  # the last is the explicit flush of nothing
        cpu[name].append(seconds / (steps - 2))
        with trainprobe.Run(tmp / f"flush-{rep}") as run:
            keys = len(run.keys(prefix=""))
    wall = {k: 1e3 * statistics.median(v) for k, v in flushes.items()}
    per_step = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    mirror_cpu = per_step["tensorboard"] - per_step["store"]
    return {
        "keys_per_flush": keys,
        "flush_wall_ms": wall,
        "step_cpu_ms": per_step,
        "mirror_wall_ms_per_flush": wall["tensorboard"] - wall["store"],
        "mirror_cpu_ms_per_flush": mirror_cpu,
        "mirror_cpu_us_per_key": 1e3 * mirror_cpu / keys,
    }


def _paired(ratio: np.ndarray) -> tuple[float, float, float]:
    """Median of paired ratios and its 95% bootstrap interval over repetitions."""
    gen = np.random.default_rng(0)
    boots = [np.median(gen.choice(ratio, ratio.size)) for _ in range(2000)]
    return float(np.median(ratio)), *(float(np.percentile(boots, q)) for q in (2.5, 97.5))


def bench_step(steps: int, reps: int, tmp: Path, warmup: int = 10) -> dict:
    """Step time off / store / tensorboard, interleaved repetitions (see the module)."""
    batches = _batches(steps + warmup)
    wall: dict[str, list[float]] = {"off": [], "store": [], "tensorboard": []}
    cpu: dict[str, list[float]] = {"off": [], "store": [], "tensorboard": []}
    inside: list[float] = []
    closing: list[float] = []
    order = list(wall)
    rng = random.Random(0)
    for rep in range(reps):
        rng.shuffle(order)
        for name in order:
            torch.manual_seed(0)
            model = _mlp(WIDTH, DEPTH)
            if name == "off":
                took = _train_off(model, batches[warmup:])
            else:
                mirror = _writer(tmp / f"tb-step-{rep}") if name == "tensorboard" else None
                took, _, spent, closed = _train(
                    model,
                    batches,
                    tmp / f"step-{name}-{rep}",
                    mirror=mirror,
                    probes=default_probes(every_n=10),
                    flush_seconds=2.0,
                    warmup=warmup,
                )
                if mirror is not None:
                    mirror.close()
                    inside.append(spent / steps)
                    closing.append(closed)
            wall[name].append(took[0] / steps)
            cpu[name].append(took[1] / steps)
    out: dict = {
        "wall_ms_per_step": {k: 1e3 * statistics.median(v) for k, v in wall.items()},
        "cpu_ms_per_step": {k: 1e3 * statistics.median(v) for k, v in cpu.items()},
    }
    for kind, times in (("wall", wall), ("cpu", cpu)):
        store, tb = np.array(times["store"]), np.array(times["tensorboard"])
        out[f"mirror_overhead_{kind}"] = _paired((tb - store) / store)  # same repetition
    out["mirror_inside_us_per_step"] = 1e6 * statistics.median(inside)
    out["mirror_overhead_inside"] = statistics.median(inside) / statistics.median(wall["store"])
    out["close_with_mirror_ms"] = 1e3 * statistics.median(closing)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, reps, flush_steps = (100, 3, 12) if args.quick else (300, 9, 40)
    with tempfile.TemporaryDirectory() as folder:
        flush = bench_flush(flush_steps, Path(folder))
        step = bench_step(steps, reps, Path(folder))
    mlp = f"MLP {INPUTS}-{WIDTH}x{DEPTH - 1}-10, batch {BATCH}, {args.threads} thread(s)"
    result = {
        "flush": flush,
        "step": step,
        "config": {
            "steps": steps,
            "reps": reps,
            "mlp": mlp,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
    }
    wall, cpu = flush["flush_wall_ms"], flush["step_cpu_ms"]
    print(
        f"flush of {flush['keys_per_flush']} keys: mon.flush() {wall['store']:.2f} ms, with a "
        f"SummaryWriter {wall['tensorboard']:.2f} ms; CPU per step (all threads) "
        f"{cpu['store']:.2f} -> {cpu['tensorboard']:.2f} ms: the mirror "
        f"{flush['mirror_cpu_ms_per_flush']:.2f} ms per flush, "
        f"{flush['mirror_cpu_us_per_key']:.1f} us per key"
    )
    ms, cpu = step["wall_ms_per_step"], step["cpu_ms_per_step"]
    print(
        f"step, {mlp}, default probes every 10 steps (wall / CPU ms): off {ms['off']:.3f} / "
        f"{cpu['off']:.3f}, store {ms['store']:.3f} / {cpu['store']:.3f}, tensorboard "
        f"{ms['tensorboard']:.3f} / {cpu['tensorboard']:.3f}"
    )
    for kind in ("wall", "cpu"):
        mid, low, high = step[f"mirror_overhead_{kind}"]
        print(
            f"mirror overhead ({kind}, paired): {100 * mid:+.2f}% "
            f"(95% CI {100 * low:+.2f}% .. {100 * high:+.2f}%)"
        )
    print(
        f"inside the mirror (training thread): {step['mirror_inside_us_per_step']:.1f} us/step "
        f"= {100 * step['mirror_overhead_inside']:.2f}% of the store step; close (analysis, "
        f"findings) {step['close_with_mirror_ms']:.0f} ms once"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
