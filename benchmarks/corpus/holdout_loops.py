"""Schedules, a soft-target loss and a multi-task loop of the holdout cases (the corpus's
own are in ``base.py``): linear decay to zero, PyTorch's one-cycle, step decay."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import GradConflict, every


def linear_to_zero(lr: float, steps: int) -> Callable[[int], float]:
    """``lr`` decayed linearly to 0 at ``steps``."""
    return lambda step: lr * (1 - step / steps)


def one_cycle(peak: float, steps: int, pct: float = 0.3) -> Callable[[int], float]:
    """PyTorch's ``OneCycleLR`` (cosine, two phases): ``peak / 25`` up to ``peak`` over the
    first ``pct`` of the steps, then down to ``peak / 25e4``."""
    low, final, rise = peak / 25, peak / 25e4, pct * steps - 1

    def at(step: int) -> float:
        if step <= rise:
            a, b, frac = low, peak, step / rise
        else:
            a, b, frac = peak, final, (step - rise) / (steps - 1 - rise)
        return b + (a - b) * (1 + math.cos(math.pi * frac)) / 2

    return at


def step_decay(lr: float, every_steps: int, factor: float) -> Callable[[int], float]:
    return lambda step: lr * factor ** (step // every_steps)


def soft_ce(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy against soft targets ``[B, C]``."""
    x, target = batch
    return -(target * F.log_softmax(model(x), dim=-1)).sum(dim=-1).mean()


def task_loop(
    run_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Callable[[int], tuple],
    task_losses: Callable[[nn.Module, tuple], dict[str, torch.Tensor]],
    *,
    steps: int,
) -> None:
    """Multi-task loop: the summed task losses, task cosines every 5 steps, each task's
    loss logged."""

    def total(net: nn.Module, batch) -> torch.Tensor:
        return sum(task_losses(net, batch).values())

    probes = [
        *trainprobe.default_probes(every_n=10),
        GradConflict(by="task", loss_fn=task_losses, schedule=every(5)),
    ]
    with trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt, loss_fn=total) as mon:
        for step in range(steps):
            batch = batches(step)
            with mon.step(step, batch=batch) as s:
                losses = task_losses(model, batch)
                loss = sum(losses.values())
                loss.backward()
                s.log(loss=loss.detach(), **{f"{k}_loss": v.detach() for k, v in losses.items()})
            opt.step()
            opt.zero_grad()
