"""Adam ε-domination holdout runs, written after the ``adam_eps_domination`` limit was
set on the corpus and never used to revise it: a pre-norm residual MLP and a two-layer
tanh MLP on the demo's digit images, under Adam 1e-3 (batch 64, 300 steps), watched by the
default probes and ``AdamHealth`` every 10 steps. Ground truth from the loss alone,
against the same model, seed and data at ε = 1e-8: a run is harmed when it ends (mean
of its last 30 losses) more than 0.05 nats and 3 times the spread over seeds above it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import AdamHealth, default_probes, every

from . import data
from .base import Case, Expected
from .holdout_models import mlp, prenorm_mlp

STEPS = 300


def _model(kind: str) -> torch.nn.Module:
    """``"prenorm"``: the pre-norm residual MLP; ``"tanh"``: two tanh hidden layers."""
    body = prenorm_mlp(64, 10) if kind == "prenorm" else mlp(64, 10, torch.nn.Tanh)
    return torch.nn.Sequential(torch.nn.Flatten(), body)


def digits_run(
    run_dir: Path, *, kind: str, seed: int, eps: float = 1e-8, loss_scale: float = 1.0
) -> None:
    x, y = data.digits(2048, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _model(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=eps)
    probes = [*default_probes(every_n=10), AdamHealth(schedule=every(10))]
    with trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt) as mon:
        for step in range(STEPS):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            with mon.step(step) as s:
                loss = F.cross_entropy(model(x[idx]), y[idx])
                (loss * loss_scale).backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=True)


HEALTHY = (  # (kind, seed, eps, loss scale, note): losses measured before any scoring
    ("tanh", 0, 1e-8, 1.0, "control: loss 0.82"),
    ("tanh", 1, 1e-8, 1.0, "control: loss 0.78"),
    ("prenorm", 2, 1e-8, 1.0, "control: loss 0.32"),
    ("prenorm", 1, 1e-4, 1.0, "eps 1e-4: loss 0.310 against 0.308"),
    ("tanh", 0, 1e-3, 1.0, "eps 1e-3: loss 0.85 against 0.82, within the spread"),
    ("prenorm", 0, 1e-8, 1e-3, "loss x 1e-3: loss 0.290 against 0.289"),
)
SICK = (
    ("tanh", 0, 0.3, 1.0, "eps 0.3: loss 2.25 against 0.82 (chance 2.30)"),
    ("prenorm", 0, 1e-8, 1e-7, "loss x 1e-7: loss 1.08 against 0.29"),
    ("tanh", 1, 1e-8, 1e-6, "loss x 1e-6: loss 1.08 against 0.78"),
)


def _name(kind: str, seed: int, eps: float, scale: float) -> str:
    return f"digits_{kind}_adam_eps{eps:g}_scale{scale:g}_s{seed}"


CASES: tuple[Case, ...] = (
    *(
        Case(
            _name(kind, seed, eps, scale),
            "healthy",
            partial(digits_run, kind=kind, seed=seed, eps=eps, loss_scale=scale),
            note=note,
        )
        for kind, seed, eps, scale, note in HEALTHY
    ),
    *(
        Case(
            _name(kind, seed, eps, scale),
            "sick",
            partial(digits_run, kind=kind, seed=seed, eps=eps, loss_scale=scale),
            (Expected("adam_eps_domination", 0, STEPS - 1),),
            note=note,
        )
        for kind, seed, eps, scale, note in SICK
    ),
)
