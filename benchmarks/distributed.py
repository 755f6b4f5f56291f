"""Probe overhead per training step under DDP (gloo, CPU) at 1, 2 and 4 processes, and the
bytes trainprobe communicates per measured step.

Every process trains four DDP replicas of one MLP from the same initial weights, on the
same batches, side by side in one process group:

- ``none``: the plain loop, no monitor;
- ``default_every_10``: ``default_probes(every_n=10)`` (the non-finite guard and the
  learning rate still every step);
- ``default_every_1``: ``default_probes(every_n=1)``;
- ``sharpness_every_10``: ``Sharpness(schedule=every(10))`` alone, on the step's batch
  (each Hessian-vector product all-reduced over the ranks).

Repetitions are interleaved: each repetition trains a block of ``--block`` steps (a
multiple of 10, so every block holds the same number of due steps) of every
configuration, in an order shuffled alike on every rank. Ranks start each block together
(a barrier) and a block's time is the slowest rank's. The ratio of a configuration is the
median over repetitions of its per-step time over ``none``'s in the same repetition, with
the 10th..90th percentiles as spread; ``+ ms/step`` is the median of the same paired
differences. Four processes on a 2-core machine share cores: their step times include
waiting for a core, so compare ratios within one world size.

Bytes are counted by wrapping ``torch.distributed.all_gather``, ``all_gather_object`` and
``all_reduce`` inside the timed blocks of the watched configurations (the loop itself
makes no Python-level collective; DDP's gradient all-reduce is its C++ reducer, not
counted): an all-gather counts ``world x`` its payload (what every rank receives), an
all-reduce its tensor, an object gather ``world x`` the pickled object. A measured step
is one with a probe due. At world size 1 the monitor sees no ranks and communicates
nothing.

Usage::

    python benchmarks/distributed.py                 # about 2 minutes on 2 cores
    python benchmarks/distributed.py --quick         # about 1 minute
    python benchmarks/distributed.py --worlds 2 --reps 40 --json out.json
    python benchmarks/distributed.py --fsdp --worlds 2 4   # FSDP2 instead of DDP

Under ``--fsdp`` the replicas are ``fully_shard``'ed (each linear layer and the root) and
the MLP uses GELU; ``Sharpness`` then runs finite differences through the sharded model
(four gradients a product, each all-gathered: ``trainprobe.curvature.sharded``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import trainprobe
from trainprobe.curvature import criterion_loss
from trainprobe.probes import Sharpness, default_probes, every

FEATURES, HIDDEN, CLASSES = 128, 256, 10
CONFIGS: dict[str, Callable[[], list] | None] = {
    "none": None,
    "default_every_10": lambda: default_probes(every_n=10),
    "default_every_1": lambda: default_probes(every_n=1),
    "sharpness_every_10": lambda: [Sharpness(schedule=every(10))],
}
RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"


def mlp(act: type[nn.Module] = nn.ReLU) -> nn.Module:
    """``[B, 128] -> [B, 10]``: two hidden layers of 256 (101,386 parameters); ReLU, or
    GELU under ``--fsdp`` (finite differences need a smooth loss: a ReLU kink inside the
    step gets the products refused)."""
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        act(),
        nn.Linear(HIDDEN, HIDDEN),
        act(),
        nn.Linear(HIDDEN, CLASSES),
    )


def wrapped(net: nn.Module, fsdp: bool) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on each linear layer and the root)."""
    if not fsdp:
        return DDP(net)
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(net)


class Traffic:
    """Bytes and calls of the collectives made through ``torch.distributed``, per
    configuration, while ``current`` names one (None: not counted)."""

    KINDS = ("all_gather", "all_reduce", "all_gather_object")

    def __init__(self, world: int) -> None:
        self.world = world
        self.current: str | None = None
        self.bytes: dict[str, dict[str, int]] = {}
        self.calls: dict[str, dict[str, int]] = {}

    def install(self) -> None:
        """Wrap the three collectives (trainprobe calls them as ``torch.distributed.*``)."""
        size = {
            "all_gather": lambda parts, t, **_: self.world * t.numel() * t.element_size(),
            "all_reduce": lambda t, **_: t.numel() * t.element_size(),
            "all_gather_object": lambda out, obj, **_: self.world * len(pickle.dumps(obj)),
        }
        for kind, count in size.items():
            setattr(dist, kind, self._wrap(kind, getattr(dist, kind), count))

    def _wrap(self, kind: str, call: Callable, count: Callable) -> Callable:
        def counted(*args, **kwargs):
            if self.current is not None:
                calls = self.calls.setdefault(self.current, dict.fromkeys(self.KINDS, 0))
                sizes = self.bytes.setdefault(self.current, dict.fromkeys(self.KINDS, 0))
                calls[kind] += 1
                sizes[kind] += count(*args, **kwargs)
            return call(*args, **kwargs)

        return counted


class Replica:
    """One configuration's DDP model, optimizer, monitor and step counter on this rank."""

    def __init__(self, name: str, model: nn.Module, opt, mon: trainprobe.Monitor | None) -> None:
        self.name, self.model, self.opt, self.mon = name, model, opt, mon
        self.step = 0
        self.measured = 0  # timed steps with a probe due
        self.seconds: list[float] = []  # per-step time of each repetition

    def train(self, batches: list, steps: int, *, timed: bool = False) -> float:
        """``steps`` steps; returns this rank's elapsed seconds."""
        model, opt, mon = self.model, self.opt, self.mon
        start = time.perf_counter()
        for _ in range(steps):
            x, y = batches[self.step % len(batches)]
            if mon is None:
                F.cross_entropy(model(x), y).backward()
            else:
                if timed:
                    self.measured += any(p.schedule(self.step) for p in mon.probes)
                with mon.step(self.step, batch=(x, y)) as s:
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    s.log(loss=loss)
            opt.step()
            opt.zero_grad()
            self.step += 1
        return time.perf_counter() - start


def open_replicas(
    stack: contextlib.ExitStack, root: Path, init: dict, fsdp: bool
) -> dict[str, Replica]:
    replicas = {}
    loss_fn = criterion_loss(nn.CrossEntropyLoss())
    for name, probes in CONFIGS.items():
        net = mlp(nn.GELU if fsdp else nn.ReLU)
        net.load_state_dict(init)  # the same initial weights in every configuration
        model = wrapped(net, fsdp)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mon = None
        if probes is not None:
            mon = stack.enter_context(
                trainprobe.watch(
                    model, probes(), run_dir=root / name, optimizer=opt, loss_fn=loss_fn
                )
            )
        replicas[name] = Replica(name, model, opt, mon)
    return replicas


def timed_block(replica: Replica, batches: list, steps: int, traffic: Traffic) -> float:
    """One block, started together on every rank: the slowest rank's seconds per step."""
    dist.barrier()
    traffic.current = None if replica.mon is None else replica.name
    try:
        elapsed = replica.train(batches, steps, timed=True)
    finally:
        traffic.current = None
    slowest = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # not counted: current is None
    return float(slowest) / steps


def make_batches(rank: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eight batches of this rank's share: ``[size, 128]`` inputs, ``[size]`` labels."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return [
        (
            torch.randn(size, FEATURES, generator=gen),
            torch.randint(0, CLASSES, (size,), generator=gen),
        )
        for _ in range(8)
    ]


def measure_on_rank(rank: int, world: int, settings: dict) -> dict:
    torch.manual_seed(0)
    init = mlp().state_dict()
    batches = make_batches(rank, settings["batch"])
    fsdp = settings.get("fsdp", False) and world > 1
    traffic = Traffic(world)
    traffic.install()
    order, shuffler = list(CONFIGS), random.Random(0)  # the same order on every rank
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        replicas = open_replicas(stack, Path(tmp), init, fsdp)
        for replica in replicas.values():  # warm-up: HVP engine choice, layout agreement
            replica.train(batches, settings["warmup"])
        for _ in range(settings["reps"]):
            shuffler.shuffle(order)
            for name in order:
                replica = replicas[name]
                replica.seconds.append(timed_block(replica, batches, settings["block"], traffic))
        disabled = {n: dict(r.mon._disabled) for n, r in replicas.items() if r.mon is not None}
        stack.close()  # the monitors flush and close inside the temporary directory
    final = {n: _local_state(r.model) for n, r in replicas.items()}
    identical = all(torch.equal(final["none"][k], s[k]) for s in final.values() for k in s)
    base = np.array(replicas["none"].seconds)
    return {
        "configs": {n: summary(r, base, traffic) for n, r in replicas.items()},
        "bit_identical": identical,
        "disabled": {n: d for n, d in disabled.items() if d},
    }


def _local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters and buffers (a DTensor's local shard)."""
    state = getattr(model, "module", model).state_dict()
    return {k: getattr(v, "to_local", lambda v=v: v)() for k, v in state.items()}


def summary(replica: Replica, base: np.ndarray, traffic: Traffic) -> dict:
    """Median step time, the paired ratio to ``none`` and its spread, traffic per step."""
    times = np.array(replica.seconds)
    ratios = times / base  # [reps], each against the plain loop of the same repetition
    measured = max(replica.measured, 1)
    sizes = traffic.bytes.get(replica.name, dict.fromkeys(Traffic.KINDS, 0))
    calls = traffic.calls.get(replica.name, dict.fromkeys(Traffic.KINDS, 0))
    return {
        "median_ms": float(np.median(times) * 1e3),
        "ratio": float(np.median(ratios)),
        "added_ms": float(np.median(times - base) * 1e3),  # paired, per step
        "ratio_p10_p90": [float(x) for x in np.percentile(ratios, [10, 90])],
        "measured_steps": replica.measured,
        "bytes_per_measured_step": {k: v / measured for k, v in sizes.items()},
        "calls_per_measured_step": {k: v / measured for k, v in calls.items()},
        "per_rep_ms": (times * 1e3).round(4).tolist(),
    }


def worker(rank: int, world: int, port: int, out: Path, settings: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    try:
        result = measure_on_rank(rank, world, settings)
        if rank == 0:
            out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, settings: dict) -> dict:
    """Spawn ``world`` processes (one torch thread each); rank 0's result."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned processes
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        mp.start_processes(
            worker, args=(world, free_port(), out, settings), nprocs=world, start_method="spawn"
        )
        result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def table(results: dict) -> str:
    """One markdown table: a row per world size and configuration."""
    lines = [
        "| world | config | ms/step | + ms/step | watched / unwatched | p10..p90 "
        "| trainprobe bytes / measured step | collectives / measured step |",
        "|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for world, result in results["worlds"].items():
        for name, row in result["configs"].items():
            low, high = row["ratio_p10_p90"]
            sizes, calls = row["bytes_per_measured_step"], row["calls_per_measured_step"]
            made = ", ".join(f"{v:.2f} {k}" for k, v in calls.items() if v) or "-"
            volume = "-" if name == "none" else f"{sum(sizes.values()):,.0f}"
            lines.append(
                f"| {world} | {name} | {row['median_ms']:.2f} | {row['added_ms']:.2f} "
                f"| {row['ratio']:.3f} "
                f"| {low:.3f}..{high:.3f} | {volume} | {made} |"
            )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--block", type=int, default=10, help="steps per block (x10)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per config")
    parser.add_argument("--batch", type=int, default=32, help="batch per process")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP, GELU MLP"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.block <= 0 or args.block % 10:
        parser.error(f"--block must be a multiple of 10 (got {args.block})")
    if args.reps is None:
        args.reps = 8 if args.quick else 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = {
        "reps": args.reps,
        "block": args.block,
        "warmup": args.warmup,
        "batch": args.batch,
        "fsdp": args.fsdp,
    }
    results = {
        "settings": settings,
        "model": f"MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES} (101,386 parameters, "
        + ("GELU, FSDP2" if args.fsdp else "ReLU, DDP")
        + "), SGD momentum",
        "platform": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "worlds": {},
    }
    for world in args.worlds:
        results["worlds"][world] = run_world(world, settings)
    print(
        f"{results['model']}; batch {args.batch} per process; gloo on 127.0.0.1, 1 thread "
        f"per process, {os.cpu_count()} CPUs; {args.reps} interleaved reps x {args.block} steps"
    )
    print(table(results))
    for world, result in results["worlds"].items():
        print(
            f"world {world}: {result['wall_s']:.0f} s, bit-identical: {result['bit_identical']}"
            + (f", disabled: {result['disabled']}" if result.get("disabled") else "")
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
