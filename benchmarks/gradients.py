"""Gradient-structure costs (CPU): per-example gradients by vmap against the loop, and the
training-step overhead of each gradient probe due every step and every 10 steps.

Part 1, per-example gradients (``trainprobe.gradients.per_sample_gradients``): the small
CNN of ``overhead.py`` and a 64-128-128-10 tanh MLP (about the same parameter count), at
batch sizes 32 and 128. Each repetition times, in a shuffled order, ``method="vmap"``,
``method="loop"`` and one plain batch gradient (forward and ``torch.autograd.grad`` of the
mean loss, model in eval mode as the per-example functions are) of every case. Reported:
median time of each, the speed-up ``loop / vmap`` and the costs ``vmap / gradient`` and
``loop / gradient``, each with a paired-bootstrap 95% interval over repetitions; and the
agreement of the two methods (largest relative difference of an example's gradient, and of
the mean of the rows against the batch gradient), float32.

Part 2, probe overhead: the small CNN trains (SGD with momentum, fixed seeded batches, the
same initial weights) once per configuration: ``none`` (no monitor), ``monitor_idle`` (a
monitor whose one probe is never due: the floor of every monitored row), then each of
``GradConflict(by="class")``, ``GradNoise()``, ``GradSpectrum()`` and ``WeightSpectrum()``
alone, due every step and every 10 steps, and ``GradSpectrum(alpha=None)`` every 10 steps
(the default ``alpha=0.98`` keeps its slow-gradient EMA up to date every step even when it
records every 10th). ``watch(..., loss_fn=criterion_loss(nn.CrossEntropyLoss()))`` and
``mon.step(step, batch=(x, y))``. Interleaved repetitions as in ``overhead.py``; the
table gives the median ms/step, the ratio to ``none`` with its 95% interval, and the
implied cost of one measurement ``(t - t_none) * n`` for a probe due every ``n`` steps.
The script checks that every configuration ends with bit-identical weights.

Usage::

    python benchmarks/gradients.py            # about 3 minutes on 2 cores
    python benchmarks/gradients.py --quick    # about 35 s
    python benchmarks/gradients.py --json out.json --threads 4 --reps 30
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import random
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
from trainprobe import GradConflict, GradNoise, GradSpectrum, WeightSpectrum
from trainprobe.curvature import criterion_loss
from trainprobe.functional import Objective
from trainprobe.gradients import per_sample_gradients
from trainprobe.probes import at_steps, every

sys.path.insert(0, str(Path(__file__).parent))
from overhead import Trainer, bootstrap_ratio, make_batches, small_cnn

LOSS = criterion_loss(nn.CrossEntropyLoss())

#: Configuration name -> (probes or None for no monitor, steps between measurements).
PROBE_CONFIGS: dict[str, tuple[Callable[[], list] | None, int]] = {
    "none": (None, 0),
    "monitor_idle": (lambda: [WeightSpectrum(schedule=at_steps(10**12))], 0),
    "conflict_1": (lambda: [GradConflict(by="class", schedule=every(1))], 1),
    "conflict_10": (lambda: [GradConflict(by="class", schedule=every(10))], 10),
    "noise_1": (lambda: [GradNoise(schedule=every(1))], 1),
    "noise_10": (lambda: [GradNoise(schedule=every(10))], 10),
    "grad_spectrum_1": (lambda: [GradSpectrum(schedule=every(1))], 1),
    "grad_spectrum_10": (lambda: [GradSpectrum(schedule=every(10))], 10),
    "grad_spectrum_no_ema_10": (lambda: [GradSpectrum(alpha=None, schedule=every(10))], 10),
    "weight_spectrum_1": (lambda: [WeightSpectrum(schedule=every(1))], 1),
    "weight_spectrum_10": (lambda: [WeightSpectrum(schedule=every(10))], 10),
}


def mlp() -> nn.Module:
    """64-128-128-10 tanh: [B, 64] -> [B, 10] (26,122 parameters)."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    )


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- part 1: per-example


def persample_cases(sizes: list[int]) -> list[dict]:
    """``{name, model, batch}`` for every model and batch size (seeded weights and data)."""
    torch.manual_seed(0)
    models = {"cnn": small_cnn(), "mlp": mlp()}
    models["cnn"].eval()  # the per-example gradients run with running statistics
    gen = torch.Generator().manual_seed(1)
    cases = []
    for name, model in models.items():
        shape = (3, 32, 32) if name == "cnn" else (64,)
        for size in sizes:
            x = torch.randn(size, *shape, generator=gen)
            y = torch.randint(0, 10, (size,), generator=gen)
            cases.append(
                {
                    "name": f"{name}_b{size}",
                    "model": model,
                    "batch": (x, y),
                    "params": param_count(model),
                }
            )
    return cases


def batch_gradient(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, ...]:
    """One plain gradient of the mean loss: forward and ``torch.autograd.grad``."""
    x, y = batch
    return torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))


def agreement(case: dict) -> dict[str, float]:
    """Largest relative row difference vmap/loop, and the rows' mean against the gradient."""
    model, batch = case["model"], case["batch"]
    vm = per_sample_gradients(Objective(model, LOSS), batch, method="vmap")
    lp = per_sample_gradients(Objective(model, LOSS), batch, method="loop")
    row_diff = (vm.grads - lp.grads).norm(dim=1) / lp.grads.norm(dim=1)  # [B]
    plain = torch.cat([g.reshape(-1) for g in batch_gradient(model, batch)])  # [P]
    mean_diff = (vm.grads.mean(dim=0) - plain).norm() / plain.norm()
    return {
        "vmap_vs_loop_max_rel": float(row_diff.max()),
        "vmap_mean_vs_batch_grad_rel": float(mean_diff),
        "loss_max_abs_diff": float((vm.losses - lp.losses).abs().max()),
        "vmap_chunk": vm.chunk_size,
    }


def persample_tasks(case: dict) -> dict[str, Callable[[], object]]:
    model, batch = case["model"], case["batch"]
    return {
        "grad": lambda: batch_gradient(model, batch),
        "vmap": lambda: per_sample_gradients(Objective(model, LOSS), batch, method="vmap"),
        "loop": lambda: per_sample_gradients(Objective(model, LOSS), batch, method="loop"),
    }


def untrack_setup() -> None:
    """Move every object alive now out of the collector's reach (``gc.freeze``), so the
    ``gc.collect()`` before each timed block takes microseconds, not ~70 ms (torch alone
    leaves ~175,000 tracked objects), and only scans what the timed code left behind."""
    gc.collect()
    gc.freeze()


def calls_for(fn: Callable[[], object], floor: float) -> int:
    """Calls per timing so that one timing lasts at least ``floor`` seconds (after warm-up)."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, math.ceil(floor / max(once, 1e-6)))


def measure_persample(args: argparse.Namespace) -> dict:
    cases = persample_cases(args.batch_sizes)
    tasks = {(c["name"], m): fn for c in cases for m, fn in persample_tasks(c).items()}
    calls = {key: calls_for(fn, args.min_time) for key, fn in tasks.items()}
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in tasks}
    untrack_setup()
    order, shuffler = list(tasks), random.Random(0)
    for _ in range(args.persample_reps):
        shuffler.shuffle(order)
        for key in order:
            gc.collect()
            start = time.perf_counter()
            for _ in range(calls[key]):
                tasks[key]()
            seconds[key].append((time.perf_counter() - start) / calls[key])
    rows = []
    for case in cases:
        t = {m: np.array(seconds[(case["name"], m)]) for m in ("grad", "vmap", "loop")}
        row = {
            "case": case["name"],
            "params": case["params"],
            "batch_size": case["batch"][0].shape[0],
        }
        for m, times in t.items():
            row[f"{m}_ms"] = float(np.median(times) * 1e3)
            row[f"{m}_per_rep_ms"] = (times * 1e3).round(4).tolist()
            row[f"{m}_calls_per_timing"] = calls[(case["name"], m)]
        for name, num, den in (
            ("loop_over_vmap", "loop", "vmap"),
            ("vmap_over_grad", "vmap", "grad"),
            ("loop_over_grad", "loop", "grad"),
        ):
            row[name] = float(np.median(t[num]) / np.median(t[den]))
            row[f"{name}_ci95"] = list(bootstrap_ratio(t[num], t[den]))
        row.update(agreement(case))
        rows.append(row)
    return {"rows": rows}


# ---------------------------------------------------------------- part 2: probe overhead


def make_probe_trainers(
    stack: contextlib.ExitStack, root: Path, init: dict, flush_seconds: float
) -> dict[str, Trainer]:
    trainers = {}
    for name, (probes, _) in PROBE_CONFIGS.items():
        model = small_cnn()
        model.load_state_dict(init)  # the same initial weights in every configuration
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        mon = None
        if probes is not None:
            mon = stack.enter_context(
                trainprobe.watch(
                    model,
                    probes(),
                    run_dir=root / name,
                    optimizer=opt,
                    loss_fn=LOSS,
                    flush_seconds=flush_seconds,
                    on_probe_error="raise",
                )
            )
        trainers[name] = Trainer(name, model, opt, mon)
    return trainers


def probe_row(name: str, period: int, times: np.ndarray, base: np.ndarray) -> dict:
    """Median step time of one configuration, its ratio to ``none`` and the cost of one
    measurement ``(t - t_none) * n`` (interval: the ratio's, times ``t_none * n``)."""
    ratio = float(np.median(times) / np.median(base))
    low, high = bootstrap_ratio(times, base)
    scale = float(np.median(base)) * period * 1e3  # ms
    return {
        "config": name,
        "every": period or None,
        "median_ms": float(np.median(times) * 1e3),
        "min_ms": float(times.min() * 1e3),
        "max_ms": float(times.max() * 1e3),
        "ratio": ratio,
        "ratio_ci95": [low, high],
        "ms_per_measurement": (ratio - 1) * scale if period else None,
        "ms_per_measurement_ci95": [(low - 1) * scale, (high - 1) * scale] if period else None,
        "per_rep_ms": (times * 1e3).round(4).tolist(),
    }


def measure_probes(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    init = small_cnn().state_dict()
    batches = make_batches(args.batches, args.batch_size)
    order, shuffler = list(PROBE_CONFIGS), random.Random(1)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainers = make_probe_trainers(stack, Path(tmp), init, args.flush_seconds)
        for trainer in trainers.values():  # warm-up, not timed
            trainer.run(batches, args.warmup)
        untrack_setup()
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
    base = np.array(trainers["none"].seconds)
    rows = [
        probe_row(name, period, np.array(trainers[name].seconds), base)
        for name, (_, period) in PROBE_CONFIGS.items()
    ]
    return {
        "rows": rows,
        "bit_identical_training": identical,
        "params": param_count(trainers["none"].model),
    }


# ---------------------------------------------------------------- report


def print_report(result: dict) -> None:
    s = result["settings"]
    print(
        f"per-example gradients, CPU, {s['threads']} threads; {s['persample_reps']} "
        f"interleaved reps (each timing >= {s['min_time'] * 1e3:.0f} ms); float32"
    )
    print(
        f"{'case':<9} {'P':>6} {'grad ms':>8} {'vmap ms':>8} {'loop ms':>8} "
        f"{'loop/vmap':>9} {'95% CI':>13} {'vmap/grad':>9} {'95% CI':>13} "
        f"{'loop/grad':>9} {'max rel diff':>12}"
    )
    for r in result["persample"]["rows"]:
        lv, vg = r["loop_over_vmap_ci95"], r["vmap_over_grad_ci95"]
        print(
            f"{r['case']:<9} {r['params']:>6} {r['grad_ms']:>8.2f} {r['vmap_ms']:>8.2f} "
            f"{r['loop_ms']:>8.1f} {r['loop_over_vmap']:>9.2f} "
            f"{f'{lv[0]:.2f}..{lv[1]:.2f}':>13} {r['vmap_over_grad']:>9.2f} "
            f"{f'{vg[0]:.2f}..{vg[1]:.2f}':>13} {r['loop_over_grad']:>9.1f} "
            f"{r['vmap_vs_loop_max_rel']:>12.1e}"
        )
    worst = max(r["vmap_mean_vs_batch_grad_rel"] for r in result["persample"]["rows"])
    print(
        f"(max rel diff: largest ||g_vmap,i - g_loop,i|| / ||g_loop,i|| over examples; "
        f"mean of the rows against the batch gradient: <= {worst:.1e})"
    )
    print()
    p = result["probes"]
    print(
        f"probe overhead: small CNN ({p['params']:,} parameters), batch {s['batch_size']}, "
        f"SGD; {s['reps']} interleaved reps x {s['steps']} steps, {s['warmup']} warm-up "
        "steps each"
    )
    print(
        f"{'config':<24} {'median ms/step':>15} {'min..max ms':>15} {'ratio':>7} "
        f"{'95% CI':>13} {'ms/measure':>10} {'95% CI':>12}"
    )
    for r in p["rows"]:
        low, high = r["ratio_ci95"]
        extra, band = "-", "-"
        if r["ms_per_measurement"] is not None:
            extra = f"{r['ms_per_measurement']:.1f}"
            band = "{:.1f}..{:.1f}".format(*r["ms_per_measurement_ci95"])
        print(
            f"{r['config']:<24} {r['median_ms']:>15.3f} "
            f"{r['min_ms']:>7.2f}..{r['max_ms']:<7.2f} {r['ratio']:>7.3f} "
            f"{f'{low:.3f}..{high:.3f}':>13} {extra:>10} {band:>12}"
        )
    print(f"training bit-identical across configurations: {p['bit_identical_training']}")
    base = np.array(p["rows"][0]["per_rep_ms"])
    p10, p90 = np.percentile(base, [10, 90])
    if p90 > 1.25 * p10:
        print(
            f"warning: plain-loop step times spread {p10:.2f}..{p90:.2f} ms (10th..90th "
            "percentile); the machine was busy, rerun on an idle one"
        )
    print(f"total {result['seconds']:.0f} s")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CI has 2 cores)")
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="interleaved repetitions of the probe overhead (default 40; 5 with --quick)",
    )
    parser.add_argument(
        "--persample-reps",
        type=int,
        default=None,
        help="interleaved repetitions of part 1 (default 15; 3 with --quick)",
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="training steps per repetition, a multiple of 10"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per config")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (part 2)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32, 128], help="batch sizes of part 1"
    )
    parser.add_argument("--batches", type=int, default=8, help="distinct training batches")
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.02,
        help="seconds: repeat a fast part-1 call until one timing lasts this",
    )
    parser.add_argument("--flush-seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="about 35 s instead of 3 min")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.steps % 10:
        parser.error(
            f"--steps must be a multiple of 10 (got {args.steps}) so every block "
            "holds the same number of every-10 measurements"
        )
    if args.reps is None:
        args.reps = 5 if args.quick else 40
    if args.persample_reps is None:
        args.persample_reps = 3 if args.quick else 15
    if args.quick:
        args.warmup = min(args.warmup, 10)
        args.batch_sizes = args.batch_sizes[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {"persample": measure_persample(args), "probes": measure_probes(args)}
    result["seconds"] = time.perf_counter() - start
    result["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    result["platform"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
