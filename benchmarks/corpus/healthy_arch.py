"""Healthy runs across architectures, optimizers and schedules: MLP, BatchNorm CNN,
GRU, LSTM, transformer, residual nets; SGD, momentum, Nesterov, Adam, AdamW; constant,
warmup-then-decay, cosine, step and restart schedules; clipping and weight decay.
None of them may get a warning or a critical finding."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from . import data, models
from .base import Case, constant, cosine, run_loop, sampler, warmup_decay

STEPS = 600


def _data(name: str):
    if name == "blobs":
        return data.blobs(2048, classes=4, dim=10, spread=1.5)
    if name == "moons":
        return data.moons(2048)
    if name == "digits":
        return data.digits(2048)
    if name == "sequences":
        return data.sequences(1024)
    raise KeyError(name)


def _model(name: str) -> nn.Module:
    builders = {
        "mlp": lambda: models.mlp(10, 4),
        "mlp_moons": lambda: models.mlp(2, 2, hidden=64),
        "deep_mlp": lambda: models.mlp(10, 4, hidden=48, depth=6, act=nn.GELU),
        "residual": lambda: models.ResidualMLP(10, 4),
        "rezero": lambda: models.ResidualMLP(10, 4, rezero=True),
        "cnn": lambda: models.cnn(10),
        "gru": lambda: models.Recurrent("gru", 4, 3),
        "lstm": lambda: models.Recurrent("lstm", 4, 3),
        "transformer": lambda: models.Transformer(4, 3),
    }
    return builders[name]()


def _optimizer(name: str, params, lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise KeyError(name)


def _schedule(name: str, lr: float, steps: int):
    if name == "constant":
        return constant(lr)
    if name == "warmup_decay":
        return warmup_decay(lr, steps // 10, steps)
    if name == "cosine":
        return cosine(lr, steps)
    if name == "warmup_cosine":
        return cosine(lr, steps, warmup=steps // 10)
    if name == "step":
        return lambda step: lr * (0.1 if step >= steps // 2 else 1.0)
    if name == "restarts":
        period = steps // 3
        return lambda step: cosine(lr, period)(step % period)
    raise KeyError(name)


def classify(
    run_dir: Path,
    *,
    dataset: str,
    model: str,
    opt: str,
    lr: float,
    schedule: str = "constant",
    wd: float = 0.0,
    clip: float | None = None,
    steps: int = STEPS,
    batch: int = 64,
    seed: int = 0,
) -> None:
    """Mini-batch classification with the named data, model, optimizer and schedule."""
    torch.manual_seed(seed)
    train = _data(dataset)
    net = _model(model)
    optimizer = _optimizer(opt, net.parameters(), lr, wd)
    run_loop(
        run_dir,
        net,
        optimizer,
        sampler(train, batch, seed),
        steps=steps,
        lr_at=_schedule(schedule, lr, steps),
        clip=clip,
    )


def _case(name: str, note: str, **options) -> Case:
    # a conv bias before BatchNorm gets no gradient (the normalisation cancels it): the
    # "barely moves" info on it is true
    info = ("update_ratio",) if options["model"] == "cnn" else ()
    return Case(name, "healthy", partial(classify, **options), allowed_info=info, note=note)


CASES = (
    _case(
        "mlp_sgd_constant",
        "MLP, plain SGD at a constant 0.05",
        dataset="blobs",
        model="mlp",
        opt="sgd",
        lr=0.05,
    ),
    _case(
        "mlp_momentum_warmup_decay",
        "MLP, SGD momentum 0.9, warmup then linear decay",
        dataset="blobs",
        model="mlp",
        opt="momentum",
        lr=0.05,
        schedule="warmup_decay",
    ),
    _case(
        "mlp_nesterov_step",
        "MLP, Nesterov momentum, lr ×0.1 at half-time",
        dataset="moons",
        model="mlp_moons",
        opt="nesterov",
        lr=0.05,
        schedule="step",
    ),
    _case(
        "mlp_adam_cosine",
        "MLP, Adam 3e-3 with cosine decay",
        dataset="moons",
        model="mlp_moons",
        opt="adam",
        lr=3e-3,
        schedule="cosine",
    ),
    _case(
        "mlp_adamw_weight_decay",
        "MLP, AdamW with weight decay 0.1, warmup-cosine",
        dataset="blobs",
        model="mlp",
        opt="adamw",
        lr=3e-3,
        wd=0.1,
        schedule="warmup_cosine",
    ),
    _case(
        "mlp_sgd_weight_decay",
        "MLP, SGD momentum with coupled weight decay 5e-3",
        dataset="blobs",
        model="mlp",
        opt="momentum",
        lr=0.02,
        wd=5e-3,
    ),
    _case(
        "mlp_sgd_clip_high_lr",
        "MLP, SGD at lr 0.5 made stable by clipping to norm 1",
        dataset="blobs",
        model="mlp",
        opt="sgd",
        lr=0.5,
        clip=1.0,
    ),
    _case(
        "mlp_sgd_restarts",
        "MLP, SGD with cosine warm restarts (3 cycles)",
        dataset="blobs",
        model="mlp",
        opt="momentum",
        lr=0.05,
        schedule="restarts",
    ),
    _case(
        "deep_gelu_adam",
        "6-layer GELU MLP, Adam 1e-3",
        dataset="blobs",
        model="deep_mlp",
        opt="adam",
        lr=1e-3,
    ),
    _case(
        "cnn_bn_momentum",
        "BatchNorm CNN on digits, SGD momentum 0.05",
        dataset="digits",
        model="cnn",
        opt="momentum",
        lr=0.05,
    ),
    _case(
        "cnn_bn_adam_cosine",
        "BatchNorm CNN on digits, Adam with cosine decay",
        dataset="digits",
        model="cnn",
        opt="adam",
        lr=2e-3,
        schedule="cosine",
    ),
    _case(
        "cnn_bn_sgd_step",
        "BatchNorm CNN, SGD momentum, lr ×0.1 at half-time",
        dataset="digits",
        model="cnn",
        opt="momentum",
        lr=0.1,
        schedule="step",
    ),
    _case(
        "gru_adam",
        "GRU on sequences, Adam 3e-3",
        dataset="sequences",
        model="gru",
        opt="adam",
        lr=3e-3,
    ),
    _case(
        "gru_sgd_clip",
        "GRU, SGD momentum with gradient clipping at 0.5",
        dataset="sequences",
        model="gru",
        opt="momentum",
        lr=0.1,
        clip=0.5,
    ),
    _case(
        "lstm_adamw_cosine",
        "LSTM, AdamW with warmup-cosine and weight decay",
        dataset="sequences",
        model="lstm",
        opt="adamw",
        lr=3e-3,
        wd=0.01,
        schedule="warmup_cosine",
    ),
    _case(
        "lstm_sgd_constant",
        "LSTM, SGD momentum constant",
        dataset="sequences",
        model="lstm",
        opt="momentum",
        lr=0.05,
    ),
    _case(
        "transformer_adamw_warmup",
        "2-layer pre-norm transformer, AdamW, warmup-decay",
        dataset="sequences",
        model="transformer",
        opt="adamw",
        lr=1e-3,
        wd=0.01,
        schedule="warmup_decay",
        steps=400,
    ),
    _case(
        "transformer_adam_clip",
        "transformer, Adam 5e-4 with clipping at 1",
        dataset="sequences",
        model="transformer",
        opt="adam",
        lr=5e-4,
        clip=1.0,
        steps=400,
    ),
    _case(
        "residual_zero_fc2_adam",
        "residual MLP whose branches' fc2.weight and head.weight "
        "start at exactly zero (names without 'bias'), Adam",
        dataset="blobs",
        model="residual",
        opt="adam",
        lr=2e-3,
    ),
    _case(
        "rezero_sgd",
        "ReZero residual MLP: the scalar alpha of each block and head.weight "
        "start at zero, SGD momentum",
        dataset="blobs",
        model="rezero",
        opt="momentum",
        lr=0.05,
    ),
)
