"""GradSpectrum and WeightSpectrum: in real training loops and against direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from tests.cases import MODELS, batch, hook_count, train
from trainprobe.probes import every
from trainprobe.probes.base import StepContext, probe_settings
from trainprobe.probes.spectra import EveryStep, GradSpectrum
from trainprobe.probes.weight_spectrum import WeightSpectrum, recurrent_weights
from trainprobe.spectra import as_matrix, is_matrix
from trainprobe.store import Run

F64 = torch.float64


def _same_training(a, b) -> None:
    """Parameters, buffers and optimizer state bit-identical (the contract test's idea)."""
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, ta), tb in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(ta, tb), f"{name} differs"
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for key in state_a[i]:
            assert torch.equal(torch.as_tensor(state_a[i][key]), torch.as_tensor(state_b[i][key]))


def _matrices(model: str) -> dict[str, tuple[int, int]]:
    torch.manual_seed(0)
    named = MODELS[model]().named_parameters()
    return {n: tuple(as_matrix(p).shape) for n, p in named if is_matrix(p)}


def _expected_keys(model: str) -> set[str]:
    keys = set()
    for name, shape in _matrices(model).items():
        keys |= {f"grad_spectrum/sigma_{i}/{name}" for i in range(min(3, *shape))}
        keys |= {f"weight_spectrum/sigma_{i}/{name}" for i in range(min(2, *shape))}
        for metric in ("stable_rank", "effective_rank", "energy_top_r", "slow_ratio"):
            keys.add(f"grad_spectrum/{metric}/{name}")
        for metric in ("spectral_norm", "stable_rank", "residual"):
            keys.add(f"weight_spectrum/{metric}/{name}")
    if model == "rnn":
        keys |= {f"weight_spectrum/gate_{g}/rnn.weight_hh_l0" for g in "rzn"}
    return keys


def _check_range(key: str, values, shapes: dict[str, tuple[int, int]]) -> None:
    metric, layer = key.split("/")[1], key.split("/", 2)[2]
    eps = 1e-5
    if metric in ("stable_rank", "effective_rank"):
        assert (values >= 1 - eps).all(), key
    if key.startswith("grad_spectrum/effective_rank"):
        assert (values <= min(shapes[layer]) + eps).all(), key
    if metric in ("energy_top_r", "slow_ratio"):
        assert ((values >= 0) & (values <= 1 + eps)).all(), key
    if metric in ("spectral_norm", "residual") or metric.startswith(("sigma_", "gate_")):
        assert (values >= 0).all(), key


@pytest.mark.parametrize("model", sorted(MODELS))
def test_probes_in_training_record_documented_keys_and_leave_training_alone(tmp_path, model):
    reference = train(model, steps=6)
    rng = torch.get_rng_state()
    probes = [GradSpectrum(schedule=every(2)), WeightSpectrum(k=2, schedule=every(3))]
    watched = train(model, steps=6, probes=probes, run_dir=tmp_path / "run")
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the global RNG
    _same_training(reference, watched)
    assert hook_count(watched[0]) == 0
    run = Run(tmp_path / "run")
    keys = set(run.keys()) - set(run.keys("scalars/"))
    assert keys == _expected_keys(model)
    documented = {p.name: p.keys for p in probes}
    shapes = _matrices(model)
    for key in keys:
        series = run.series(key)
        grad = key.startswith("grad_spectrum/")
        assert series.steps.tolist() == ([0, 2, 4] if grad else [0, 3]), key
        assert all(math.isfinite(v) for v in series.values), key
        assert any(p.matches(key) for p in documented[key.split("/")[0]]), key
        _check_range(key, series.values, shapes)
        if key.startswith("grad_spectrum/slow_ratio/"):
            assert series.values[0] == 1.0  # the EMA starts at the first gradient
        if key.startswith("weight_spectrum/spectral_norm/"):  # a lower bound of σ_0
            sigma_0 = run.series(key.replace("spectral_norm", "sigma_0")).values
            assert (series.values <= sigma_0 * (1 + 1e-5)).all()
            # a few percent low at most: the GRU's top is near-degenerate (σ_1/σ_0 = 0.96)
            assert series.values[-1] == pytest.approx(sigma_0[-1], rel=5e-2)
    assert run.meta["probes"][0]["schedule"] == "every step (running state), records at every(2)"


def test_documented_patterns_cover_every_key_form():
    grad, weight = GradSpectrum.keys, WeightSpectrum.keys
    for metric in (
        "sigma_0",
        "sigma_12",
        "stable_rank",
        "effective_rank",
        "energy_top_r",
        "slow_ratio",
    ):
        assert any(p.matches(f"grad_spectrum/{metric}/block.linear1.weight") for p in grad)
    for metric in ("spectral_norm", "stable_rank", "residual", "gate_r", "gate_o", "sigma_1"):
        assert any(p.matches(f"weight_spectrum/{metric}/rnn.weight_hh_l0") for p in weight)
    assert not any(p.matches("grad_spectrum/spectral_norm") for p in grad)
    assert not any(p.matches("grad_spectrum/x/y") for p in weight)


class _Tiny(nn.Module):
    """A GRU and a linear head in float64: exact references."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # [B, T, 4]
        return self.head(out[:, -1])


def _tiny_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(5, 3, 2, generator=gen, dtype=F64)
    return x, torch.randn(5, 3, generator=gen, dtype=F64)


def _train_tiny(probes, run_dir, steps=7):
    """SGD on :class:`_Tiny`; returns the gradients and weights of every step."""
    torch.manual_seed(0)
    model = _Tiny().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    grads, weights = [], []
    with trainprobe.watch(model, probes, run_dir=run_dir, on_probe_error="raise") as mon:
        for step in range(steps):
            x, y = _tiny_data(step)
            with mon.step(step):
                F.mse_loss(model(x), y).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
    return grads, weights


def _closed_form_ema(gs: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``ema_T = α^T g_0 + (1 − α) Σ_{t=1..T} α^{T−t} g_t``."""
    last = len(gs) - 1
    return alpha**last * gs[0] + (1 - alpha) * sum(
        alpha ** (last - t) * gs[t] for t in range(1, last + 1)
    )


def test_grad_spectrum_equals_direct_computation_and_the_closed_form_ema(tmp_path):
    alpha = 0.8
    probe = GradSpectrum(k=2, energy_rank=1, alpha=alpha, schedule=every(3))
    grads, _ = _train_tiny([probe], tmp_path / "r")
    run = Run(tmp_path / "r")
    matrices = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"]
    assert sorted(probe.slow_gradients) == sorted(matrices)  # biases have no spectrum
    for name in matrices:
        history = [g[name] for g in grads]
        torch.testing.assert_close(
            probe.slow_gradients[name], _closed_form_ema(history, alpha), rtol=1e-12, atol=1e-15
        )
        for metric in (
            "sigma_0",
            "sigma_1",
            "stable_rank",
            "effective_rank",
            "energy_top_r",
            "slow_ratio",
        ):
            assert run.series(f"grad_spectrum/{metric}/{name}").steps.tolist() == [0, 3, 6]
        for i, step in enumerate([0, 3, 6]):
            g = history[step]
            sigma = torch.linalg.svdvals(g)
            fro_sq = (g * g).sum()
            p = sigma / sigma.sum()
            ema = _closed_form_ema(history[: step + 1], alpha)
            slow, fast = (ema * ema).sum(), ((g - ema) ** 2).sum()
            expected = {
                "sigma_0": sigma[0],
                "sigma_1": sigma[1],
                "stable_rank": fro_sq / sigma[0] ** 2,
                "effective_rank": torch.exp(-torch.special.xlogy(p, p).sum()),
                "energy_top_r": sigma[0] ** 2 / fro_sq,
                "slow_ratio": slow / (slow + fast),
            }
            for metric, value in expected.items():
                recorded = run.series(f"grad_spectrum/{metric}/{name}").values[i]
                assert recorded == pytest.approx(value.item(), rel=1e-10), (metric, name, step)


def test_measure_returns_nothing_between_record_steps_but_updates_the_ema():
    probe = GradSpectrum(schedule=every(5), alpha=0.5)
    assert isinstance(probe.due, EveryStep) and probe.schedule == every(5)
    assert all(probe.due(step) for step in range(12))
    assert GradSpectrum(schedule=every(5), alpha=None).due == every(5)
    model = nn.Linear(3, 2).double()
    params = dict(model.named_parameters())
    g0, g1 = torch.ones(2, 3, dtype=F64), torch.arange(6, dtype=F64).reshape(2, 3)
    model.weight.grad, model.bias.grad = g0.clone(), torch.ones(2, dtype=F64)
    assert "grad_spectrum/sigma_0" in probe.measure(StepContext(0, model, params))
    given = g1.clone()
    model.weight.grad = given
    assert probe.measure(StepContext(1, model, params)) == {}
    assert model.weight.grad is given and torch.equal(given, g1)  # read, never written
    torch.testing.assert_close(probe.slow_gradients["weight"], 0.5 * g0 + 0.5 * g1)
    with pytest.raises(TypeError):
        probe.slow_gradients["weight"] = g0  # a read-only view
    probe.reset()
    assert dict(probe.slow_gradients) == {}


def test_without_slow_tracking_the_probe_runs_on_its_schedule_only(tmp_path):
    schedule = every(2)
    probe = GradSpectrum(alpha=None, schedule=schedule)
    assert probe.schedule is schedule and probe_settings(probe)["alpha"] is None
    train("mlp", steps=5, probes=[probe], run_dir=tmp_path / "r")
    run = Run(tmp_path / "r")
    assert not run.keys("grad_spectrum/slow_ratio")
    assert run.series("grad_spectrum/stable_rank/0.weight").steps.tolist() == [0, 2, 4]
    assert dict(probe.slow_gradients) == {}


def test_the_ema_restarts_in_a_new_run(tmp_path):
    probe = GradSpectrum(schedule=every(1))
    train("mlp", steps=3, probes=[probe], run_dir=tmp_path / "a")
    train("mlp", steps=3, probes=[probe], run_dir=tmp_path / "b")  # steps start at 0 again
    for run_dir in ("a", "b"):
        run = Run(tmp_path / run_dir)
        for key in run.keys("grad_spectrum/slow_ratio"):
            ratios = run.series(key).values
            assert ratios[0] == 1.0 and ratios[1] < 1.0, (run_dir, key)


def test_randomized_path_in_the_probe(tmp_path):
    """``0.weight`` ``[16, 8]`` is above ``exact_max=4``: its top 3 come from the sketch."""
    probe = GradSpectrum(
        k=2, energy_rank=3, exact_max=4, oversample=2, power_iters=4, alpha=None, schedule=every(1)
    )
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    x, y = batch("mlp", 0)
    F.cross_entropy(model(x), y).backward()
    out = probe.measure(StepContext(0, model, dict(model.named_parameters())))
    grad = model.get_parameter("0.weight").grad
    exact = torch.linalg.svdvals(grad)
    index = out["grad_spectrum/sigma_0"].names.index("0.weight")
    for i in range(2):
        found = out[f"grad_spectrum/sigma_{i}"].values[index]
        assert found <= exact[i] * (1 + 1e-6)
        assert found == pytest.approx(exact[i].item(), rel=1e-2)
    effective = out["grad_spectrum/effective_rank"].values[index]
    p = exact / exact.sum()
    assert 1 <= effective <= min(3, torch.exp(-torch.special.xlogy(p, p).sum()).item()) + 1e-5
    energy = out["grad_spectrum/energy_top_r"].values[index]
    assert energy == pytest.approx(((exact[:3] ** 2).sum() / (grad**2).sum()).item(), rel=1e-2)
    reference, rng = train("mlp", steps=4), torch.get_rng_state()
    _same_training(reference, train("mlp", steps=4, probes=[probe], run_dir=tmp_path / "r"))
    assert torch.equal(torch.get_rng_state(), rng)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.rnn, self.conv = nn.LSTM(3, 6), nn.RNN(3, 5), nn.Conv1d(2, 4, 3)


def test_weight_spectrum_gates_state_and_accuracy():
    torch.manual_seed(0)
    model = _Recurrent().double()
    params = dict(model.named_parameters())
    assert recurrent_weights(model) == {"lstm.weight_hh_l0": "LSTM", "rnn.weight_hh_l0": "RNN_TANH"}
    probe = WeightSpectrum(cold_iters=300, iters=2, schedule=every(1))
    for step in range(2):  # cold, then warm-started
        out = probe.measure(StepContext(step, model, params))
        assert sorted(k for k in out if "gate" in k) == [
            f"weight_spectrum/gate_{g}" for g in "fgio"
        ]
        blocks = model.lstm.weight_hh_l0.detach().chunk(4)  # i, f, g, o
        for g, block in zip("ifgo", blocks, strict=True):
            value = out[f"weight_spectrum/gate_{g}"]
            assert value.names == ("lstm.weight_hh_l0",)
            top = torch.linalg.svdvals(block)[0].item()
            assert top * (1 - 1e-8) <= value.values[0] <= top * (1 + 1e-12)
        norms = out["weight_spectrum/spectral_norm"]
        for name, value in zip(norms.names, norms.values, strict=True):
            matrix = as_matrix(params[name].detach())
            assert value == pytest.approx(torch.linalg.svdvals(matrix)[0].item(), rel=1e-8)
        assert (out["weight_spectrum/residual"].values < 1e-6).all()
        assert "weight_spectrum/sigma_0" not in out  # k = 0: no exact SVD
    gate_keys = {f"lstm.weight_hh_l0/{g}" for g in "ifgo"}
    assert set(probe._vectors) == set(norms.names) | gate_keys  # the only state kept
    assert probe_settings(probe) == {"k": 0, "iters": 2, "cold_iters": 300, "seed": 0}
