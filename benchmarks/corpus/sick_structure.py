"""Sick runs in the structure of the gradient and of generalisation: a minority class
whose loss rises while the batch loss falls, strong lasting conflict between two tasks,
softmax collapse that stalls grokking, a grokking run, and gradient starvation."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import (
    FeatureAttribution,
    GradConflict,
    GrokSignals,
    HeldOut,
    NTKResponse,
    every,
)

from . import data, models
from .base import Case, Expected, full, run_loop, sampler
from .healthy_loops import multitask


def minority(
    run_dir: Path,
    *,
    weights: tuple[float, ...],
    lr: float,
    steps: int = 300,
    batch: int | None = None,
    spread: float = 2.5,
) -> None:
    """Overlapping blobs at class frequencies ``weights`` (the last class a small
    minority), an MLP under SGD from a small initialisation; per-class gradients on a
    fixed batch every step for the first 100 steps, then every 5. Full-batch unless
    ``batch``."""
    torch.manual_seed(0)
    x, y = data.blobs(2048, classes=len(weights), dim=10, spread=spread, weights=weights)
    model = models.mlp(10, len(weights), hidden=32, depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    fixed = (x[:512], y[:512])
    probe = GradConflict(
        by="class",
        data=fixed,
        schedule=every(1) if steps <= 100 else (trainprobe.at_steps(*range(100)) | every(5)),
    )
    batches = full((x, y)) if batch is None else sampler((x, y), batch, 0)
    run_loop(run_dir, model, opt, batches, steps=steps, extra=[probe])


def _modular_net(p: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(2 * p, hidden), nn.ReLU(), nn.Linear(hidden, p))


def grokking(
    run_dir: Path,
    *,
    p: int = 31,
    fraction: float = 0.7,
    wd: float = 1.0,
    steps: int = 1200,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Modular addition ``(a + b) mod p`` from ``fraction`` of the pairs, one-hidden-layer
    ReLU MLP, full-batch AdamW (lr 1e-2, betas 0.9/0.98, weight decay ``wd``) in ``dtype``;
    held-out and train accuracy and the grokking signals every 10 steps."""
    (xt, yt), (xv, yv) = data.modular(p, fraction)
    xt, xv = xt.to(dtype), xv.to(dtype)
    torch.manual_seed(0)
    model = _modular_net(p).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=wd, betas=(0.9, 0.98))
    extra = [
        HeldOut(data=(xv, yv), train_data=(xt, yt), schedule=every(10)),
        GrokSignals(data=(xt, yt), schedule=every(10)),
    ]
    run_loop(run_dir, model, opt, full((xt, yt)), steps=steps, extra=extra)


def _logistic(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.softplus(-y * model(x)[:, 0]).mean()


def _pezeshki(starved: bool, n: int = 256, seed: int = 0):
    """Pezeshki et al.'s 2-D toy (examples/gradient_starvation.py): an easy feature with a
    large margin and a hard one with a small margin; the control shuffles the easy one."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.ones(n // 2), -torch.ones(n // 2)])
    easy = y * (1 + 3 * torch.rand(n, generator=gen))
    hard = y * (0.2 + 0.05 * torch.rand(n, generator=gen))
    if not starved:
        easy = easy[torch.randperm(n, generator=gen)]
    return torch.stack([easy, hard], dim=1), y


def starvation(run_dir: Path, *, starved: bool, steps: int = 600) -> None:
    """The toy under full-batch GD (2-64-1 ReLU net, logistic loss, lr 0.05) with
    ``FeatureAttribution`` over the named features and ``NTKResponse``, every 25 steps."""
    batch = _pezeshki(starved)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    extra = [
        FeatureAttribution(features={"easy": [0], "hard": [1]}, data=batch, schedule=every(25)),
        NTKResponse(data=batch, schedule=every(25)),
    ]
    run_loop(run_dir, model, opt, full(batch), steps=steps, loss=_logistic, extra=extra)


def _sick(name, train, expect, note, also=(), info=()) -> Case:
    return Case(name, "sick", train, expect=expect, note=note, also=also, allowed_info=info)


CASES = (
    _sick(
        "minority_class_rising_gd",
        partial(minority, weights=(10, 10, 10, 1), lr=0.1),
        (Expected("class_competition", 0, 45, 10),),
        "4 overlapping blobs at 10:10:10:1, full-batch GD 0.1: the minority's loss rises "
        "1.1 -> 1.8 over the first 10 steps and stays above its start until ~step 45, while "
        "the batch loss falls 1.8 -> 0.4 (Francazi et al. 2023)",
    ),
    _sick(
        "minority_class_rising_fast",
        partial(minority, weights=(10, 10, 10, 1), lr=0.5),
        (Expected("class_competition", 0, 6, 5),),
        "the same at lr 0.5: the minority's loss jumps 1.1 -> 3.2 at step 2 and is back "
        "to 1.5 by step 6, while the batch loss falls 1.8 -> 0.4",
    ),
    _sick(
        "minority_class_rising_sgd",
        partial(minority, weights=(8, 8, 8, 1), lr=0.1, batch=128),
        (Expected("class_competition", 0, 45, 10),),
        "4 overlapping blobs at 8:8:8:1, mini-batch SGD 0.1, per-class losses on a fixed "
        "batch of 512: the minority's loss rises 1.1 -> 1.8 by step 8, back under 1.1 by "
        "~step 45, while the batch loss falls 1.8 -> 0.4",
    ),
    _sick(
        "task_conflict_strong",
        partial(multitask, angle=0.2, head_angle=3.14159, frozen_heads=True),
        (Expected("gradient_conflict", 0, 599, 0),),
        "two nearly identical targets read through fixed, opposite heads: neither task can "
        "be met without undoing the other; task cosine near -1 for the whole run and both "
        "losses stuck at a compromise",
    ),
    _sick(
        "grokking_delayed",
        partial(grokking),
        (Expected("grokking", 30, 650, 100, severity="info"),),
        "modular addition p = 31, 70% of the pairs, AdamW wd 1: the train set is fit by "
        "step ~30-50, held-out accuracy reaches 0.95 at ~650",
    ),
    _sick(
        "grokking_stalled_softmax_collapse",
        partial(grokking, fraction=0.4, wd=0.0, steps=1500, dtype=torch.bfloat16),
        (Expected("grokking", 50, 1499, 100),),
        "modular addition in bfloat16 without weight decay: memorised by step ~50, softmax "
        "collapse on ~94% of the training pairs (their loss and gradient are exactly 0), "
        "held-out accuracy stays near chance",
    ),
    _sick(
        "gradient_starvation_toy",
        partial(starvation, starved=True),
        (Expected("gradient_starvation", 450, 599, 0),),
        "Pezeshki et al.'s toy: the easy feature starves the hard one, which stays unlearned",
    ),
)
