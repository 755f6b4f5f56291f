"""Healthy runs with unusual loops and the probes of the sick families: hand-written
updates with no optimizer and no ``.grad``, PCGrad-projected multi-task updates,
fixed-step normalised updates, multi-task runs with mildly negative or positive task
cosines, balanced and mildly imbalanced classes under ``GradConflict(by="class")``, an
ordinary run watched for grokking, the starvation toy's control, and the shipped
quickstart. No warning or critical finding may fire."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from functools import partial
from pathlib import Path

import torch
from torch import nn

import trainprobe
from trainprobe.probes import GradConflict, GradNoise, GrokSignals, HeldOut, every

from . import data, models
from .base import Case, ce, run_loop, sampler

ROOT = Path(__file__).resolve().parents[2]


def manual_updates(run_dir: Path, *, lr: float = 0.1, steps: int = 600) -> None:
    """SGD written by hand: ``torch.autograd.grad`` and in-place updates; no optimizer is
    given to ``watch`` and no parameter ever has a ``.grad``."""
    torch.manual_seed(0)
    batches = sampler(data.blobs(2048, classes=4, dim=10, spread=1.5), 64, 0)
    model = models.mlp(10, 4)
    params = list(model.parameters())
    with (
        trainprobe.watch(model, trainprobe.default_probes(every_n=10), run_dir=run_dir) as mon,
        torch.no_grad(),
    ):
        for step in range(steps):
            batch = batches(step)
            with mon.step(step, batch=batch) as s, torch.enable_grad():
                loss = ce(model, batch)
                grads = torch.autograd.grad(loss, params)
                s.log(loss=loss)
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)


def _tasks(angle: float, n: int = 1024, seed: int = 0):
    """Inputs ``[n, 8]`` and two regression targets whose true weight vectors are
    ``angle`` radians apart (the tasks' agreement)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    u = torch.nn.functional.normalize(torch.randn(8, generator=gen), dim=0)
    v = torch.randn(8, generator=gen)
    v = torch.nn.functional.normalize(v - (v @ u) * u, dim=0)
    wa, wb = u, torch.cos(torch.tensor(angle)) * u + torch.sin(torch.tensor(angle)) * v
    return x, torch.stack([x @ wa, x @ wb], dim=1)


def _task_losses(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, t = batch
    a, b = model(x)
    return {
        "task_a": (a[:, 0] - t[:, 0]).pow(2).mean(),
        "task_b": (b[:, 0] - t[:, 1]).pow(2).mean(),
    }


def _sum_loss(model: nn.Module, batch) -> torch.Tensor:
    return sum(_task_losses(model, batch).values())


def multitask(
    run_dir: Path,
    *,
    angle: float,
    pcgrad: bool = False,
    lr: float = 0.05,
    steps: int = 600,
    sign: float = 1.0,
    head_angle: float | None = None,
    frozen_heads: bool = False,
) -> None:
    """Two regression tasks on a shared tanh trunk (``TwoHeads``), SGD momentum, task
    cosines every 5 steps. ``pcgrad``: each task's gradient is projected off the other's
    when they conflict (Yu et al. 2020) and their sum is what the optimizer steps on.
    ``sign=-1`` flips task b's target (a second task that wants the opposite)."""
    torch.manual_seed(0)
    x, t = _tasks(angle)
    t = t * torch.tensor([1.0, sign])
    batches = sampler((x, t), 64, 0)
    model = models.TwoHeads(8, head_angle=head_angle)
    if frozen_heads:
        for head in (model.head_a, model.head_b):
            head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    probes = [
        *trainprobe.default_probes(every_n=10),
        GradConflict(by="task", loss_fn=_task_losses, schedule=every(5)),
    ]
    with trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt, loss_fn=_sum_loss) as mon:
        for step in range(steps):
            batch = batches(step)
            with mon.step(step, batch=batch) as s:
                losses = _task_losses(model, batch)
                if pcgrad:
                    _pcgrad(params, list(losses.values()))
                else:
                    sum(losses.values()).backward()
                s.log(
                    loss=sum(losses.values()).detach(),
                    **{f"{k}_loss": v for k, v in losses.items()},
                )
            opt.step()
            opt.zero_grad()


def _pcgrad(params: list[nn.Parameter], losses: list[torch.Tensor]) -> None:
    """Set ``.grad`` to the PCGrad combination of the tasks' gradients."""
    flat = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(
            loss, params, retain_graph=i + 1 < len(losses), allow_unused=True
        )
        flat.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ]
            )
        )
    projected = []
    for i, g in enumerate(flat):
        g = g.clone()
        for j, other in enumerate(flat):
            dot = g @ other
            if j != i and dot < 0:
                g -= dot / other.pow(2).sum() * other
        projected.append(g)
    total, offset = sum(projected), 0
    for p in params:
        p.grad = total[offset : offset + p.numel()].reshape(p.shape).clone()
        offset += p.numel()


def normalised(run_dir: Path, *, step_size: float = 0.05, steps: int = 600) -> None:
    """Fixed-step normalised gradient descent: every update is ``step_size · g / ||g||``
    (``.grad`` rescaled after the step block, so the probes see the raw gradient)."""
    torch.manual_seed(0)
    model = models.mlp(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=step_size)
    batches = sampler(data.moons(2048), 128, 0)
    with trainprobe.watch(
        model, trainprobe.default_probes(every_n=10), run_dir=run_dir, optimizer=opt
    ) as mon:
        for step in range(steps):
            batch = batches(step)
            with mon.step(step, batch=batch) as s:
                loss = ce(model, batch)
                loss.backward()
                s.log(loss=loss)
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])
            )
            for p in model.parameters():
                p.grad.div_(norm + 1e-12)
            opt.step()
            opt.zero_grad()


def classes(
    run_dir: Path, *, weights: tuple[float, ...], lr: float = 0.1, steps: int = 500
) -> None:
    """Blob classification watched by ``GradConflict(by="class")`` on a fixed batch every
    2 steps, ``GradNoise``, and held-out accuracy with the grokking signals."""
    torch.manual_seed(0)
    x, y = data.blobs(3072, classes=len(weights), dim=10, spread=1.5, weights=weights)
    (xt, yt), (xv, yv) = data.split((x, y), 2 / 3)
    fixed = (xt[:256], yt[:256])
    model = models.mlp(10, len(weights))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    extra = [
        GradConflict(by="class", data=fixed, schedule=every(2)),
        GradNoise(schedule=every(20)),
        HeldOut(data=(xv, yv), train_data=fixed, schedule=every(25)),
        GrokSignals(data=fixed, schedule=every(25)),
    ]
    run_loop(run_dir, model, opt, sampler((xt, yt), 64, 0), steps=steps, extra=extra)


def quickstart(run_dir: Path) -> None:
    """``examples/quickstart.py`` as shipped (600 steps), its printout swallowed."""
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):
        module.main(run_dir)


NOISE = ("noise_scale",)
CASES = (
    Case(
        "manual_sgd_no_optimizer",
        "healthy",
        manual_updates,
        note="hand-written SGD: "
        "autograd.grad and p.sub_(lr g) under no_grad; no optimizer, no .grad",
    ),
    Case(
        "pcgrad_two_tasks",
        "healthy",
        partial(multitask, angle=1.4, pcgrad=True),
        note="two regression tasks 80° apart on a shared trunk; the optimizer steps on "
        "PCGrad's projected sum (Yu et al. 2020), task cosines every 5 steps",
    ),
    Case(
        "pcgrad_strong_conflict",
        "healthy",
        partial(multitask, angle=0.2, head_angle=2.5, frozen_heads=True, pcgrad=True),
        note="two tasks read through fixed heads 143° apart (task cosine about -0.8 all "
        "run), the optimizer stepping on PCGrad's projection: both losses fall 35-55x; "
        "the conflict is real and already resolved (an info finding, no advice to project)",
    ),
    Case(
        "normalised_fixed_step",
        "healthy",
        normalised,
        note="moons MLP, every update "
        "0.05 g/||g||: the update norm is constant, the loss settles where the step allows",
    ),
    Case(
        "tasks_mildly_negative",
        "healthy",
        partial(multitask, angle=1.0, head_angle=1.75, frozen_heads=True),
        note="two tasks "
        "57° apart read from the trunk by fixed heads 100° apart: task cosines -0.13..-0.2 "
        "throughout while both losses fall 500x; a mild disagreement, not a harmful conflict",
    ),
    Case(
        "tasks_aligned",
        "healthy",
        partial(multitask, angle=0.3),
        note="two tasks 17° apart: cooperative, positive task cosines",
    ),
    Case(
        "classes_balanced_probed",
        "healthy",
        partial(classes, weights=(1, 1, 1, 1)),
        allowed_info=NOISE,
        note="4 balanced blobs with per-class gradients every 2 steps, "
        "the noise scale and held-out accuracy (which follows the train fit)",
    ),
    Case(
        "classes_mild_imbalance",
        "healthy",
        partial(classes, weights=(3, 2, 2, 1)),
        allowed_info=NOISE,
        note="4 blobs at frequencies 3:2:2:1: every class's loss falls",
    ),
    Case(
        "quickstart",
        "healthy",
        quickstart,
        note="examples/quickstart.py: moons MLP, Adam 3e-3, 600 steps, converges",
    ),
)
