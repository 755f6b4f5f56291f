"""The monitor under FSDP2 (``fully_shard``) on 2 and 4 CPU ranks (gloo, 127.0.0.1).

Parameters and gradients are ``DTensor`` shards (dim 0; with 4 ranks the last layer's
single row leaves three ranks an empty shard). Each rank trains on its share of a global
batch; every stored series must equal a single process training the unsharded model on
the whole global batch (float64): norms, updates and the non-finite guard combine the
ranks' squared shard norms (nothing gathered), a parameter left out of the sharding
(replicated, its gradient averaged by hand) counts once, and the probes that need the
whole model on every rank are refused before training (the curvature probes run, by
finite differences through the sharded model: ``test_fsdp_curvature.py``).
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
    ActivationStats,
    GradientFlow,
    GradNoise,
    GradSpectrum,
    LayerNorms,
    LearningRate,
    NonFiniteGuard,
    UpdateNorms,
    every,
)
from trainprobe.store import Run

GLOBAL_BATCH = 16
STEPS = 5
NAN_STEP = STEPS - 1  # a NaN in rank 1's rows (the global batch's row 8): the guard fires
MSE = criterion_loss(nn.MSELoss())


class _Net(nn.Module):
    """An MLP and a parameter left out of FSDP2's sharding (replicated on every rank)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)
        )
        self.gain = nn.Parameter(torch.full((3,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.gain.sum()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64)
    if step == NAN_STEP:
        x[GLOBAL_BATCH // 2, 0] = float("nan")
    return x, x[:, :1].sin() + 0.1 * torch.randn(GLOBAL_BATCH, 1, generator=gen)


def _probes() -> list:
    return [
        LayerNorms(schedule=every(1)),
        UpdateNorms(schedule=every(1)),
        NonFiniteGuard(),
        ActivationStats(schedule=every(2)),
        GradientFlow(schedule=every(2)),
        LearningRate(),
    ]


def _train(model: _Net, run_dir, shard=lambda batch: batch, world: int = 1):
    """SGD with momentum on ``_data``; ``shard`` picks this process's rows. The replicated
    ``gain``'s gradient is averaged over ranks by hand (FSDP2 leaves it alone)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with trainprobe.watch(model, _probes(), run_dir=run_dir, optimizer=opt, loss_fn=MSE) as mon:
        for step in range(STEPS):
            x, y = shard(_data(step))
            with mon.step(step, batch=(x, y)) as s:
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                if world > 1:
                    dist.all_reduce(model.gain.grad)
                    model.gain.grad /= world
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    return mon


def _sharded() -> tuple[_Net, list[int]]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _Net().double()
    for layer in model.body:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model, ignored_params={model.gain})
    local = [p.to_local().shape[0] for p in model.body.parameters()]
    if not isinstance(model.body[0].weight, DTensor) or isinstance(model.gain, DTensor):
        raise RuntimeError("fully_shard did not shard the layers and leave gain alone")
    return model, local


def _fsdp_worker(rank: int, world: int, tmp_path) -> None:
    model, rows = _sharded()
    mon = _train(model, tmp_path / "run", partial(rank_share, rank, world), world)
    report(tmp_path, rank, {"rows": rows, "disabled": mon._disabled})


def _refusal_worker(rank: int, world: int, tmp_path) -> None:
    model, _ = _sharded()
    refusals = {}
    for probe in (GradNoise(), GradSpectrum()):
        with pytest.raises(ValueError) as err:
            trainprobe.watch(model, [LayerNorms(), probe], run_dir=tmp_path / f"r{rank}")
        refusals[type(probe).__name__] = str(err.value)
    report(tmp_path, rank, refusals)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_fsdp2_series_equal_the_single_process_run_on_the_global_batch(tmp_path, world):
    spawn(_fsdp_worker, world, tmp_path, deadline=150)
    _train(_Net().double(), tmp_path / "single")
    seen = reports(tmp_path, world)
    assert all(r["disabled"] == {} for r in seen)
    if world == 4:  # Linear(8, 1): one row, on rank 0; the others hold an empty shard
        assert [r["rows"][-1] for r in seen] == [1, 0, 0, 0]
    ranks, single = Run(tmp_path / "run"), Run(tmp_path / "single")
    recorded, expected = ranks.keys(), single.keys()  # Run has no __iter__
    keys = [k for k in expected if not k.startswith("scalars/")]
    assert sorted(k for k in recorded if not k.startswith("scalars/")) == sorted(keys)
    for prefix in ("norms/", "updates/", "nonfinite/", "grad_flow/"):
        assert any(k.startswith(prefix) for k in keys), prefix
    for key in keys:
        got, want = ranks.series(key), single.series(key)
        assert got.steps.tolist() == want.steps.tolist(), key
        np.testing.assert_allclose(got.values, want.values, rtol=1e-12, atol=1e-15, err_msg=key)
    # the guard saw the NaN batch row on rank 1 alone, and the replicated gain counted once
    assert ranks.series("nonfinite/loss").values.tolist() == [0.0] * NAN_STEP + [1.0]
    assert ranks.series("nonfinite/grad").values[-1] == len(list(_Net().parameters()))
    gain = ranks.series("norms/weight/gain").values[0]
    assert gain == pytest.approx(0.5 * 3**0.5, rel=1e-15)  # not sqrt(world) times it


def test_fsdp2_refuses_the_probes_that_need_the_whole_model(tmp_path):
    spawn(_refusal_worker, 2, tmp_path, deadline=90)
    for refusals in reports(tmp_path, 2):
        assert "FSDP2, 2 ranks" in refusals["GradNoise"]
        assert "as a function of all its parameters" in refusals["GradNoise"]
        assert "singular values of whole weight or gradient matrices" in refusals["GradSpectrum"]
