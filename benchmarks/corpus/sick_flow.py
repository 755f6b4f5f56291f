"""Sick runs whose gradients do not flow: ReLUs that die (after one bad step, or from a
bad bias initialisation), gradients vanishing through depth (a deep sigmoid net) and
through time (a recurrent net whose early hidden states get 1e-10 of the late ones'
gradient while its parameter gradients look normal), and a first layer fed unnormalised
inputs."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

import trainprobe

from . import data, models
from .base import Case, Expected, ce, run_loop, sampler

DEAD = ("dead_units", "vanishing_gradients")


def _blobs():
    return data.blobs(2048, classes=4, dim=10, spread=1.5)


def killed_relus(
    run_dir: Path, *, at: int = 200, length: int = 3, kick: float = 100.0, steps: int = 600
) -> None:
    """An MLP under SGD momentum whose learning rate is ``kick``x too high for ``length``
    steps from ``at`` (a schedule bug): the ReLUs of a layer die there and the loss sits
    at ln 4 from then on."""
    torch.manual_seed(0)
    model = models.mlp(10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_loop(
        run_dir,
        model,
        opt,
        sampler(_blobs(), 64, 0),
        steps=steps,
        lr_at=lambda step: 0.05 * (kick if at <= step < at + length else 1.0),
    )


def dead_at_init(run_dir: Path, *, bias: float = -5.0, steps: int = 500) -> None:
    """An MLP whose first layer's biases start at ``bias`` (a bad initialisation): almost
    every first-layer ReLU is dead from step 0 and stays dead under Adam."""
    torch.manual_seed(0)
    model = models.mlp(10, 4)
    nn.init.constant_(model[0].bias, bias)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run_loop(run_dir, model, opt, sampler(_blobs(), 64, 0), steps=steps)


def deep_sigmoid(run_dir: Path, *, depth: int = 12, steps: int = 500) -> None:
    """A 12-layer sigmoid MLP under SGD (Glorot & Bengio 2010): the first layer's
    gradient is orders of magnitude below the last's throughout."""
    torch.manual_seed(0)
    model = models.mlp(10, 4, hidden=32, depth=depth, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_loop(run_dir, model, opt, sampler(_blobs(), 64, 0), steps=steps)


def rnn_through_time(
    run_dir: Path, *, gain: float = 0.45, length: int = 30, steps: int = 500, lr: float = 0.05
) -> None:
    """A tanh RNN (recurrent spectral radius ``gain``) over 30 steps whose binary label
    needs the first input as much as the last: ``∂L/∂h_0`` is ~1e-10 of ``∂L/∂h_T``, so
    the first input is never learned, while every parameter's gradient looks normal
    (the late steps feed it). Each step logs ``h0_grad_ratio`` (the measured ratio)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, length, 4, generator=gen)
    y = (x[:, 0, 0] + x[:, -1, 0] > 0).long()
    model = models.UnrolledRNN(4, 2, gain=gain)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = sampler((x, y), 64, 0)
    model.keep = True
    with trainprobe.watch(
        model,
        [
            *trainprobe.default_probes(every_n=10),
            trainprobe.GradientFlow(schedule=trainprobe.every(10)),
        ],
        run_dir=run_dir,
        optimizer=opt,
        loss_fn=ce,
    ) as mon:
        for step in range(steps):
            batch = batches(step)
            with mon.step(step, batch=batch) as s:
                loss = ce(model, batch)
                loss.backward()
                first, last = (model.states[i].grad.norm() for i in (0, -1))
                s.log(loss=loss, h0_grad_ratio=first / last)
            opt.step()
            opt.zero_grad()


def shrinking_tanh(run_dir: Path, *, depth: int = 16, gain: float = 0.4, steps: int = 500) -> None:
    """A 16-layer tanh MLP whose weights start at ``gain`` times PyTorch's default: each
    layer shrinks signal and gradient alike, so the first layer gets ~1e-9 of the last
    layer's gradient and the loss never leaves ln 4."""
    torch.manual_seed(0)
    model = models.mlp(10, 4, hidden=32, depth=depth, act=nn.Tanh)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.mul_(gain)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_loop(run_dir, model, opt, sampler(_blobs(), 64, 0), steps=steps)


def _sick(name, train, expect, note, also=(), info=()) -> Case:
    return Case(name, "sick", train, expect=expect, note=note, also=also, allowed_info=info)


CASES = (
    _sick(
        "dead_relus_one_bad_step",
        killed_relus,
        (Expected(DEAD, 200, 599, 60),),
        "MLP, SGD momentum 0.05; steps 200-202 run at lr 5 (a schedule bug): the second "
        "ReLU layer dies (100% zero) and the loss stays at ln 4 to the end",
        also=("loss_spike", "loss_divergence", "instability", "exploding_gradients"),
    ),
    _sick(
        "dead_relus_at_init",
        dead_at_init,
        (Expected(DEAD, 0, 499, 60),),
        "MLP whose first-layer biases start at -4: most first-layer ReLUs are dead from "
        "step 0 and stay dead",
    ),
    _sick(
        "vanishing_deep_sigmoid",
        deep_sigmoid,
        (Expected("vanishing_gradients", 0, 499, 0),),
        "12-layer sigmoid MLP, SGD 0.1: the first layer's gradient is ~4e-10 of the last's "
        "and the loss stays at ln 4",
        info=("update_ratio",),
    ),
    _sick(
        "vanishing_through_time",
        partial(rnn_through_time),
        (Expected("vanishing_gradients", 0, 499, 0),),
        "tanh RNN, recurrent radius 0.45, 30 steps; the label needs the first input: "
        "||dL/dh_0|| / ||dL/dh_T|| ~ 1e-10 (logged as h0_grad_ratio), parameter gradients "
        "normal, the first input never learned",
    ),
    _sick(
        "vanishing_deep_tanh",
        shrinking_tanh,
        (Expected("vanishing_gradients", 0, 499, 0),),
        "16-layer tanh MLP initialised at 0.4x the default scale: the gradient shrinks "
        "layer by layer (first/last ~2e-9) and the loss stays at ln 4",
        info=("update_ratio",),
    ),
)
