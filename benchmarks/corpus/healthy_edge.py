"""Healthy runs at the numerical and dynamical edges: losses driven to the float32 floor,
full-batch gradient descent at the edge of stability (sharpening to 2/η, catapults it
recovers from), Adam at its adaptive edge (38/η), and warmup to a high learning rate at
which the loss oscillates but training is stable. Only true info findings may fire
(``edge_of_stability`` at the edge: nothing to fix; ``update_ratio`` on a run whose
converged layers no longer move)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from trainprobe.probes import GradConflict, Sharpness, every

from . import data, models
from .base import Case, full, mse, run_loop, sampler, warmup_decay


def _digit_regression(n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.digits(n)
    return x.reshape(n, -1), F.one_hot(y, 10).float()


def _tanh_net() -> nn.Module:
    return models.mlp(64, 10, hidden=64, depth=2, act=nn.Tanh)


def edge_gd(run_dir: Path, *, lr: float, steps: int, warmup: int = 0) -> None:
    """Full-batch GD on the squared loss (Cohen et al. 2021's setting, as in
    examples/edge_of_stability.py), sharpness every 20 steps; optionally a linear warmup
    of ``warmup`` steps to ``lr``, held there."""
    torch.manual_seed(0)
    model = _tanh_net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    run_loop(
        run_dir,
        model,
        opt,
        full(_digit_regression()),
        steps=steps,
        loss=mse,
        lr_at=(lambda step: lr * min(1.0, (step + 1) / warmup)) if warmup else None,
        extra=[Sharpness(schedule=every(20))],
    )


def edge_adam(run_dir: Path, *, lr: float, steps: int) -> None:
    """Full-batch Adam on the same problem: the preconditioned sharpness rises to
    38/η and hovers there (Cohen et al. 2022)."""
    torch.manual_seed(0)
    model = _tanh_net()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    run_loop(
        run_dir,
        model,
        opt,
        full(_digit_regression()),
        steps=steps,
        loss=mse,
        extra=[Sharpness(schedule=every(20))],
    )


def floor_ce(run_dir: Path, *, classes: int, spread: float, lr: float, steps: int = 800) -> None:
    """Separable blobs under Adam until the float32 cross-entropy is exactly 0 for most
    batches (and for every class on a fixed batch), gradients 1e-7 down to 1e-20."""
    torch.manual_seed(0)
    x, y = data.blobs(512, classes=classes, dim=10, spread=spread)
    model = models.mlp(10, classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    run_loop(
        run_dir,
        model,
        opt,
        sampler((x, y), 64, 0),
        steps=steps,
        extra=[GradConflict(by="class", data=(x[:96], y[:96]), schedule=every(10))],
    )


def floor_mse(run_dir: Path) -> None:
    """A realisable linear regression under mini-batch SGD: the loss falls to ~1e-14."""
    torch.manual_seed(0)
    x, t = data.regression(256, dim=8, out=2)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    run_loop(run_dir, model, opt, sampler((x, t), 64, 0), steps=800, loss=mse)


def warmup_high_lr(run_dir: Path, *, lr: float, steps: int = 800) -> None:
    """Warmup to a high learning rate on a mini-batch MLP (SGD momentum), where the loss
    oscillates from step to step but keeps falling; batch sharpness every 10 steps."""
    torch.manual_seed(0)
    x, y = data.blobs(2048, classes=4, dim=10, spread=1.5)
    model = models.mlp(10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    run_loop(
        run_dir,
        model,
        opt,
        sampler((x, y), 128, 0),
        steps=steps,
        lr_at=warmup_decay(lr, steps // 4, steps),
        extra=[Sharpness(schedule=every(10))],
    )


EOS = ("edge_of_stability",)
CASES = (
    Case(
        "eos_gd_sharpening",
        "healthy",
        partial(edge_gd, lr=0.2, steps=1500),
        allowed_info=EOS,
        note="full-batch GD (lr 0.2, threshold 10): sharpens from 0.4x to the threshold by "
        "step ~380 and hovers at ~1.07x; the loss keeps falling, non-monotonically",
    ),
    Case(
        "eos_gd_catapults",
        "healthy",
        partial(edge_gd, lr=0.7, steps=1000),
        allowed_info=EOS,
        note="full-batch GD at lr 0.7: starts at 1.5x the threshold, catapults (short loss "
        "spikes it recovers from) and hovers at 1.1-1.4x while the loss falls 0.53 -> 0.11",
    ),
    Case(
        "adam_edge_full_batch",
        "healthy",
        partial(edge_adam, lr=2e-3, steps=1500),
        allowed_info=EOS,
        note="full-batch Adam 2e-3: preconditioned sharpness rises to "
        "38/η and hovers at 1.0x; the loss falls 0.53 -> 1e-4",
    ),
    Case(
        "floor_ce_quantised",
        "healthy",
        partial(floor_ce, classes=4, spread=1.0, lr=0.02),
        allowed_info=("update_ratio",),
        note="4 separable blobs, Adam 0.02: the batch loss is "
        "exactly 0 at most steps and otherwise 1-2 float32 ulps (3.7e-9, 7.5e-9); per-class "
        "losses on a fixed batch exactly 0; gradient norms 1e-16..1e-7",
    ),
    Case(
        "floor_ce_underflow",
        "healthy",
        partial(floor_ce, classes=3, spread=0.5, lr=0.05),
        allowed_info=("update_ratio",),
        note="3 far-apart blobs, Adam 0.05: loss exactly 0 from "
        "step ~30, gradient norms wander between 0 and 1e-14 (1e-20 typical)",
    ),
    Case(
        "floor_mse_linear",
        "healthy",
        floor_mse,
        allowed_info=("update_ratio",),
        note="realisable linear regression, mini-batch SGD 0.3: loss at the float32 floor",
    ),
    Case(
        "warmup_gd_oscillating",
        "healthy",
        partial(edge_gd, lr=1.0, steps=1200, warmup=300),
        allowed_info=EOS,
        note="full-batch GD warmed up over 300 steps to lr 1.0 (5x the "
        "initial threshold 2/λ0): the sharpness follows 2/η down, hovering at 1.2-1.5x it; "
        "the loss oscillates with a catapult during warmup, and falls 0.53 -> 0.10",
    ),
    Case(
        "warmup_sgd_high_lr",
        "healthy",
        partial(warmup_high_lr, lr=0.5),
        allowed_info=EOS,
        note="mini-batch MLP, SGD momentum 0.9 warmed up to lr 0.5 then decayed: a noisy "
        "loss, 1.5 -> 1e-4, batch sharpness measured every 10 steps",
    ),
)
