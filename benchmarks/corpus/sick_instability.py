"""Sick runs that go unstable: gradients exploding from the very first step, a slow
geometric explosion, learning-rate spikes, divergence to NaN, a parameter blow-up
within a few steps, a slow loss divergence, and sharpness far above the threshold."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from trainprobe.probes import Sharpness, every

from . import data, models
from .base import Case, Expected, full, mse, run_loop, sampler, spike
from .healthy_edge import edge_gd

INSTABILITY = ("instability",)


def _blobs():
    return data.blobs(2048, classes=4, dim=10, spread=1.5)


def explode_at_start(run_dir: Path, *, lr: float = 0.5, steps: int = 400) -> None:
    """A LeakyReLU MLP regressing with Adam at lr 0.5 from step 0: within the first ten
    steps the weights grow 8 -> 120 and the gradient norm 0.13 -> 1e4-1e5; it stays
    1e3-1e5x its step-0 value for the whole run, so no earlier baseline exists."""
    torch.manual_seed(0)
    x, t = data.regression(2048, dim=10, out=1, noise=0.1)
    model = models.mlp(10, 1, depth=3, act=nn.LeakyReLU)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    run_loop(run_dir, model, opt, sampler((x, t), 64, 0), steps=steps, loss=mse)


def explode_geometric(run_dir: Path, *, factor: float = 1.04, steps: int = 400) -> None:
    """Full-batch GD on a linear least-squares problem at ``factor`` times the stability
    limit 2/λ_max: the error along the top eigendirection grows ``|1 - ηλ|`` per step, so
    the gradient norm climbs geometrically from step 0 (no NaN within the run)."""
    torch.manual_seed(0)
    x, t = data.regression(256, dim=8, out=1)
    lam = float(torch.linalg.eigvalsh(x.T @ x / x.shape[0]).max())  # Hessian of ½ mean r²
    model = nn.Linear(8, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=factor * 2 / lam)
    run_loop(run_dir, model, opt, full((x, t)), steps=steps, loss=mse)


def lr_spike_cnn(
    run_dir: Path, *, start: int = 600, length: int = 25, factor: float = 12.0
) -> None:
    """The demo's mishap: a BatchNorm CNN under SGD momentum 0.05 whose learning rate is
    ``factor`` times too high for ``length`` steps from ``start`` (a bad warm restart)."""
    torch.manual_seed(0)
    model = models.cnn(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_loop(
        run_dir,
        model,
        opt,
        sampler(data.digits(2048), 64, 0),
        steps=1000,
        lr_at=spike(0.05, start, length, factor),
    )


def lr_spike_transformer(
    run_dir: Path, *, start: int = 250, length: int = 15, factor: float = 30.0
) -> None:
    """A transformer under Adam 1e-3 whose learning rate jumps ``factor``x for ``length``
    steps from ``start``."""
    torch.manual_seed(0)
    model = models.Transformer(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run_loop(
        run_dir,
        model,
        opt,
        sampler(data.sequences(1024), 64, 0),
        steps=400,
        lr_at=spike(1e-3, start, length, factor),
    )


def lr_ramp_to_nan(run_dir: Path, *, steps: int = 500, growth: float = 1.03) -> None:
    """A GELU MLP regressing under SGD momentum whose learning rate grows ``growth``x per
    step from 0.01 after step 200 (a schedule bug): the loss diverges to Inf/NaN and the
    run goes on (with NaN) to the end."""
    torch.manual_seed(0)
    x, t = data.regression(2048, dim=10, out=1, noise=0.1)
    model = models.mlp(10, 1, act=nn.GELU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run_loop(
        run_dir,
        model,
        opt,
        sampler((x, t), 64, 0),
        steps=steps,
        loss=mse,
        lr_at=lambda step: 0.01 * growth ** max(0, step - 200),
    )


def bad_batch(
    run_dir: Path, *, at: int, scale: float, length: int = 1, steps: int = 600, nan: bool = False
) -> None:
    """An MLP under SGD momentum that meets ``length`` corrupted batches from step ``at``:
    inputs multiplied by ``scale`` (unnormalised data), or one input set to NaN."""
    torch.manual_seed(0)
    model = models.mlp(10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    draw = sampler(_blobs(), 64, 0)

    def batch_at(step: int):
        x, y = draw(step)
        if at <= step < at + length:
            x = x * scale
            if nan:
                x = x.clone()
                x[0, 0] = float("nan")
        return x, y

    run_loop(run_dir, model, opt, batch_at, steps=steps)


def slow_divergence(run_dir: Path, *, steps: int = 800) -> None:
    """Adam whose learning rate creeps up 1.5% per step after step 300 (no decay where
    one was meant): the loss drifts up over hundreds of steps instead of spiking."""
    torch.manual_seed(0)
    model = models.mlp(10, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run_loop(
        run_dir,
        model,
        opt,
        sampler(_blobs(), 64, 0),
        steps=steps,
        lr_at=lambda step: 1e-3 * 1.015 ** max(0, step - 300),
    )


def above_threshold(run_dir: Path, *, at: int = 600, factor: float = 4.0, steps: int = 900) -> None:
    """Full-batch GD at the edge of stability (lr 0.2) whose learning rate is raised
    ``factor``x at step ``at``: the sharpness is far above the new threshold 2/η until
    the loss blows up."""
    torch.manual_seed(0)
    x, y = data.digits(500)
    batch = (x.reshape(500, -1), torch.nn.functional.one_hot(y, 10).float())
    model = models.mlp(64, 10, hidden=64, depth=2, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    run_loop(
        run_dir,
        model,
        opt,
        full(batch),
        steps=steps,
        loss=mse,
        lr_at=lambda step: 0.2 * (factor if step >= at else 1.0),
        extra=[Sharpness(schedule=every(10))],
    )


def _sick(name, train, expect, note, also=(), info=()) -> Case:
    return Case(name, "sick", train, expect=expect, note=note, also=also, allowed_info=info)


LOSS = ("loss_spike", "loss_divergence")
CASES = (
    _sick(
        "explode_from_first_step",
        explode_at_start,
        (Expected(("exploding_gradients", "instability"), 0, 150, 10),),
        "LeakyReLU MLP regression, Adam lr 0.5 from step 0: by step 10 the gradient norm is "
        "0.13 -> 8e4 (weights 8 -> 120); it stays 1e3-1e5x its step-0 value through step "
        "~150 and 1e2-1e4x after, the loss 0.14 -> 1e4 -> 4",
        also=(*LOSS, "update_ratio", "dead_units"),
    ),
    _sick(
        "explode_geometric",
        explode_geometric,
        (Expected(("exploding_gradients", "instability"), 0, 399, 0),),
        "full-batch GD on least squares at 1.04x the stability limit: the gradient norm "
        "grows 1.08x per step from step 0 (1e13x by the end), loss likewise",
        also=(*LOSS, "edge_of_stability", "update_ratio"),
    ),
    _sick(
        "lr_spike_cnn",
        lr_spike_cnn,
        (Expected(("loss_spike", "exploding_gradients", "instability"), 600, 625, 30),),
        "BatchNorm CNN, SGD momentum, lr x12 over steps 600-624 (the demo's mishap)",
        also=(*LOSS, "update_ratio"),
        info=("update_ratio",),
    ),
    _sick(
        "lr_spike_transformer",
        lr_spike_transformer,
        (Expected(("loss_spike", "exploding_gradients", "instability"), 250, 265, 30),),
        "transformer, Adam 1e-3, lr x30 over steps 250-264",
        also=(*LOSS, "update_ratio"),
    ),
    _sick(
        "nan_lr_ramp",
        lr_ramp_to_nan,
        (Expected(("nonfinite", "instability"), 395, 499, 35),),
        "GELU MLP regression, SGD momentum, lr x1.03 per step from step 200: the loss leaves "
        "its level at ~360 and turns NaN at step 395",
        also=(*LOSS, "exploding_gradients", "update_ratio", "dead_units"),
    ),
    _sick(
        "nan_input_batch",
        partial(bad_batch, at=300, scale=1.0, nan=True),
        (Expected(("nonfinite", "instability"), 300, 300, 0),),
        "one input of the batch at step 300 is NaN: loss, gradients and parameters turn "
        "NaN there and stay NaN",
        also=(*LOSS, "exploding_gradients", "update_ratio"),
    ),
    _sick(
        "param_blowup_bad_batches",
        partial(bad_batch, at=300, scale=1e3, length=3),
        (Expected(("update_ratio", "exploding_gradients", "instability"), 300, 303, 10),),
        "three batches at steps 300-302 with inputs 1000x too large: the weights jump "
        "by orders of magnitude within 3 steps (finite throughout)",
        also=(*LOSS, "dead_units", "vanishing_gradients"),
    ),
    _sick(
        "slow_divergence",
        slow_divergence,
        (Expected(("loss_divergence", "instability"), 450, 799, 100),),
        "Adam lr creeping up 1.5%/step after step 300: the loss drifts up for hundreds of steps",
        also=("loss_spike", "exploding_gradients", "update_ratio", "dead_units"),
    ),
    _sick(
        "above_threshold_lr_raised",
        above_threshold,
        (Expected(("edge_of_stability", "instability"), 600, 700, 20),),
        "full-batch GD hovering at 2/η (lr 0.2); lr x4 at step 600 puts the sharpness ~4x "
        "above the new threshold and the loss turns NaN at step 616",
        also=(*LOSS, "exploding_gradients", "update_ratio", "nonfinite"),
        info=("edge_of_stability",),
    ),
    _sick(
        "warmup_too_high_nan",
        partial(edge_gd, lr=1.5, steps=800, warmup=300),
        (Expected(("edge_of_stability", "nonfinite", "instability"), 140, 290, 20),),
        "full-batch GD warmed up to lr 1.5: the sharpness cannot follow 2/η down, sits "
        "1.3-1.7x above it from step ~140, and the loss blows up to NaN at step 283",
        also=(*LOSS, "exploding_gradients", "update_ratio"),
    ),
)
