"""Probe values against independent references (float64, exact up to rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from tests.cases import TinyRNN
from trainprobe.probes import (
    ActivationStats,
    LayerNorms,
    LearningRate,
    NonFiniteGuard,
    UpdateNorms,
    every,
)
from trainprobe.store import Run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).double()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(9, 5, generator=gen, dtype=torch.float64), torch.randn(
        9, 2, generator=gen, dtype=torch.float64
    )


def test_norms_and_updates_equal_direct_computation(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5, weight_decay=0.01)
    expected: dict[str, list[float]] = {}
    probes = [LayerNorms(schedule=every(2)), UpdateNorms(schedule=every(2))]
    with trainprobe.watch(model, probes, run_dir=tmp_path / "r", on_probe_error="raise") as mon:
        for step in range(6):
            x, y = _data(step)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with mon.step(step):
                F.mse_loss(model(x), y).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            if step % 2:
                continue
            for n, p in model.named_parameters():
                delta = torch.linalg.norm(p.detach() - before[n]).item()
                expected.setdefault(f"norms/weight/{n}", []).append(
                    torch.linalg.norm(before[n]).item()
                )
                expected.setdefault(f"norms/grad/{n}", []).append(
                    torch.linalg.norm(grads[n]).item()
                )
                expected.setdefault(f"updates/norm/{n}", []).append(delta)
                expected.setdefault(f"updates/ratio/{n}", []).append(
                    delta / torch.linalg.norm(before[n]).item()
                )
            flat_before = torch.cat([b.reshape(-1) for b in before.values()])
            flat_after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            flat_grad = torch.cat([g.reshape(-1) for g in grads.values()])
            expected.setdefault("norms/grad_total", []).append(torch.linalg.norm(flat_grad).item())
            expected.setdefault("updates/ratio_total", []).append(
                (
                    torch.linalg.norm(flat_after - flat_before) / torch.linalg.norm(flat_before)
                ).item()
            )
    run = Run(tmp_path / "r")
    assert len(expected) == 4 * 4 + 2
    for key, values in expected.items():
        series = run.series(key)
        assert series.steps.tolist() == [0, 2, 4], key
        np.testing.assert_allclose(series.values, values, rtol=1e-10, err_msg=key)


def test_update_ratio_is_nan_for_an_all_zero_tensor(tmp_path):
    model = _model()
    with torch.no_grad():
        model[2].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trainprobe.watch(model, [UpdateNorms(schedule=every(1))], run_dir=tmp_path / "r") as mon:
        for step in range(2):
            x, y = _data(step)
            with mon.step(step):
                F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    run = Run(tmp_path / "r")
    ratio = run.series("updates/ratio/2.bias").values
    assert np.isnan(ratio[0]) and np.isfinite(ratio[1]) and ratio[1] > 0
    assert run.series("updates/norm/2.bias").values[0] > 0
    assert np.isfinite(run.series("updates/ratio_total").values).all()


def test_grad_norms_skip_parameters_without_grad(tmp_path):
    model = _model()
    with trainprobe.watch(model, [LayerNorms(schedule=every(1))], run_dir=tmp_path / "r") as mon:
        with mon.step(0):
            model[0](torch.ones(1, 5, dtype=torch.float64)).sum().backward()  # only layer 0
    run = Run(tmp_path / "r")
    assert run.layers("norms/grad") == ["0.weight", "0.bias"]
    assert len(run.layers("norms/weight")) == 4


def test_activation_stats_equal_direct_computation(tmp_path):
    model = _model()
    shared = nn.Sequential(model[0], model[1], model[0:0], model[2])  # reuses modules
    outputs: dict[str, list[torch.Tensor]] = {"0": [], "1": [], "2": []}
    handles = [
        model[i].register_forward_hook(
            lambda _m, _i, out, key=str(i): outputs[key].append(out.detach())
        )
        for i in range(3)
    ]
    with (
        trainprobe.watch(
            model, [ActivationStats(schedule=every(1))], run_dir=tmp_path / "r"
        ) as mon,
        mon.step(0),
    ):
        x, _ = _data(0)
        shared(x)
        model(x * 2)  # a second call of every module in the same step
    for h in handles:
        h.remove()
    run = Run(tmp_path / "r")
    for name, outs in outputs.items():
        flat = torch.cat([o.reshape(-1) for o in outs])
        assert run.series(f"activations/mean/{name}").values[0] == pytest.approx(
            flat.mean().item(), rel=1e-12
        )
        assert run.series(f"activations/std/{name}").values[0] == pytest.approx(
            flat.std(correction=0).item(), rel=1e-10
        )
    relu_out = torch.cat([o.reshape(-1) for o in outputs["1"]])
    assert run.series("activations/zero_frac/1").values[0] == pytest.approx(
        (relu_out == 0).double().mean().item(), rel=1e-12
    )
    assert "activations/zero_frac/0" not in run  # not a ReLU-family module


def test_activation_stats_on_tuple_outputs_and_chosen_modules(tmp_path):
    torch.manual_seed(0)
    model = TinyRNN()
    probe = ActivationStats(schedule=every(1), modules=["rnn"])
    with trainprobe.watch(model, [probe], run_dir=tmp_path / "r") as mon, mon.step(0):
        x = torch.randn(3, 8)
        out, _ = model.rnn(x.reshape(3, 4, 2))
    run = Run(tmp_path / "r")
    assert run.keys("activations") == [
        "activations/mean/rnn",
        "activations/std/rnn",
        "activations/rms/rnn",
    ]
    assert run.series("activations/mean/rnn").values[0] == pytest.approx(
        out.mean().item(), rel=1e-6
    )


@pytest.mark.parametrize(("max_elements", "rows"), [(None, 9), (14, 2), (7, 1), (63, 9), (3, 0)])
def test_activation_stats_use_the_leading_rows(tmp_path, max_elements, rows):
    """Whole leading rows; a row larger than the cap gives its first elements (rows=0)."""
    model = _model()
    x, _ = _data(0)  # [9, 5] -> first layer output [9, 7]
    probe = ActivationStats(schedule=every(1), modules=["0"], max_elements=max_elements)
    with trainprobe.watch(model, [probe], run_dir=tmp_path / "r") as mon, mon.step(0):
        out = model[0](x)
    run = Run(tmp_path / "r")
    expected = out.detach()[:rows] if rows else out.detach().reshape(-1)[:max_elements]
    assert run.series("activations/mean/0").values[0] == pytest.approx(expected.mean().item())
    assert run.series("activations/std/0").values[0] == pytest.approx(
        expected.std(correction=0).item()
    )
    assert run.meta["probes"][0]["settings"]["max_elements"] == max_elements


def test_activation_stats_bad_modules():
    probe = ActivationStats(modules=["nope"])
    with pytest.raises(ValueError, match=r"no module named \['nope'\] in the model"):
        probe.attach(_model())


def test_nonfinite_guard_names_the_first_bad_tensor(tmp_path):
    model = _model()
    with trainprobe.watch(
        model, [NonFiniteGuard()], run_dir=tmp_path / "r", on_probe_error="raise"
    ) as mon:
        for step in range(4):
            x, y = _data(step)
            with mon.step(step) as s:
                loss = F.mse_loss(model(x), y)
                loss.backward()
                if step == 2:
                    model[2].weight.grad[0, 1] = float("nan")
                    model[2].bias.grad[0] = float("inf")
                    loss = loss * float("inf")
                if step == 3:
                    with torch.no_grad():
                        model[0].bias[1] = float("-inf")
                s.log(loss=loss)
            model.zero_grad()
    run = Run(tmp_path / "r")
    params = run.meta["model"]["params"]
    assert run.series("nonfinite/grad").values.tolist() == [0, 0, 2, 0]
    assert params[int(run.series("nonfinite/first_grad").values[2])] == "2.weight"
    assert run.series("nonfinite/loss").values.tolist() == [0, 0, 1, 0]
    assert run.series("nonfinite/param").values.tolist() == [0, 0, 0, 1]
    assert params[int(run.series("nonfinite/first_param").values[3])] == "0.bias"
    assert run.series("nonfinite/first_grad").values[[0, 1, 3]].tolist() == [-1, -1, -1]


def test_learning_rate_per_group(tmp_path):
    model = _model()
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}], lr=0.01
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with trainprobe.watch(model, [LearningRate()], run_dir=tmp_path / "r", optimizer=opt) as mon:
        for step in range(3):
            with mon.step(step):
                pass
            opt.step()
            sched.step()
    run = Run(tmp_path / "r")
    np.testing.assert_allclose(run.series("optim/lr/0").values, [0.1, 0.05, 0.025])
    np.testing.assert_allclose(run.series("optim/lr/1").values, [0.01, 0.005, 0.0025])


def test_tensor_helpers_refuse_empty_input():
    from trainprobe.probes.tensors import stack_scalars, stacked_norms

    with pytest.raises(ValueError, match="stacked_norms needs at least one tensor"):
        stacked_norms([])
    with pytest.raises(ValueError, match="stack_scalars needs at least one tensor"):
        stack_scalars([])
    mixed = stack_scalars([torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64)])
    assert mixed.dtype == torch.float64 and mixed.tolist() == [1.0, 2.0]


def test_nonfinite_guard_does_not_flag_large_half_precision_values(tmp_path):
    model = nn.Linear(100, 1).half()
    with torch.no_grad():
        model.weight.fill_(60000.0)  # finite in float16; its norm (6e5) is not
    with trainprobe.watch(model, [NonFiniteGuard()], run_dir=tmp_path / "r") as mon:
        with mon.step(0) as s:
            s.log(loss=1.5)  # a float loss is checked on the host
    run = Run(tmp_path / "r")
    assert run.series("nonfinite/param").values.tolist() == [0.0]
    assert run.series("nonfinite/loss").values.tolist() == [0.0]
    assert "nonfinite/grad" not in run  # no gradients this step


def _reraise(key, err):
    raise err


def test_on_host_values_must_keep_to_their_probe():
    from trainprobe.monitor.transfer import to_host
    from trainprobe.probes.base import OnHost

    ok = OnHost(torch.tensor([1.0, 2.0]), lambda a: {"p/sum": a.sum()})
    assert to_host([(3, {"p/x": ok})], _reraise)[0].values == {"p/sum": 3.0}
    stray = OnHost(torch.tensor([1.0]), lambda a: {"q/sum": a.sum()})
    with pytest.raises(ValueError, match=r"OnHost.finish wrote keys \['q/sum'\] outside 'p/'"):
        to_host([(0, {"p/x": stray})], _reraise)
    errors = []
    kept = to_host([(0, {"p/x": stray, "p/y": 2.0})], lambda k, e: errors.append(k))
    assert kept[0].values == {"p/y": 2.0} and errors == ["p/x"]


def test_per_layer_names_must_match_values():
    from trainprobe.monitor.transfer import to_host
    from trainprobe.probes.base import PerLayer

    bad = PerLayer(("a", "b"), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"PerLayer has 2 names but 3 values; give one name"):
        to_host([(0, {"p/x": bad})], _reraise)


def test_bfloat16_values_reach_the_store(tmp_path):
    model = nn.Linear(4, 2).to(torch.bfloat16)
    with trainprobe.watch(model, [LayerNorms(schedule=every(1))], run_dir=tmp_path / "r") as mon:
        with mon.step(0) as s:
            loss = model(torch.ones(3, 4, dtype=torch.bfloat16)).float().pow(2).mean()
            loss.backward()
            s.log(loss=model(torch.ones(1, 4, dtype=torch.bfloat16)).sum())  # a bf16 scalar
    run = Run(tmp_path / "r")
    assert run.meta["status"] == "finished"
    expected = torch.linalg.vector_norm(model.weight.detach().float()).item()
    assert run.series("norms/weight/weight").values[0] == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(run.series("scalars/loss").values[0])


def test_activation_zero_fraction_counts_exact_zeros_not_nan(tmp_path):
    """A NaN batch must not read as dead units (sign(NaN) is 0; NaN != 0)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    x = torch.randn(16, 4)
    x[:8] = float("nan")
    with trainprobe.watch(
        model, [ActivationStats(schedule=every(1))], run_dir=tmp_path / "r"
    ) as mon:
        with mon.step(0):
            out = model(x)
    expected = float((out[8:] == 0).float().sum()) / out.numel()
    zero = Run(tmp_path / "r").series("activations/zero_frac/1").values[0]
    assert zero == pytest.approx(expected)
