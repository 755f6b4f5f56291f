"""Mixed precision: probes read the true gradient under a GradScaler, record the scale and
the steps it skipped, and measure curvature in the parameters' dtype inside autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import trainprobe
from trainprobe.curvature import criterion_loss
from trainprobe.probes import GradientFlow, LayerNorms, LossScale, Sharpness, UpdateNorms, every
from trainprobe.store import Run

MSE = criterion_loss(nn.MSELoss())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=gen)
    return x, x[:, :1] * 2


def _train(run_dir, *, init_scale: float, unscale_inside: bool, probes=None, steps=8):
    """fp16-style training on the CPU: the loss scaled, ``scaler.step`` and ``update``
    after the block; ``unscale_inside`` calls ``scaler.unscale_`` inside the block (the
    clipping recipe), so the probes see unscaled gradients either way."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    probes = probes or [LayerNorms(schedule=every(1)), UpdateNorms(schedule=every(1))]
    with trainprobe.watch(
        model, probes, run_dir=run_dir, optimizer=opt, loss_fn=MSE, scaler=scaler
    ) as mon:
        for step in range(steps):
            x, y = _batch(step)
            with mon.step(step, batch=(x, y)) as s:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)
                loss = nn.functional.mse_loss(out.float(), y)
                scaler.scale(loss).backward()
                if unscale_inside:
                    scaler.unscale_(opt)
                s.log(loss=loss)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return model, mon


def test_gradient_probes_read_the_unscaled_gradient(tmp_path):
    scaled, mon = _train(tmp_path / "scaled", init_scale=2.0**12, unscale_inside=False)
    unscaled, _ = _train(tmp_path / "unscaled", init_scale=2.0**12, unscale_inside=True)
    for a, b in zip(scaled.parameters(), unscaled.parameters(), strict=True):
        assert torch.equal(a, b)  # unscale_ early or inside step(): the same training
    assert any(isinstance(p, LossScale) for p in mon.probes)  # added for the scaler
    runs = Run(tmp_path / "scaled"), Run(tmp_path / "unscaled")
    for key in ("norms/grad_total", "norms/grad/0.weight", "updates/ratio_total"):
        got, want = (r.series(key).values for r in runs)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=key)
    grad = runs[1].series("norms/grad_total").values
    assert grad.min() > 1e-3 and grad.max() < 1e3  # the true gradient, not 4096 times it
    assert runs[0].series("amp/scale").values.tolist() == [2.0**12] * 8
    assert runs[0].series("amp/skipped").values.tolist() == [0.0] * 8


def test_steps_the_scaler_skips_are_marked(tmp_path):
    """A scale of 3e38 overflows the scaled float32 loss: the scaler skips those steps and
    halves the scale each time, until the gradients are finite (their squares still
    overflow float32 at scales near 1e38: the norms are accumulated wider)."""
    _train(tmp_path / "r", init_scale=3e38, unscale_inside=False)
    run = Run(tmp_path / "r")
    scale = run.series("amp/scale").values
    skipped = run.series("amp/skipped").values
    first_ok = int(np.argmin(skipped))
    assert first_ok >= 1 and skipped[:first_ok].all() and not skipped[first_ok:].any()
    np.testing.assert_allclose(scale[1 : first_ok + 1], scale[:first_ok] / 2, rtol=1e-6)
    updates = run.series("updates/norm_total")
    assert (updates.values[:first_ok] == 0).all()  # a skipped step moves nothing
    assert (updates.values[first_ok:] > 0).all()
    grads = run.series("norms/grad_total").values
    assert np.isfinite(grads[first_ok:]).all() and grads[first_ok:].max() < 1e3


def test_gradient_flow_reads_the_unscaled_output_gradient(tmp_path):
    probes = [GradientFlow(schedule=every(1))]
    _train(tmp_path / "scaled", init_scale=2.0**12, unscale_inside=False, probes=probes)
    probes = [GradientFlow(schedule=every(1))]
    _train(tmp_path / "one", init_scale=1.0, unscale_inside=False, probes=probes)
    key = "grad_flow/norm/0"
    np.testing.assert_allclose(
        Run(tmp_path / "scaled").series(key).values,
        Run(tmp_path / "one").series(key).values,
        rtol=1e-5,
    )


def test_curvature_inside_autocast_runs_in_the_parameters_dtype(tmp_path):
    model = _model()
    x, y = _batch(0)
    values = {}
    for autocast in (False, True):
        probe = Sharpness(schedule=every(1), lr=0.1, tol=1e-8)
        run_dir = tmp_path / str(autocast)
        with trainprobe.watch(model, [probe], run_dir=run_dir, loss_fn=MSE) as mon:
            # the step block ends inside autocast when enabled: the probe measures there
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                with mon.step(0, batch=(x, y)):
                    model(x).float().sum().backward()
        values[autocast] = Run(tmp_path / str(autocast)).series("sharpness/lambda_max").values
    np.testing.assert_allclose(values[True], values[False], rtol=1e-6)


def test_a_scaler_must_be_a_scaler(tmp_path):
    with pytest.raises(TypeError, match=r"expected a torch.amp.GradScaler"):
        trainprobe.watch(_model(), run_dir=tmp_path / "r", scaler=object())
