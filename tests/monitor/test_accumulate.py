"""Gradient accumulation: micro-batches of one optimizer step are one record.

Accumulating two halves of a batch (each loss divided by 2) is, in exact arithmetic, one
step on the whole batch: every stored series of the accumulated run must equal the
full-batch run's (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import trainprobe
from trainprobe.curvature import criterion_loss
from trainprobe.probes import (
    ActivationStats,
    LayerNorms,
    NonFiniteGuard,
    Sharpness,
    UpdateNorms,
    every,
)
from trainprobe.store import Run

MSE = criterion_loss(nn.MSELoss())
STEPS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    return x, x[:, :1].cos()


def _probes() -> list:
    return [
        LayerNorms(schedule=every(1)),
        UpdateNorms(schedule=every(1)),
        NonFiniteGuard(),
        Sharpness(schedule=every(2), tol=1e-10),
    ]


def _run(run_dir, micro: int):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with trainprobe.watch(model, _probes(), run_dir=run_dir, optimizer=opt, loss_fn=MSE) as mon:
        for step in range(STEPS):
            x, y = _batch(step)
            chunks = list(zip(x.chunk(micro), y.chunk(micro), strict=True))
            for j, chunk in enumerate(chunks):
                with mon.step(step, batch=chunk, accumulate=j < micro - 1) as s:
                    loss = nn.functional.mse_loss(model(chunk[0]), chunk[1])
                    (loss / micro).backward()
                    s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    return model


@pytest.mark.parametrize("micro", [2, 4])
def test_accumulated_micro_batches_record_the_whole_batch_step(tmp_path, micro):
    whole, accumulated = _run(tmp_path / "whole", 1), _run(tmp_path / "acc", micro)
    for a, b in zip(whole.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    runs = Run(tmp_path / "whole"), Run(tmp_path / "acc")
    keys = runs[0].keys()  # Run has no __iter__
    assert sorted(keys) == sorted(runs[1].keys())
    for key in keys:
        got, want = runs[1].series(key), runs[0].series(key)
        assert got.steps.tolist() == want.steps.tolist(), key  # one record per step
        tol = 1e-8 if key.startswith("sharpness/") else 1e-11
        np.testing.assert_allclose(got.values, want.values, rtol=tol, atol=1e-14, err_msg=key)


def test_hooks_stay_on_across_the_micro_batches(tmp_path):
    """ActivationStats pools every micro-batch of the step: equal to the whole batch."""
    model = _model()
    stats = {}
    for micro in (1, 2):
        run_dir = tmp_path / str(micro)
        with trainprobe.watch(model, [ActivationStats(schedule=every(1))], run_dir=run_dir) as mon:
            x, _ = _batch(0)
            for j, part in enumerate(x.chunk(micro)):
                with mon.step(0, accumulate=j < micro - 1), torch.no_grad():
                    model(part)
        stats[micro] = Run(run_dir).series("activations/std/0").values
    np.testing.assert_allclose(stats[2], stats[1], rtol=1e-12)


def test_a_new_step_while_one_accumulates_is_refused(tmp_path):
    model = _model()
    with trainprobe.watch(model, [LayerNorms()], run_dir=tmp_path / "r") as mon:
        with mon.step(0, accumulate=True):
            pass
        with pytest.raises(ValueError, match=r"optimizer step 0 still accumulates"):
            mon.step(1)
        with mon.step(0):  # the last micro-batch closes it
            pass
        with pytest.raises(TypeError, match=r"takes True or False"):
            mon.step(1, accumulate=1)
        with pytest.raises(ValueError, match=r"evaluation step trains nothing"):
            mon.step(1, evaluation=True, accumulate=True)


def test_a_micro_batch_that_raises_ends_the_step_and_removes_the_hooks(tmp_path):
    model = _model()
    with trainprobe.watch(
        model, [ActivationStats(schedule=every(1))], run_dir=tmp_path / "r"
    ) as mon:
        with pytest.raises(RuntimeError, match="boom"):
            with mon.step(0, accumulate=True):
                model(_batch(0)[0])
                raise RuntimeError("boom")
        assert not any(m._forward_hooks for m in model.modules())
        with mon.step(1):  # the next step starts afresh
            model(_batch(1)[0])
    assert Run(tmp_path / "r").series("activations/std/0").steps.tolist() == [1]


def test_the_clip_coefficient_from_what_clip_grad_norm_returned(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trainprobe.watch(model, [LayerNorms(schedule=every(1))], run_dir=tmp_path / "r") as mon:
        for step in range(3):
            x, y = _batch(step)
            with mon.step(step):
                nn.functional.mse_loss(model(x), y).backward()
            total = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            mon.log_clip(total, 0.05)
            opt.step()
            opt.zero_grad()
        with pytest.raises(ValueError, match="max_norm must be positive"):
            mon.log_clip(total, 0.0)
    run = Run(tmp_path / "r")
    pre = run.series("norms/grad_total").values  # measured at the block's end: pre-clip
    np.testing.assert_allclose(run.series("scalars/grad_norm_preclip").values, pre, rtol=1e-12)
    np.testing.assert_allclose(
        run.series("scalars/clip_coef").values, np.minimum(1, 0.05 / (pre + 1e-6)), rtol=1e-12
    )
