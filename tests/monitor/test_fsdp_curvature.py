"""Curvature probes under FSDP2 on 2 (and 4, slow) CPU ranks: finite differences through
the sharded model against the exact engine in one process on the whole global batch.

The model is smooth (tanh) and float64, with one parameter FSDP2 leaves replicated; the
optimizer is Adam, so ``Sharpness`` reads Adam's sharded second moments for its
preconditioner. Every rank's eigenvalues must equal the single-process ones, the
eigenvectors too (in the usual parameter order), and training with the probes must be
bit-identical to training without them (shards, ``.grad`` and optimizer state put back).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import trainprobe
from tests.monitor.ranks import rank_share, report, reports, spawn
from trainprobe.curvature import criterion_loss
from trainprobe.probes import (
    GradientSubspace,
    HessianDensity,
    HessianTop,
    HessianTrace,
    LayerNorms,
    Sharpness,
    every,
)
from trainprobe.store import Run

GLOBAL_BATCH = 16
STEPS = 4
MSE = criterion_loss(nn.MSELoss())


class _Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1)
        )
        self.gain = nn.Parameter(torch.full((3,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.gain.sum()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(200 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64)
    return x, x[:, :1].sin() + 0.1 * torch.randn(GLOBAL_BATCH, 1, generator=gen)


def _probes() -> list:
    return [
        LayerNorms(schedule=every(1)),
        HessianTop(top=2, schedule=every(2), tol=1e-10, vectors=True),
        Sharpness(schedule=every(2), tol=1e-10),
        HessianTrace(schedule=every(2), matvecs=6),
        HessianDensity(schedule=every(2), steps=8, probes=1, points=20),
        GradientSubspace(schedule=every(2), k=2, gradient="step", tol=1e-10),
    ]


def _train(model, run_dir, probes, shard=lambda batch: batch, world: int = 1):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    watched = trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt, loss_fn=MSE)
    with watched as mon:
        for step in range(STEPS):
            x, y = shard(_data(step))
            with mon.step(step, batch=(x, y)):
                nn.functional.mse_loss(model(x), y).backward()
                if world > 1:  # FSDP2 leaves the replicated gain's gradient alone
                    dist.all_reduce(model.gain.grad)
                    model.gain.grad /= world
            opt.step()
            opt.zero_grad()
    return mon


def _sharded() -> _Smooth:
    from torch.distributed.fsdp import fully_shard

    model = _Smooth().double()
    for layer in model.body:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model, ignored_params={model.gain})
    return model


def _worker(rank: int, world: int, tmp_path) -> None:
    shard = partial(rank_share, rank, world)
    watched = _sharded()
    mon = _train(watched, tmp_path / "run", _probes(), shard, world)
    plain = _sharded()
    _train(plain, tmp_path / f"plain{rank}", [LayerNorms()], shard, world)
    local = [getattr(p, "to_local", lambda p=p: p)() for p in plain.parameters()]
    mine = [getattr(p, "to_local", lambda p=p: p)() for p in watched.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(mine, local, strict=True))
    report(tmp_path, rank, {"disabled": mon._disabled, "identical": same})


@pytest.mark.parametrize("world", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_fsdp2_curvature_equals_the_exact_single_process_run(tmp_path, world):
    spawn(_worker, world, tmp_path, deadline=240)
    _train(_Smooth().double(), tmp_path / "single", _probes())
    seen = reports(tmp_path, world)
    assert all(r["disabled"] == {} for r in seen), seen
    assert all(r["identical"] for r in seen)  # training untouched by the probes
    sharded, single = Run(tmp_path / "run"), Run(tmp_path / "single")
    for key in ("hessian/eig_0", "hessian/eig_1", "sharpness/lambda_max", "sharpness/directional"):
        got, want = sharded.series(key), single.series(key)
        assert got.steps.tolist() == want.steps.tolist(), key
        np.testing.assert_allclose(got.values, want.values, rtol=1e-7, err_msg=key)
    assert sharded.series("sharpness/preconditioned").values.tolist() == [1.0]  # Adam's, from 2
    assert (sharded.series("hessian/fd_error").values < 1e-7).all()
    assert "hessian/fd_error" not in single  # the exact engine there
    # the trace's Hutchinson vectors are the same draws in both: same estimate
    np.testing.assert_allclose(
        sharded.series("hessian_trace/trace").values,
        single.series("hessian_trace/trace").values,
        rtol=1e-7,
    )
    np.testing.assert_allclose(
        sharded.series("grad_subspace/fraction").values,
        single.series("grad_subspace/fraction").values,
        rtol=1e-6,
    )
    for key in ("hessian_density/grid", "hessian_density/density"):
        got, want = (run.arrays(key)[1][-1] for run in (sharded, single))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8, err_msg=key)
    got, want = (run.arrays("hessian/eigvecs")[1][-1] for run in (sharded, single))  # step 2
    signs = np.sign((got * want).sum(axis=0))
    np.testing.assert_allclose(got * signs, want, atol=1e-5)  # float32 storage


def _nan_worker(rank: int, world: int, tmp_path) -> None:
    """A NaN in rank 1's rows at step 1: every rank skips that measurement alike (no rank
    left waiting in a collective), the probe stays on and measures step 2."""
    model = _sharded()
    probes = [Sharpness(schedule=every(1), tol=1e-6)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watched = trainprobe.watch(model, probes, run_dir=tmp_path / "run", optimizer=opt, loss_fn=MSE)
    with watched as mon:
        for step in range(3):
            x, y = rank_share(rank, world, _data(step))
            if step == 1 and rank == 1:
                x = x.clone()
                x[0, 0] = float("nan")
            with mon.step(step, batch=(x, y)):
                nn.functional.mse_loss(model(x), y).backward()
                dist.all_reduce(model.gain.grad)
                model.gain.grad /= world
            opt.zero_grad()  # no update: the NaN gradient must not reach the weights
    report(tmp_path, rank, {"disabled": mon._disabled})


def test_fsdp2_curvature_skips_a_nan_batch_on_every_rank(tmp_path):
    spawn(_nan_worker, 2, tmp_path, deadline=120)
    assert all(r["disabled"] == {} for r in reports(tmp_path, 2))
    assert Run(tmp_path / "run").series("sharpness/lambda_max").steps.tolist() == [0, 2]


def _engine_worker(rank: int, world: int, tmp_path) -> None:
    model = _sharded()
    probes = [HessianTop(engine="graph", schedule=every(1))]
    with trainprobe.watch(model, probes, run_dir=tmp_path / "run", loss_fn=MSE) as mon:
        x, y = _data(0)
        with mon.step(0, batch=(x, y)):
            nn.functional.mse_loss(model(x), y).backward()
    report(tmp_path, rank, {"disabled": mon._disabled})


def test_fsdp2_curvature_with_an_exact_engine_asked_for_is_disabled_with_the_way_out(tmp_path):
    spawn(_engine_worker, 1, tmp_path, deadline=60)
    (reason,) = reports(tmp_path, 1)[0]["disabled"].values()
    assert "under FSDP2 runs finite differences" in reason and "engine=" in reason
