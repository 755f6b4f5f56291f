"""What `trainprobe scan` costs: 20 checkpoints of the demo's small CNN, default probes.

Trains the demo CNN (two conv layers with BatchNorm, 26,000 parameters) on its
generated digits for ``--steps`` steps with SGD, saving ``--checkpoints`` checkpoint dicts
(model, optimizer, step) evenly, then times:

- the whole ``trainprobe scan`` command line, in a fresh process (import included);
- inside Python: the index pass (each file opened for its step, tensors mapped, not
  read), and the scan with the default probes (weight and gradient norms, the top
  Hessian eigenvalue, local complexity, the update since the previous checkpoint), per
  checkpoint;
- a second scan of the same directory (resume: nothing new to measure);
- the scan with each default probe alone (plus the update between checkpoints, always on).

    python benchmarks/scan.py [--checkpoints 20] [--steps 400] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainprobe.cli.demo import build_model, make_digits
from trainprobe.scan import scan
from trainprobe.scan.checkpoints import find_checkpoint_files, load_checkpoint
from trainprobe.scan.probes import DEFAULT_SCAN_PROBES

BATCH = 256


def model() -> nn.Module:
    """The demo CNN, as ``--model benchmarks/scan.py:model``."""
    torch.manual_seed(0)
    return build_model()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed evaluation batch, as ``--data benchmarks/scan.py:data``."""
    return make_digits(
        int(os.environ.get("SCAN_BENCH_BATCH", BATCH)), gen=torch.Generator().manual_seed(7)
    )


def train(ckpt_dir: Path, steps: int, checkpoints: int) -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = make_digits(2048, gen=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    save_at = {round(i * (steps - 1) / (checkpoints - 1)) for i in range(checkpoints)}
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in save_at:
            torch.save(
                {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step},
                ckpt_dir / f"ckpt_step{step:05d}.pt",
            )


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args(argv)
    os.environ["SCAN_BENCH_BATCH"] = str(args.batch)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.checkpoints} checkpoints of the demo CNN "
        f"({sum(p.numel() for p in model().parameters()):,} parameters), "
        f"evaluation batch {args.batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = Path(tmp) / "ckpts"
        ckpts.mkdir()
        train(ckpts, args.steps, args.checkpoints)
        files = find_checkpoint_files(ckpts)
        index_s, _ = timed(lambda: [load_checkpoint(f, lazy=True).step for f in files])
        full_s, _ = timed(lambda: [load_checkpoint(f).step for f in files])
        print(f"{'index pass (mapped) / read whole':<40} {index_s:8.3f} s / {full_s:.3f} s")

        here = Path(__file__).resolve()
        command = [
            sys.executable,
            "-m",
            "trainprobe",
            "scan",
            str(ckpts),
            "--model",
            f"{here}:model",
            "--data",
            f"{here}:data",
            "--out",
            f"{tmp}/cli-run",
        ]
        cli_s, done = timed(subprocess.run, command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"trainprobe scan failed ({done.returncode}):\n{done.stderr}")
        print(f"{'trainprobe scan (new process)':<40} {cli_s:8.2f} s")

        scan_s, result = timed(
            scan, ckpts, model_fn=model, data_fn=data, run_dir=f"{tmp}/run", progress=False
        )
        print(
            f"{'scan() in Python':<40} {scan_s:8.2f} s "
            f"({len(result.scanned)} measured, {len(result.skipped)} skipped)"
        )
        print(f"{'  per checkpoint':<40} {1000 * scan_s / max(len(result.scanned), 1):8.0f} ms")
        again_s, again = timed(
            scan, ckpts, model_fn=model, data_fn=data, run_dir=f"{tmp}/run", progress=False
        )
        print(
            f"{'second scan (resume, nothing new)':<40} {again_s:8.2f} s "
            f"({len(again.scanned)} measured, {len(again.already)} already)"
        )
        for name in DEFAULT_SCAN_PROBES:  # where the time goes: one probe at a time
            alone_s, _ = timed(
                scan,
                ckpts,
                model_fn=model,
                data_fn=data,
                probes=[name],
                run_dir=f"{tmp}/only-{name}",
                progress=False,
            )
            print(f"{'  scan with --probes ' + name:<40} {alone_s:8.2f} s")


if __name__ == "__main__":
    main()
