"""What the integration tests share: a tiny classifier, its data, the probes, and the plain
loop under ``watch`` that does exactly what the frameworks do (same optimizer, same data in
the same order, the loss divided by the accumulation count, the optimizer step after the
block, clipping, when asked, after the block and before the step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe import LayerNorms, Run, Sharpness, UpdateNorms, every

N, BATCH, STEPS, LR = 64, 8, 6, 0.1
SERIES = ("norms/grad_total", "norms/weight_total", "updates/ratio_total", "sharpness/lambda_max")
RTOL = 1e-6


class TinyNet(nn.Module):
    """``[B, 4] -> [B, 3]`` logits; with ``labels`` also the mean cross-entropy ``loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def make_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 4]`` inputs and ``[N]`` labels in {0, 1, 2}."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 4, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def make_probes() -> list:
    """Fresh instances (Sharpness keeps its last eigenvector between measurements)."""
    return [
        LayerNorms(schedule=every(1)),
        UpdateNorms(schedule=every(1)),
        Sharpness(schedule=every(2)),
    ]


def pair_loss(model: nn.Module, batch) -> torch.Tensor:
    """The loss of a ``(x, y)`` batch, for the plain loop and Lightning."""
    x, y = batch
    return model(x, y)["loss"]


def plain_run(
    run_dir: Path, *, steps: int = STEPS, accumulate: int = 1, clip: float | None = None
) -> Run:
    """The reference: the same training as the frameworks', under ``watch``."""
    x, y = make_data()
    model = make_net()
    opt = make_optimizer(model.parameters())
    per_epoch = N // BATCH
    micro = 0
    with trainprobe.watch(
        model, make_probes(), run_dir=run_dir, optimizer=opt, loss_fn=pair_loss
    ) as mon:
        for step in range(steps):
            batches = []
            for _ in range(accumulate):
                i = (micro % per_epoch) * BATCH
                batches.append((x[i : i + BATCH], y[i : i + BATCH]))
                micro += 1
            with mon.step(step, batch=batches[0]) as s:
                total = 0.0
                for batch in batches:
                    loss = pair_loss(model, batch) / accumulate
                    loss.backward()
                    total = total + loss.detach()
                s.log(loss=total)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return Run(run_dir)


def assert_series_agree(run: Run, reference: Run, keys=SERIES, rtol: float = RTOL) -> dict:
    """Each key's series has the same steps and values within ``rtol``; returns the largest
    relative difference per key."""
    worst = {}
    for key in keys:
        got, want = run.series(key), reference.series(key)
        np.testing.assert_array_equal(got.steps, want.steps, err_msg=key)
        np.testing.assert_allclose(got.values, want.values, rtol=rtol, atol=0, err_msg=key)
        worst[key] = float(np.max(np.abs(got.values - want.values) / np.abs(want.values)))
    return worst
