"""``activations/rms/<module>`` against a direct computation: a module called twice in
one step, half-precision outputs and the sums pooled over ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import trainprobe
from trainprobe.probes import ActivationStats, every
from trainprobe.probes.activations import _pooled
from trainprobe.store import Run


def _rms(outs: list[torch.Tensor]) -> float:
    flat = torch.cat([o.detach().double().reshape(-1) for o in outs])  # [N]
    return flat.square().mean().sqrt().item()


def _record(model: nn.Module, forward, tmp_path) -> tuple[Run, dict[str, list[torch.Tensor]]]:
    """Run ``forward()`` in one measured step; the outputs of every leaf module."""
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _i, out, key=name: outputs.setdefault(key, []).append(out.detach())
        )
        for name, m in model.named_modules()
        if name
    ]
    try:
        probe = ActivationStats(schedule=every(1), max_elements=None)
        with trainprobe.watch(model, [probe], run_dir=tmp_path / "r") as mon, mon.step(0):
            forward()
    finally:
        for h in handles:
            h.remove()
    return Run(tmp_path / "r"), outputs


def test_rms_pools_every_call_of_a_module_in_the_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64) + 0.5

    def forward():
        model(model[1](model[0](x)))  # "0" and "1" twice, "2" once

    run, outputs = _record(model, forward, tmp_path)
    assert len(outputs["0"]) == 2 and len(outputs["2"]) == 1
    for name, outs in outputs.items():
        rms = run.series(f"activations/rms/{name}").values[0]
        assert rms == pytest.approx(_rms(outs), rel=1e-12)
        mean = run.series(f"activations/mean/{name}").values[0]
        std = run.series(f"activations/std/{name}").values[0]
        assert rms**2 == pytest.approx(mean**2 + std**2, rel=1e-10)  # rms² = mean² + var


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_of_half_precision_outputs_accumulates_in_float32(tmp_path, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU()).to(dtype)
    x = (16 * torch.randn(32, 16)).to(dtype)  # Σx² ≈ 1.9e5 overflows float16 (max 65504)

    run, outputs = _record(model, lambda: model(x), tmp_path)
    for name, outs in outputs.items():
        assert outs[0].dtype == dtype
        got = run.series(f"activations/rms/{name}").values[0]
        assert math.isfinite(got)
        assert got == pytest.approx(_rms(outs), rel=1e-5)


def test_rms_from_sums_pooled_over_ranks():
    """The distributed path (sums over ranks, finished on the host) gives the same RMS."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=gen, dtype=torch.float64) + 1 for n in (7, 11)]
    sums = sum(np.array([p.numel(), p.sum().item(), p.dot(p).item(), 0.0]) for p in parts)  # [4]
    out = _pooled(sums, probe="activations", names=("0",), relus=(False,))
    assert out["activations/rms/0"] == pytest.approx(_rms(parts), rel=1e-12)
