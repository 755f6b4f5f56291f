"""The monitor under torch.distributed: DDP on 2 and 4 CPU ranks (gloo, 127.0.0.1).

Each rank trains a DDP replica on its share of a global batch; the stored series must
equal a single process training on the whole global batch (float64), rank 0 alone must
write, one collective must carry a measured step, and a probe that fails or skips on
one rank must fail or skip on all without a hang.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import trainprobe
from tests.monitor.ranks import rank_share, report, reports, spawn
from trainprobe.curvature import criterion_loss
from trainprobe.keys import Key
from trainprobe.probes import (
    ActivationStats,
    GradConflict,
    GradNoise,
    GrokSignals,
    HessianTop,
    LayerNorms,
    LearningRate,
    NonFiniteGuard,
    Sharpness,
    UpdateNorms,
    every,
)
from trainprobe.store import Run

GLOBAL_BATCH = 16
STEPS = 6
MSE = criterion_loss(nn.MSELoss())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64)
    return x, x[:, :1].sin() + 0.1 * torch.randn(GLOBAL_BATCH, 1, generator=gen)


def _probes() -> list:
    return [
        LayerNorms(schedule=every(1)),
        UpdateNorms(schedule=every(1)),
        ActivationStats(schedule=every(2)),
        NonFiniteGuard(),
        LearningRate(),
        Sharpness(schedule=every(3), tol=1e-10),
        HessianTop(top=2, schedule=every(3), tol=1e-10),
    ]


def _train(model: nn.Module, run_dir, shard=lambda batch: batch, probes=None) -> nn.Module:
    """SGD with momentum on ``_data``; ``shard`` picks this process's rows."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with trainprobe.watch(
        model, probes or _probes(), run_dir=run_dir, optimizer=opt, loss_fn=MSE
    ) as mon:
        for step in range(STEPS):
            x, y = shard(_data(step))
            with mon.step(step, batch=(x, y)) as s:
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    return mon


def _ddp_worker(rank: int, world: int, tmp_path) -> None:
    model = DDP(_model().double())
    mon = _train(model, tmp_path / "run", partial(rank_share, rank, world))
    report(tmp_path, rank, {"collectives": mon._ranks.exchange.collectives})


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ddp_series_equal_the_single_process_run_on_the_global_batch(tmp_path, world):
    spawn(_ddp_worker, world, tmp_path)
    _train(_model().double(), tmp_path / "single")
    ranks, single = Run(tmp_path / "run"), Run(tmp_path / "single")
    recorded, expected = ranks.keys(), single.keys()  # Run has no __iter__
    keys = [k for k in expected if not k.startswith("scalars/")]
    assert sorted(k for k in recorded if not k.startswith("scalars/")) == sorted(keys)
    for key in keys:
        got, want = ranks.series(key), single.series(key)
        assert got.steps.tolist() == want.steps.tolist(), key
        tol = 1e-8 if key.startswith(("sharpness/", "hessian/")) else 1e-12
        np.testing.assert_allclose(got.values, want.values, rtol=tol, atol=1e-14, err_msg=key)
    assert ranks.meta["ranks"] == {"world": world, "writer": 0}
    # one collective per step where a probe that combines ranks is due (activations at
    # 0, 2, 4; curvature on the step's batch at 0, 3), plus one agreement the first time
    # each set of them is seen ({activations, sharpness, hessian}, {activations},
    # {sharpness, hessian}); norms, updates, the non-finite guard and the learning rate
    # read replicated parameters and all-reduced gradients: no collective
    counts = [r["collectives"] for r in reports(tmp_path, world)]
    assert counts == [counts[0]] * world
    assert counts[0] == 4 + 3


def _noise_probes(micro: int) -> list:
    return [
        GradNoise(loss_fn=MSE, schedule=every(2)),
        GradNoise(loss_fn=MSE, microbatches=micro, schedule=every(2), name="noise_micro"),
    ]


def _noise_worker(rank: int, world: int, tmp_path) -> None:
    model = DDP(_model().double())
    _train(model, tmp_path / "run", partial(rank_share, rank, world), probes=_noise_probes(2))


def test_the_gradient_noise_scale_pools_every_ranks_examples(tmp_path):
    """Per-example and micro-batch estimators over the global batch: each rank's sums of
    squares, sizes and b-weighted mean gradient summed in one all-reduce equal one process
    holding every example (2 micro-batches per rank = 4 of the whole batch)."""
    spawn(_noise_worker, 2, tmp_path)
    _train(_model().double(), tmp_path / "single", probes=_noise_probes(4))
    ranks, single = Run(tmp_path / "run"), Run(tmp_path / "single")
    prefixes = ("grad_noise/", "noise_micro/")
    names, recorded = single.keys(), ranks.keys()  # Run has no __iter__
    keys = [k for k in names if k.startswith(prefixes)]
    assert sorted(keys) == sorted(k for k in recorded if k.startswith(prefixes))
    for key in keys:
        np.testing.assert_allclose(
            ranks.series(key).values, single.series(key).values, rtol=1e-10, err_msg=key
        )
    assert ranks.series("grad_noise/batch_size").values.tolist() == [GLOBAL_BATCH] * 3


def _conflict_probes(micro: int) -> list:
    ce = criterion_loss(nn.CrossEntropyLoss())

    def tasks(model, batch):
        out = model(batch[0])
        return {"ce": nn.functional.cross_entropy(out, batch[1]), "small": out.pow(2).mean()}

    return [
        GradConflict(loss_fn=ce, schedule=every(2)),
        GradConflict(by="task", loss_fn=tasks, schedule=every(2), name="tasks"),
        GradConflict(
            by="microbatch", microbatches=micro, loss_fn=ce, schedule=every(2), name="micro"
        ),
    ]


def _classify(run_dir, shard=lambda batch: batch, micro: int = 4) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model = DDP(model) if torch.distributed.is_initialized() else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trainprobe.watch(model, _conflict_probes(micro), run_dir=run_dir, optimizer=opt) as mon:
        for step in range(4):
            x, _ = _data(step)
            # rank 0's share has no example of class 2 at step 0: the union of ids matters
            y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long() * (step > 0)
            x, y = shard((x, y))
            with mon.step(step, batch=(x, y)):
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()


def _conflict_worker(rank: int, world: int, tmp_path) -> None:
    _classify(tmp_path / "run", partial(rank_share, rank, world), micro=2)


def test_group_gradients_pool_every_ranks_share(tmp_path):
    """Per-class (the union of the ranks' classes), per-task (batch-size weighted) and
    per-micro-batch groups (every rank's, in rank order) of the global batch: equal to one
    process holding it (float64)."""
    spawn(_conflict_worker, 2, tmp_path)
    _classify(tmp_path / "single")
    ranks, single = Run(tmp_path / "run"), Run(tmp_path / "single")
    prefixes = ("conflict/", "tasks/", "micro/")
    names, recorded = single.keys(), ranks.keys()  # Run has no __iter__
    keys = [k for k in names if k.startswith(prefixes)]
    assert sorted(keys) == sorted(k for k in recorded if k.startswith(prefixes))
    for key in keys:
        np.testing.assert_allclose(
            ranks.series(key).values, single.series(key).values, rtol=1e-10, atol=1e-13, err_msg=key
        )
    assert ranks.series("conflict/groups").values.tolist() == [2.0, 3.0]


def _batchnorm_worker(rank: int, world: int, tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    model = DDP(net.double())
    probes = [
        Sharpness(schedule=every(2), engine="jvp"),
        HessianTop(top=2, schedule=every(2), engine="jvp", mode="train"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no probe disabled, nothing skipped
        mon = _train(model, tmp_path / "run", partial(rank_share, rank, world), probes=probes)
    report(tmp_path, rank, {"disabled": mon._disabled})


def test_batchnorm_under_ddp_with_the_jvp_engine(tmp_path):
    """DDP broadcasts BatchNorm buffers in its forward; the probes evaluate the wrapped
    module with cloned buffers, so the forward-over-reverse engine runs (it used to stop
    on functorch's in-place copy error) in both BatchNorm modes."""
    spawn(_batchnorm_worker, 2, tmp_path)
    assert reports(tmp_path, 2) == [{"disabled": {}}] * 2
    run = Run(tmp_path / "run")
    for key in ("sharpness/lambda_max", "hessian/eig_0", "hessian/eig_1"):
        values = run.series(key).values
        assert values.size == 3 and np.isfinite(values).all(), key


def _same_dir_worker(rank: int, world: int, tmp_path) -> None:
    model = DDP(_model().double())
    _train(model, tmp_path / "run", partial(rank_share, rank, world), probes=[LayerNorms()])


def test_every_rank_may_pass_the_same_run_dir_and_rank_0_alone_writes(tmp_path):
    spawn(_same_dir_worker, 2, tmp_path)
    run = Run(tmp_path / "run")
    assert run.state().name == "finished"
    steps = run.series("norms/grad_total").steps
    assert steps.tolist() == sorted(set(steps.tolist()))  # no step written twice
    assert run.series("scalars/loss").steps.tolist() == list(range(STEPS))


class _FailsOnRank1:
    """A probe combining the ranks' batches that raises on rank 1 only (at step 2)."""

    name = "flaky"
    schedule = every(1)
    needs = frozenset()
    keys = (Key("flaky/value", "1.0 while it works"),)
    across_ranks = "combined"

    def measure(self, ctx):
        import torch.distributed as dist

        if dist.get_rank() == 1 and ctx.step == 2:
            raise RuntimeError("injected fault on rank 1")
        return {f"{self.name}/value": 1.0}


class _SameFailsOnRank1(_FailsOnRank1):
    """The same fault in a probe whose values are the same on every rank: rank 1 drops it
    alone, rank 0 (the writer) goes on, and no collective is involved."""

    name = "replicated"
    keys = (Key("replicated/value", "1.0 while it works"),)
    across_ranks = "same"


def _nan_on_rank_1(rank, world, batch):
    x, y = rank_share(rank, world, batch)
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("nan")
    return x, y


def _fault_worker(rank: int, world: int, tmp_path, kind: str) -> None:
    model = DDP(_model().double())
    if kind == "raise":
        probes = [_FailsOnRank1(), _SameFailsOnRank1(), Sharpness(schedule=every(1))]
        shard = partial(rank_share, rank, world)
    else:  # a NaN in rank 1's batch at every step: curvature's loss is NaN there only
        probes = [Sharpness(schedule=every(1)), LayerNorms(schedule=every(1))]
        shard = partial(_nan_on_rank_1, rank, world)
    words = r"raised on rank 1" if kind == "raise" else r"combined over processes"
    with pytest.warns(RuntimeWarning, match=words):
        mon = _train(model, tmp_path / "run", shard, probes=probes)
    report(tmp_path, rank, {"disabled": sorted(mon._disabled), "skipped": mon._skipped})


def test_a_probe_failing_on_one_rank_is_disabled_on_all_without_a_hang(tmp_path):
    spawn(_fault_worker, 2, tmp_path, "raise", deadline=90)
    seen = reports(tmp_path, 2)
    assert seen[0]["disabled"] == ["flaky"] and seen[1]["disabled"] == ["flaky", "replicated"]
    run = Run(tmp_path / "run")
    assert run.series("flaky/value").steps.tolist() == [0, 1]  # nothing from step 2 on
    assert run.series("replicated/value").steps.tolist() == list(range(STEPS))
    assert run.series("sharpness/lambda_max").steps.tolist() == list(range(STEPS))
    assert "rank 1" in run.meta["disabled_probes"]["flaky"]


def test_a_nan_loss_on_one_rank_skips_curvature_on_all_ranks(tmp_path):
    spawn(_fault_worker, 2, tmp_path, "nan", deadline=90)
    seen = reports(tmp_path, 2)
    assert seen[0]["skipped"] == seen[1]["skipped"] == {"sharpness": list(range(STEPS))}
    run = Run(tmp_path / "run")
    assert "sharpness/lambda_max" not in run
    assert run.meta["disabled_probes"] == {}


class _LocalOnly:
    """A user probe that declares its values this rank's own, with no combination rule."""

    name = "local_only"
    schedule = every(1)
    needs = frozenset()
    keys = (Key("local_only/value", "a rank's own number"),)
    across_ranks = "local"

    def measure(self, ctx):
        return {"local_only/value": 1.0}


def _refusal_worker(rank: int, world: int, tmp_path) -> None:
    model = DDP(_model().double())
    for probe, words in (
        (GrokSignals(), "give it a fixed batch with data="),
        (_LocalOnly(), "no rule yet to combine ranks"),
    ):
        with pytest.raises(ValueError, match=words):
            trainprobe.watch(model, [probe], run_dir=tmp_path / f"r{rank}")
    report(tmp_path, rank, "ok")


def test_probes_that_would_log_one_ranks_share_are_refused_with_the_fix(tmp_path):
    spawn(_refusal_worker, 2, tmp_path)
    assert reports(tmp_path, 2) == ["ok", "ok"]


def test_a_single_process_sees_no_ranks(tmp_path):
    mon = _train(_model().double(), tmp_path / "r", probes=[LayerNorms()])
    assert mon.ranks is None and mon._ranks is None
    assert math.isfinite(Run(tmp_path / "r").series("norms/grad_total").values[-1])
