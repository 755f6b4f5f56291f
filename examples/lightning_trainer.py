"""Lightning: trainprobe's probes inside ``Trainer.fit`` with one callback.

A small MLP (a LightningModule) learns a generated two-moons-like problem with gradient
accumulation and clipping; ``TrainprobeCallback`` records the default probes plus the
sharpness once per optimizer step, the gradient as Lightning has accumulated and unscaled it,
before clipping. Needs ``pip install "trainprobe[lightning]"``; runs in seconds on a CPU.

    python examples/lightning_trainer.py [--out runs/lightning] [--steps 300]

(Not named ``lightning.py``: run as a script, that name would shadow the ``lightning``
package it imports.)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import trainprobe
from trainprobe import Sharpness, criterion_loss, default_probes, every
from trainprobe.integrations.lightning import TrainprobeCallback


def make_data(n: int, gen: torch.Generator) -> TensorDataset:
    """Two interleaved noisy half circles: ``[n, 2]`` points, ``[n]`` labels."""
    y = torch.randint(0, 2, (n,), generator=gen)
    angle = torch.rand(n, generator=gen) * math.pi
    x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    x = torch.where(y[:, None] == 1, torch.tensor([1.0, 0.5]) - x, x)
    return TensorDataset(x + 0.1 * torch.randn(n, 2, generator=gen), y)


class MoonsClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main(out: Path, steps: int = 300) -> trainprobe.Run:
    torch.manual_seed(0)
    data = make_data(2048, torch.Generator().manual_seed(0))
    probes = [*default_probes(), Sharpness(schedule=every(50))]
    callback = TrainprobeCallback(
        probes, run_dir=out, loss_fn=criterion_loss(nn.CrossEntropyLoss()), overwrite=True
    )
    trainer = L.Trainer(
        max_steps=steps,
        accumulate_grad_batches=2,  # one record per optimizer step, not per micro-batch
        gradient_clip_val=1.0,  # the probes read the gradient before this clipping
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(MoonsClassifier(), DataLoader(data, batch_size=32, shuffle=True))

    run = trainprobe.Run(out)
    loss = run.series("scalars/loss").values
    print(f"run: {out} ({run.meta['status']}); loss {loss[0]:.3f} -> {loss[-1]:.3f}")
    print(f"gradient measured: {run.meta['user']['integration']['gradient']}")
    print(f"findings and the dashboard: trainprobe report {out}")
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lightning"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    main(args.out, args.steps)
