"""GradNoise: unbiased on linear regression with a known noise covariance; exact algebra."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import trainprobe
from tests.cases import MODELS, train
from tests.contract import watched_run
from trainprobe.curvature import criterion_loss
from trainprobe.functional import Objective
from trainprobe.gradients import microbatch_noise, noise_scale, per_sample_gradients
from trainprobe.probes import PerLayer, StepContext, at_steps, every
from trainprobe.probes.noise import GradNoise
from trainprobe.store import Run

CE = criterion_loss(nn.CrossEntropyLoss())

# Linear regression y = xᵀw* + ε, x ~ N(0, S = diag(s)), ε ~ N(0, σ²), loss ½(xᵀw − y)², at
# w = w* + d. Per-example gradient g = x (xᵀd − ε): G = S d, and by Isserlis' theorem
# E‖g‖² = tr(S) (dᵀSd + σ²) + 2 dᵀS²d, so tr(Σ) = tr(S) (dᵀSd + σ²) + dᵀS²d.
S = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
SIGMA = 0.5
W_STAR = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
D = torch.tensor([0.3, 0.2, -0.4, 0.1], dtype=torch.float64)
GRAD_SQ = float((S * D) @ (S * D))
TRACE_COV = float(S.sum() * (D @ (S * D) + SIGMA**2) + GRAD_SQ)
BATCH, BATCHES = 8, 400


def _squared_error(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x)[:, 0] - y).pow(2).mean()


def _regression():
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((W_STAR + D)[None])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES, BATCH, 4, generator=gen, dtype=torch.float64) * S.sqrt()
    y = x @ W_STAR + SIGMA * torch.randn(BATCHES, BATCH, generator=gen, dtype=torch.float64)
    return model, x, y


def _measure(probe: GradNoise, model: nn.Module, data, loss_fn=CE) -> dict[str, float]:
    ctx = StepContext(
        step=0, model=model, params=dict(model.named_parameters()), batch=data, loss_fn=loss_fn
    )
    out = {}
    for key, value in probe.measure(ctx).items():
        if isinstance(value, PerLayer):
            out.update(
                {f"{key}/{n}": v for n, v in zip(value.names, value.values.tolist(), strict=True)}
            )
        else:
            out[key] = float(value)
    return out


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


@pytest.mark.parametrize("microbatches", [None, 4])
def test_estimators_are_unbiased_on_linear_regression(microbatches):
    model, x, y = _regression()
    probe = GradNoise(microbatches=microbatches)
    runs = [_measure(probe, model, (x[k], y[k]), _squared_error) for k in range(BATCHES)]
    trace = torch.tensor([r["grad_noise/trace_cov"] for r in runs], dtype=torch.float64)
    grad_sq = torch.tensor([r["grad_noise/grad_sq"] for r in runs], dtype=torch.float64)
    for values, truth in ((trace, TRACE_COV), (grad_sq, GRAD_SQ)):
        mean, stderr = _mean_and_stderr(values)
        assert abs(mean - truth) <= 4 * stderr, (mean, truth, stderr)
    # B_simple as the ratio of the means, with its delta-method standard error
    ratio = float(trace.mean() / grad_sq.mean())
    cov = torch.cov(torch.stack([trace, grad_sq]))
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / float(grad_sq.mean()) ** 2
    assert abs(ratio - TRACE_COV / GRAD_SQ) <= 4 * math.sqrt(float(var) / BATCHES)
    assert all(r["grad_noise/batch_size"] == BATCH for r in runs)


def test_the_plug_in_estimate_is_biased_by_the_noise_so_the_check_has_power():
    _, x, y = _regression()
    residual = x @ (W_STAR + D) - y  # [batches, B]
    plug_in = (x * residual[..., None]).mean(dim=1).pow(2).sum(dim=1)  # [batches] ‖ḡ‖²
    mean, stderr = _mean_and_stderr(plug_in)
    assert abs(mean - GRAD_SQ) > 4 * stderr
    assert abs(mean - (GRAD_SQ + TRACE_COV / BATCH)) <= 4 * stderr


def test_per_layer_values_match_the_textbook_formulas():
    torch.manual_seed(0)
    model = MODELS["mlp"]().double()
    gen = torch.Generator().manual_seed(1)
    data = (
        torch.randn(10, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (10,), generator=gen),
    )
    got = _measure(GradNoise(), model, data)
    per = per_sample_gradients(Objective(model, CE), data).per_param()
    traces, signals = 0.0, 0.0
    for name, g in per.items():
        rows = g.reshape(10, -1)  # [B, p_l]
        mean_sq, bar_sq = float(rows.pow(2).sum(1).mean()), float(rows.mean(0).pow(2).sum())
        trace, signal = 10 / 9 * (mean_sq - bar_sq), (10 * bar_sq - mean_sq) / 9
        assert got[f"grad_noise/snr/{name}"] == pytest.approx(signal * 10 / trace, rel=1e-9)
        traces, signals = traces + trace, signals + signal
    assert got["grad_noise/trace_cov"] == pytest.approx(traces, rel=1e-10)
    assert got["grad_noise/grad_sq"] == pytest.approx(signals, rel=1e-10)
    assert got["grad_noise/b_simple"] == pytest.approx(traces / signals, rel=1e-9)
    singles = _measure(GradNoise(microbatches=10), model, data)  # b = 1: the same estimator
    for key, value in got.items():
        assert singles[key] == pytest.approx(value, rel=1e-9), key


@pytest.mark.parametrize(
    ("model", "probe"),
    [
        ("cnn", lambda: GradNoise(schedule=every(1))),
        ("cnn", lambda: GradNoise(microbatches=4, schedule=every(1))),
        ("mlp", lambda: GradNoise(method="loop", schedule=every(1))),
    ],
)
def test_training_is_bit_identical_and_keys_are_documented(tmp_path, model, probe):
    run, watched = watched_run(tmp_path, model, [probe()], steps=4)
    keys = run.keys("grad_noise")
    assert {"grad_noise/b_simple", "grad_noise/batch_size"} <= set(keys)
    assert len([k for k in keys if k.startswith("grad_noise/snr/")]) == len(
        list(watched[0].parameters())
    )
    for key in keys:
        assert all(math.isfinite(v) for v in run.series(key).values.ravel()), key


def test_auto_falls_back_to_the_loop_once_for_an_rnn(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train("rnn", steps=3, probes=[GradNoise(schedule=every(1))], run_dir=tmp_path / "run")
    fallbacks = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallbacks) == 1
    assert len(Run(tmp_path / "run").series("grad_noise/b_simple")) == 3


def test_a_missing_loss_disables_the_probe_with_the_fix(tmp_path):
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    data = (torch.randn(6, 8), torch.randint(0, 3, (6,)))
    with pytest.warns(RuntimeWarning, match="needs a loss: pass loss_fn= to watch"):
        with trainprobe.watch(
            model, [GradNoise(schedule=at_steps(0))], run_dir=tmp_path / "a"
        ) as mon:
            with mon.step(0, batch=data):
                pass
    with pytest.raises(ValueError, match=r"needs data: pass batch= to mon\.step"):
        _measure(GradNoise(), model, None)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: noise_scale(torch.ones(1, 2), torch.ones(1), torch.ones(2), names=("a", "b")),
            ValueError,
            "K >= 2 pieces",
        ),
        (
            lambda: noise_scale(torch.ones(3, 2), torch.ones(2), torch.ones(2), names=("a", "b")),
            ValueError,
            "shapes disagree",
        ),
        (
            lambda: microbatch_noise(
                Objective(MODELS["mlp"](), CE), (torch.randn(4, 8), torch.zeros(4).long()), 1
            ),
            ValueError,
            "gives one piece",
        ),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()
