"""Edge of stability: full-batch gradient descent sharpens until λ_max ≈ 2/η, then hovers.

Cohen et al. (2021) observed that full-batch GD on a neural network first *sharpens*
(the top Hessian eigenvalue λ_max grows) until it reaches the stability threshold
2/η of the step size η, and then hovers there while the loss keeps falling, though
no longer monotonically. A step size 10× smaller leaves λ_max far below its (10×
higher) threshold. This script trains the same tanh MLP on 500 generated 8×8 digits
(squared loss on one-hot targets, as in the paper's MSE experiments) twice, with the
:class:`trainprobe.Sharpness` probe on, and shows that the ``edge_of_stability``
detector fires on the first run and not on the control.

    python examples/edge_of_stability.py [--out runs/eos] [--steps 2000]

Writes ``<out>/eta_<η>/`` runs and a ``dashboard.html`` for each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.cli.demo import make_digits
from trainprobe.dashboard import build, to_html

STEP_SIZES = (0.2, 0.02)  # threshold 2/η = 10 (reached) and 100 (the control)


def squared_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``½ mean ||f(x) − onehot(y)||²`` over the batch."""
    x, targets = batch
    return 0.5 * (model(x) - targets).pow(2).sum(dim=1).mean()


def make_data(n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = make_digits(n, gen=torch.Generator().manual_seed(0))
    return images.reshape(n, -1), F.one_hot(labels, 10).float()  # [n, 64], [n, 10]


def train(lr: float, run_dir: Path, steps: int, every: int) -> trainprobe.Run:
    """Full-batch GD at step size ``lr``; sharpness every ``every`` steps, the top-3
    eigenvalues and the trace every ``5 every``, the spectral density log-spaced."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = make_data()
    probes = [
        trainprobe.Sharpness(schedule=trainprobe.every(every)),
        trainprobe.HessianTop(top=3, schedule=trainprobe.every(5 * every)),
        trainprobe.HessianTrace(schedule=trainprobe.every(5 * every)),
        trainprobe.HessianDensity(schedule=trainprobe.log_spaced(4)),
        trainprobe.NonFiniteGuard(),
    ]
    with trainprobe.watch(
        model, probes, run_dir=run_dir, optimizer=opt, loss_fn=squared_loss
    ) as mon:
        for step in range(steps):
            with mon.step(step, batch=batch) as s:
                loss = squared_loss(model, batch)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    return trainprobe.Run(run_dir)


def report(lr: float, run: trainprobe.Run) -> list[trainprobe.Finding]:
    findings = [f for f in trainprobe.analyze(run) if f.detector == "edge_of_stability"]
    sharp = run.series("sharpness/lambda_max")
    loss = run.series("scalars/loss")
    print(
        f"η = {lr}: threshold 2/η = {2 / lr:g}; λ_max {sharp.values[0]:.2f} at step 0, "
        f"{sharp.values[-1]:.2f} at step {sharp.steps[-1]}; loss {loss.values[0]:.3f} -> "
        f"{loss.values[-1]:.3f}"
    )
    for f in findings:
        print(f"  [{f.severity.name.lower()}] steps {f.start_step}-{f.end_step}: {f.message}")
    if not findings:
        print("  no edge-of-stability finding")
    (run.run_dir / "dashboard.html").write_text(to_html(build(run, findings)), encoding="utf-8")
    return findings


def main(out: Path, steps: int = 2000, every: int = 20) -> dict[float, list[trainprobe.Finding]]:
    results = {}
    for lr in STEP_SIZES:
        run = train(lr, out / f"eta_{lr}", steps, every)
        results[lr] = report(lr, run)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/eos"))
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    main(args.out, args.steps)
