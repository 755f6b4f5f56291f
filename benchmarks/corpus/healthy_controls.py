"""Healthy controls of the sick structure families, watched by the same probes: modular
addition that generalises with the fit (held-out accuracy, softmax collapse, local
complexity), a bfloat16 run whose partial softmax collapse does not stop it grokking,
and the starvation toy's control, whose second feature is the only route and is learned."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from trainprobe.probes import GrokSignals, HeldOut, LocalComplexity, every, log_spaced

from . import data
from .base import Case, full, run_loop
from .sick_structure import _modular_net, grokking, starvation


def modular_control(run_dir: Path, *, p: int = 31, fraction: float = 0.9, steps: int = 800) -> None:
    """Modular addition from 90% of the pairs, AdamW with weight decay 1: held-out
    accuracy follows the fit; held-out, grokking signals and local complexity probed."""
    (xt, yt), (xv, yv) = data.modular(p, fraction)
    torch.manual_seed(0)
    model = _modular_net(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0, betas=(0.9, 0.98))
    extra = [
        HeldOut(data=(xv, yv), train_data=(xt, yt), schedule=every(10)),
        GrokSignals(data=(xt, yt), schedule=every(10)),
        LocalComplexity(
            train=xt[:128], test=xv[:64], radius=0.05, schedule=log_spaced(6) | every(100)
        ),
    ]
    run_loop(run_dir, model, opt, full((xt, yt)), steps=steps, extra=extra)


CASES = (
    Case(
        "grokking_control_generalises",
        "healthy",
        modular_control,
        allowed_info=("region_migration", "grokking"),
        note="modular addition p = 31 from 90% of the pairs, AdamW wd 1: held-out accuracy "
        "follows the fit (0.95 by ~270, fit at ~50; the 'grokked' info describes that lag "
        "truly); local complexity probed",
    ),
    Case(
        "grokking_bf16_with_decay",
        "healthy",
        partial(grokking, wd=1.0, steps=1000, dtype=torch.bfloat16),
        allowed_info=("grokking",),
        note="modular addition in bfloat16 with weight decay 1: softmax collapse on ~55% of "
        "the pairs, yet it groks (held-out 0.95 by ~750): a true 'grokked' info, no stall",
    ),
    Case(
        "starvation_control",
        "healthy",
        partial(starvation, starved=False),
        note="Pezeshki's toy with the easy feature shuffled: the hard feature is the only "
        "route and is learned; attribution and NTK response probed",
    ),
)
