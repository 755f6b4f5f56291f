"""AdamHealth against closed forms and a direct float64 computation from the state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import AdamHealth, every
from trainprobe.store import Run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    return x, torch.randn(9, 2, generator=gen, dtype=torch.float64)


def _train(tmp_path, opt_class, steps: int, **opt_kwargs):
    model = _model()
    opt = opt_class(model.parameters(), **opt_kwargs)
    expected: dict[str, list[float]] = {}
    probe = AdamHealth(schedule=every(1))
    with trainprobe.watch(
        model, [probe], run_dir=tmp_path / "r", optimizer=opt, on_probe_error="raise"
    ) as mon:
        for step in range(steps):
            x, y = _data(step)
            with mon.step(step):
                F.mse_loss(model(x), y).backward()
                opt.step()  # inside the block: the state holds this step's gradient
            if "betas" in opt.param_groups[0]:
                for name, p in model.named_parameters():
                    for key, value in _direct(opt, p, opt.param_groups[0]).items():
                        expected.setdefault(f"adam/{key}/{name}", []).append(value)
            opt.zero_grad()
    return Run(tmp_path / "r"), expected


def _direct(opt, p, group) -> dict[str, float]:
    state = opt.state[p]
    (beta1, beta2), eps, t = group["betas"], group["eps"], float(state["step"])
    v_hat = state["exp_avg_sq"] / (1 - beta2**t)
    m_hat = state["exp_avg"] / (1 - beta1**t)
    root = v_hat.sqrt()
    seen = root > 0
    return {
        "eps_share": float(((root > 0) & (root <= eps)).double().sum() / (root > 0).sum()),
        "grad_to_v": float(p.grad.square().mean() / v_hat.mean()),
        "update_rms": float((m_hat / (root + eps)).square().mean().sqrt()),
        "eps_shrink": float(
            (
                (m_hat / (root + eps))[seen].square().sum() / (m_hat / root)[seen].square().sum()
            ).sqrt()
        ),
    }


def test_adam_health_equals_a_direct_computation_from_the_state(tmp_path):
    run, expected = _train(tmp_path, torch.optim.AdamW, 5, lr=1e-2, eps=0.1)
    assert len(expected) == 4 * 4
    for key, values in expected.items():
        np.testing.assert_allclose(run.series(key).values, values, rtol=1e-6, err_msg=key)
    shares = np.array([expected[k] for k in expected if "/eps_share/" in k])
    assert shares.max() > 0 and shares.min() < 1  # ε = 1e-3 dominates some, not all
    totals = run.series("adam/grad_to_v_max").values
    ratios = np.array([expected[k] for k in expected if "/grad_to_v/" in k])
    np.testing.assert_allclose(totals, ratios.max(axis=0), rtol=1e-6)


def test_after_the_first_step_the_closed_forms_hold(tmp_path):
    """After one step v̂ = g² and m̂ = g: g²/v̂ is exactly 1, the step g / (|g| + ε) has RMS
    just under 1 for a tiny ε, and with ε = 1e3 every element is ε-dominated."""
    run, _ = _train(tmp_path / "a", torch.optim.Adam, 1, lr=1e-3, eps=1e-12)
    keys = run.keys()
    for key in [k for k in keys if "/grad_to_v/" in k]:
        assert run.series(key).values[0] == pytest.approx(1.0, rel=1e-6)
    for key in [k for k in keys if "/update_rms/" in k]:
        assert run.series(key).values[0] == pytest.approx(1.0, rel=1e-6)
    for key in [k for k in keys if "/eps_shrink/" in k]:
        assert run.series(key).values[0] == pytest.approx(1.0, rel=1e-6)
    run, _ = _train(tmp_path / "b", torch.optim.Adam, 1, lr=1e-3, eps=1e3)
    assert run.series("adam/eps_share_total").values[0] == 1.0


def test_eps_shrink_is_the_closed_form_for_a_constant_gradient(tmp_path):
    """A gradient of 3 in every element: after one step m̂ = g, √v̂ = |g|, so the step with
    ε is 3 / (3 + ε) and without it 1; with ε = 6 the shrink is exactly 1/3."""
    model = nn.Linear(4, 1, bias=False).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=6.0)
    with trainprobe.watch(
        model,
        [AdamHealth(schedule=every(1))],
        run_dir=tmp_path / "r",
        optimizer=opt,
        on_probe_error="raise",
    ) as mon:
        with mon.step(0):
            model(torch.full((1, 4), 3.0, dtype=torch.float64)).sum().backward()
            opt.step()
    run = Run(tmp_path / "r")
    assert run.series("adam/eps_shrink/weight").values[0] == pytest.approx(1 / 3, rel=1e-6)
    assert run.series("adam/eps_shrink_total").values[0] == pytest.approx(1 / 3, rel=1e-6)


def test_an_optimizer_without_adam_state_records_nothing(tmp_path):
    run, _ = _train(tmp_path, torch.optim.SGD, 2, lr=0.1, momentum=0.9)
    assert not [k for k in run.keys() if k.startswith("adam/")]  # noqa: SIM118


def test_max_elements_reads_the_leading_elements_only(tmp_path):
    model = nn.Linear(400, 1, bias=False).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-2)
    probe = AdamHealth(schedule=every(1), max_elements=100)
    with trainprobe.watch(
        model, [probe], run_dir=tmp_path / "r", optimizer=opt, on_probe_error="raise"
    ) as mon:
        x = torch.zeros(3, 400, dtype=torch.float64)
        x[:, :100] = 1.0  # the first 100 weights get gradients of 1, the rest none
        with mon.step(0):
            model(x).sum().backward()
            opt.step()
    assert Run(tmp_path / "r").series("adam/eps_share/weight").values[0] == 0.0  # all read: |g| 3


def test_elements_that_never_had_a_gradient_are_not_counted_as_eps_dominated(tmp_path):
    """An embedding table whose unused rows never get a gradient: v̂ = 0 there, and those
    rows do not move at all, so they are left out of the ε-dominated share."""
    model = nn.Embedding(10, 4).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    probe = AdamHealth(schedule=every(1))
    with trainprobe.watch(
        model, [probe], run_dir=tmp_path / "r", optimizer=opt, on_probe_error="raise"
    ) as mon:
        with mon.step(0):
            model(torch.tensor([1, 2])).sum().backward()  # rows 1 and 2 only
            opt.step()
    assert Run(tmp_path / "r").series("adam/eps_share/weight").values[0] == 0.0
