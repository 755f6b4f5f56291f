"""Gradient starvation: an easy feature starves a second feature that also predicts the label.

Pezeshki et al. (2021) show that cross-entropy training, once the examples are fit by
the easiest feature, stops pushing on the others: a second predictive feature stays
unlearned, its gradient starved. Their 2-D toy, trained here with a 2-64-1 ReLU network
and full-batch gradient descent on the logistic loss:

- ``starved``: ``x = (easy, hard)`` with ``easy = y·U(1, 4)`` (a large margin) and
  ``hard = y·U(0.2, 0.25)`` (a small one); both separate the ``±1`` labels. The network
  fits with the easy feature alone: shuffling that column leaves chance accuracy.
- ``control``: the same, with the easy column shuffled across examples (same values,
  no label information): the hard feature is the only route, and it is learned.

``FeatureAttribution`` (each feature's share of the input-gradient attribution) and
``NTKResponse`` (the output's response along the label-carrying eigendirections of
the initial neural tangent kernel, Pezeshki et al.'s Figure 2) separate the two; the
``gradient_starvation`` detector fires on the first and not on the control. The loss
does not tell them apart (it is lower on the starved run).

    python examples/gradient_starvation.py [--out runs/starvation] [--steps 600]

Writes ``<out>/starved`` and ``<out>/control`` runs, each with a ``dashboard.html``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.dashboard import build, to_html
from trainprobe.probes import FeatureAttribution, NTKResponse, every

Batch = tuple[torch.Tensor, torch.Tensor]


def logistic(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``mean log(1 + exp(−y f(x)))`` for ``±1`` labels."""
    x, y = batch
    return F.softplus(-y * model(x)[:, 0]).mean()


def toy(*, starved: bool, n: int = 256, seed: int = 0) -> Batch:
    """``[n, 2]`` inputs (easy, hard) and ``±1`` labels; the control shuffles ``easy``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.ones(n // 2), -torch.ones(n // 2)])
    easy = y * (1 + 3 * torch.rand(n, generator=gen))
    hard = y * (0.2 + 0.05 * torch.rand(n, generator=gen))
    if not starved:
        easy = easy[torch.randperm(n, generator=gen)]
    return torch.stack([easy, hard], dim=1), y


def train(name: str, data: Batch, run_dir: Path, steps: int) -> trainprobe.Run:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probes = [
        FeatureAttribution(features={"easy": [0], "hard": [1]}, data=data, schedule=every(25)),
        NTKResponse(data=data, schedule=every(25)),
    ]
    with trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt, loss_fn=logistic) as mon:
        for step in range(steps):
            with mon.step(step, batch=data) as s:
                loss = logistic(model, data)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    x, y = data
    without_easy = x.clone()  # the easy column shuffled: its values kept, its information gone
    without_easy[:, 0] = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1)), 0]
    with torch.no_grad():
        accuracy = float(((model(without_easy)[:, 0] * y) > 0).float().mean())
    print(f"{name}: accuracy with the easy feature shuffled {accuracy:.2f}")
    return trainprobe.Run(run_dir)


def report(name: str, run: trainprobe.Run) -> list[trainprobe.Finding]:
    findings = trainprobe.analyze(run)
    share = run.series("attribution/share/hard").values[-1]
    ratio = run.series("ntk_response/min_ratio").values[-1]
    loss = run.series("scalars/loss").values[-1]
    print(
        f"  hard feature's attribution share {share:.3f}, NTK response min ratio "
        f"{ratio:.3f}, loss {loss:.4f}"
    )
    for f in findings:
        print(f"  [{f.severity}] {f.detector}, steps {f.start_step}-{f.end_step}: {f.message}")
    if not findings:
        print("  no findings")
    (run.run_dir / "dashboard.html").write_text(to_html(build(run, findings)), encoding="utf-8")
    return findings


def main(out: Path, steps: int = 600) -> dict[str, list[trainprobe.Finding]]:
    results = {}
    for name, starved in (("starved", True), ("control", False)):
        run = train(name, toy(starved=starved), out / name, steps)
        results[name] = report(name, run)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/starvation"))
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    main(args.out, args.steps)
