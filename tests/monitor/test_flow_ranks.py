"""GradientFlow under DDP on 2 CPU ranks (gloo, 127.0.0.1): the ranks' squares of
``∂L_r/∂y_r``, divided by ``W²`` and summed, equal a single process's ``||∂L/∂y||²`` on
the global batch (float64) — depth on an MLP, time on a GRU reading a sequence and on a
GRU cell called once per step — with and without an AMP loss scale."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import trainprobe
from tests.monitor.ranks import rank_share, report, reports, spawn
from trainprobe.probes import GradientFlow, every
from trainprobe.store import Run

GLOBAL_BATCH = 8
STEPS = 3
LENGTH = 7  # positions of the sequences
SCALE = 2.0**10  # the AMP loss scale (a power of 2: scaling is exact)


class _Mlp(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1))


class _Gru(nn.Module):
    """A GRU reading ``[B, T, 3]``, regressed from its last state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)  # [B, T, 5]
        return self.head(out[:, -1])


class _Cell(nn.Module):
    """A GRU cell called once per position by a hand-written loop."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(3, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


MODELS = {"mlp": _Mlp, "gru": _Gru, "cell": _Cell}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().double()


def _data(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    shape = (GLOBAL_BATCH, 3) if kind == "mlp" else (GLOBAL_BATCH, LENGTH, 3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64)


def _train(model: nn.Module, kind: str, run_dir, shard=lambda b: b, scale: float | None = None):
    """SGD on ``_data``; with ``scale``, the loss scaled by a GradScaler (float64: exact)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    probes = [GradientFlow(schedule=every(1), profile_points=4)]
    with trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt, scaler=scaler) as mon:
        for step in range(STEPS):
            x, y = shard(_data(kind, step))
            with mon.step(step, batch=(x, y)):
                loss = nn.functional.mse_loss(model(x), y)
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
    return mon


def _ddp_worker(rank: int, world: int, tmp_path, scale: float | None) -> None:
    disabled = {}
    for kind in MODELS:
        model = DDP(_model(kind))
        mon = _train(model, kind, tmp_path / kind, partial(rank_share, rank, world), scale)
        disabled[kind] = mon._disabled
    report(tmp_path, rank, disabled)


@pytest.mark.parametrize("scale", [None, SCALE], ids=["fp", "loss_scale"])
def test_ddp_gradient_flow_equals_the_single_process_run_on_the_global_batch(tmp_path, scale):
    spawn(_ddp_worker, 2, tmp_path, scale, deadline=150)
    assert reports(tmp_path, 2) == [{kind: {} for kind in MODELS}] * 2
    for kind in MODELS:
        _train(_model(kind), kind, tmp_path / f"single_{kind}")
        ranks, single = Run(tmp_path / kind), Run(tmp_path / f"single_{kind}")
        recorded, expected = ranks.keys(), single.keys()  # Run has no __iter__
        keys = sorted(k for k in expected if k.startswith("grad_flow/"))
        assert sorted(k for k in recorded if k.startswith("grad_flow/")) == keys, kind
        timed = [k for k in keys if k.startswith(("grad_flow/ratio/", "grad_flow/profile/"))]
        assert (kind == "mlp") == (timed == []), kind  # the recurrent nets have positions
        for key in keys:
            got, want = ranks.series(key), single.series(key)
            assert got.steps.tolist() == want.steps.tolist() == list(range(STEPS)), key
            np.testing.assert_allclose(
                got.values, want.values, rtol=1e-12, atol=0, err_msg=f"{kind}: {key}"
            )
