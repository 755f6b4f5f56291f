"""Quickstart: watch your own training loop with trainprobe's default probes.

A small MLP learns a generated two-moons-like problem; the loop is ordinary
PyTorch with two extra lines (``watch`` and ``mon.step``). Afterwards the run
is analysed and the dashboard written.

    python examples/quickstart.py [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.dashboard import build, to_html


def make_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved noisy half circles, ``[n, 2]`` points and ``[n]`` labels."""
    y = torch.randint(0, 2, (n,), generator=gen)
    angle = torch.rand(n, generator=gen) * math.pi
    x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    x = torch.where(y[:, None] == 1, torch.tensor([1.0, 0.5]) - x, x)
    return x + 0.1 * torch.randn(n, 2, generator=gen), y


def main(out: Path, steps: int = 600) -> trainprobe.Run:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_all, y_all = make_data(2048, gen)
    model = nn.Sequential(
        nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    with trainprobe.watch(model, run_dir=out, optimizer=opt) as mon:
        for step in range(steps):
            idx = torch.randint(0, len(x_all), (64,), generator=gen)
            x, y = x_all[idx], y_all[idx]
            with mon.step(step, batch=(x, y)) as s:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                s.log(loss=loss, accuracy=(logits.argmax(1) == y).float().mean())
            opt.step()
            opt.zero_grad()

    run = trainprobe.Run(out)
    findings = trainprobe.analyze(run)
    for f in findings:
        print(f"{f.severity}: steps {f.start_step}-{f.end_step} {f.detector}: {f.message}")
    print(f"{len(findings)} findings; final loss {run.series('scalars/loss').values[-1]:.3f}")
    (out / "dashboard.html").write_text(to_html(build(run, findings)), encoding="utf-8")
    print(f"dashboard: {out / 'dashboard.html'}")
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    main(args.out, args.steps)
