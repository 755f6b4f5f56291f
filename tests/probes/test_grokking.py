"""HeldOut against direct evaluation; GrokSignals on constructed logits (Softmax Collapse
where exp underflows) and on a linear model's closed-form gradient; both in training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.cases import MODELS, batch
from tests.contract import watched_run
from trainprobe.probes import StepContext, every
from trainprobe.probes.grokking import GrokSignals
from trainprobe.probes.heldout import HeldOut


def _ctx(model: nn.Module, data=None) -> StepContext:
    return StepContext(step=0, model=model, params=dict(model.named_parameters()), batch=data)


def _values(out) -> dict[str, float]:
    return {k: float(v) for k, v in out.items()}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MODELS["mlp"]()  # dropout: train mode would make every evaluation random


def _direct(model: nn.Module, data) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(data[0])
    model.train()
    return F.cross_entropy(out, data[1]).item(), (out.argmax(1) == data[1]).double().mean().item()


def test_heldout_and_train_batch_measured_alike_in_eval_mode():
    model = _mlp()
    held, fixed = batch("mlp", 7), batch("mlp", 8)
    probe = HeldOut(data=held, train_data=fixed)
    rng = torch.get_rng_state()
    first, second = _values(probe.measure(_ctx(model))), _values(probe.measure(_ctx(model)))
    assert first == second  # no dropout: the same numbers twice
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    loss, acc = _direct(model, held)
    train_loss, train_acc = _direct(model, fixed)
    assert first["heldout/loss"] == pytest.approx(loss, rel=1e-6)
    assert first["heldout/acc"] == acc
    assert first["heldout/train_loss"] == pytest.approx(train_loss, rel=1e-6)
    assert first["heldout/train_acc"] == train_acc


def test_batches_are_weighted_by_examples():
    model = _mlp()
    big, small = batch("mlp", 1, size=16), batch("mlp", 2, size=4)
    got = _values(HeldOut(data=[big, small]).measure(_ctx(model)))
    (loss_a, acc_a), (loss_b, acc_b) = _direct(model, big), _direct(model, small)
    assert got["heldout/loss"] == pytest.approx((16 * loss_a + 4 * loss_b) / 20, rel=1e-6)
    assert got["heldout/acc"] == pytest.approx((16 * acc_a + 4 * acc_b) / 20, rel=1e-12)


def test_accuracy_only_for_class_targets_and_over_sequence_positions():
    model = _mlp()
    x, y = batch("mlp", 3)
    regression = HeldOut(
        data=(x, torch.randn(16, 3, generator=torch.Generator().manual_seed(0))),
        criterion=F.mse_loss,
    )
    assert set(regression.measure(_ctx(model))) == {"heldout/loss"}
    seq = nn.Sequential(nn.Linear(8, 6), nn.Unflatten(1, (2, 3)))  # [B, 2 positions, 3 classes]
    targets = torch.stack([y, y.flip(0)], dim=1)  # [B, 2]
    probe = HeldOut(data=(x, targets), criterion=lambda o, t: F.cross_entropy(o.transpose(1, 2), t))
    got = _values(probe.measure(_ctx(seq)))
    with torch.no_grad():
        hits = (seq(x).argmax(-1) == targets).double().mean().item()
        loss = F.cross_entropy(seq(x).transpose(1, 2), targets).item()
    assert got["heldout/acc"] == hits and got["heldout/loss"] == pytest.approx(loss, rel=1e-6)


def test_eval_fn_runs_in_eval_mode_without_grad_or_rng_use():
    model = _mlp()
    seen = {}

    def eval_fn(net: nn.Module) -> dict:
        seen["training"], seen["grad"] = net.training, torch.is_grad_enabled()
        return {"noise": torch.rand(()), "top_acc": 0.5, "count": 3}

    rng = torch.get_rng_state()
    got = HeldOut(eval_fn=eval_fn).measure(_ctx(model))
    assert seen == {"training": False, "grad": False} and model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(got) == {"heldout/noise", "heldout/top_acc", "heldout/count"}
    assert got["heldout/top_acc"] == 0.5 and got["heldout/noise"].shape == ()


@pytest.mark.parametrize(
    ("returned", "match"),
    [
        ([1.0], "must return a dict"),
        ({"Top-1": 1.0}, "lower_snake"),
        ({"acc": torch.ones(2)}, "float or a one-element tensor"),
        ({"acc": True}, "float or a one-element tensor"),
    ],
)
def test_heldout_refuses_bad_eval_fn_results(returned, match):
    with pytest.raises(ValueError, match=match):
        HeldOut(eval_fn=lambda model: returned).measure(_ctx(_mlp()))


def _fixed_logits(dtype: torch.dtype) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A linear map with one-hot inputs, so example ``i``'s logits are row ``i`` below:
    margins 30 (float32 absorbs ``2e^-30`` into 1: loss exactly 0), 5 (no collapse) and
    120 (``e^-120`` underflows in float32: the whole logit gradient is exactly 0)."""
    logits = torch.tensor([[30.0, 0, 0], [0, 5.0, 0], [0, 0, 120.0]], dtype=dtype)
    model = nn.Linear(3, 3, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(logits.T)  # x = I: logits = Wᵀ row by row
    return model, (torch.eye(3, dtype=dtype), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(("dtype", "expected"), [(torch.float32, 2 / 3), (torch.float64, 1 / 3)])
def test_softmax_collapse_on_constructed_logits(dtype, expected):
    model, (x, y) = _fixed_logits(dtype)
    z = model(x).detach().requires_grad_(True)
    losses = F.cross_entropy(z, y, reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), z)
    zero_loss, zero_grad = (losses == 0).tolist(), (grad == 0).all(1).tolist()
    if dtype == torch.float32:  # the reference: what PyTorch itself computes
        assert zero_loss == [True, False, True] and zero_grad == [False, False, True]
    else:  # float64 keeps 2e^-30 next to 1; e^-120 is representable, 1 + 2e^-120 is not
        assert zero_loss == [False, False, True] and zero_grad == [False, False, False]
    got = _values(GrokSignals(data=(x, y)).measure(_ctx(model)))
    assert got["grok/softmax_collapse"] == pytest.approx(expected, abs=1e-15)


def _linear_case():
    torch.manual_seed(2)
    model = nn.Linear(4, 3).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (10,), generator=gen))


def _nlm_closed_form(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    """``cos(−g, θ)`` with ``g_W = Rᵀx/B``, ``g_b = mean R``, ``R = softmax(z) − onehot(y)``."""
    with torch.no_grad():
        residual = torch.softmax(x @ model.weight.T + model.bias, 1) - F.one_hot(y, 3)  # [B, 3]
        g = torch.cat([(residual.T @ x / len(y)).reshape(-1), residual.mean(0)])
        theta = torch.cat([model.weight.reshape(-1), model.bias])
    return float(-(g @ theta) / (g.norm() * theta.norm()))


def test_nlm_cosine_of_a_linear_model_against_the_closed_form():
    model, (x, y) = _linear_case()
    got = _values(GrokSignals(data=(x, y)).measure(_ctx(model)))
    assert got["grok/nlm_cos"] == pytest.approx(_nlm_closed_form(model, x, y), rel=1e-12)
    norm = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in model.parameters()))
    assert got["grok/param_norm"] == pytest.approx(norm, rel=1e-12)
    assert got["grok/softmax_collapse"] == 0
    assert not any(p.grad is not None for p in model.parameters())


def test_nlm_cosine_approaches_one_after_separable_data_is_fitted():
    """Logistic regression on separable data: the weights grow along the max-margin
    direction and the gradient turns into pure logit scaling (Soudry et al. 2018), the NLM
    regime Prieto et al. describe after memorisation."""
    model, (x, _) = _linear_case()
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=torch.float64) > 0).long()  # 2 classes
    probe = GrokSignals(data=(x, y))
    before = _values(probe.measure(_ctx(model)))["grok/nlm_cos"]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(300):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    after = _values(probe.measure(_ctx(model)))["grok/nlm_cos"]
    assert before < 0 and after > 0.97  # measured: −0.42, then 0.98


def test_output_layer_by_default_name_or_module():
    model = _mlp()
    data = batch("mlp", 4)
    default = _values(GrokSignals(data=data).measure(_ctx(model)))
    assert _values(GrokSignals(data=data, output="3").measure(_ctx(model))) == default
    assert _values(GrokSignals(data=data, output=model[3]).measure(_ctx(model))) == default
    assert _values(GrokSignals(data=data, output="0").measure(_ctx(model))) != default


def test_grok_signals_take_the_last_linear_the_forward_calls_as_the_output_layer():
    class SpareAfterHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head, self.spare = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = SpareAfterHead()
    data = batch("mlp", 0)
    probe = GrokSignals(data=data)
    got = probe.measure(_ctx(model))
    want = GrokSignals(data=data, output="head").measure(_ctx(model))
    assert probe._found == "head"
    assert torch.equal(got["grok/nlm_cos"], want["grok/nlm_cos"])
    assert torch.isfinite(got["grok/nlm_cos"])


def test_grok_signals_refuse_bad_inputs():
    model = _mlp()
    data = batch("mlp", 0)
    with pytest.raises(TypeError, match=r"output must be a module name or an nn\.Module"):
        GrokSignals(output=3)
    with pytest.raises(ValueError, match="is not a module of the model"):
        GrokSignals(data=data, output="head").measure(_ctx(model))
    with pytest.raises(ValueError, match=r"calls no nn\.Linear"):
        GrokSignals(data=(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, dtype=torch.long))).measure(
            _ctx(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(2)))
        )
    model[3].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        GrokSignals(data=data).measure(_ctx(model))
    model[3].requires_grad_(True)
    with pytest.raises(ValueError, match="integer class labels"):
        GrokSignals(data=(data[0], data[1].double())).measure(_ctx(model))
    with pytest.raises(ValueError, match="GrokSignals needs data"):
        GrokSignals().measure(_ctx(model))
    with pytest.raises(ValueError, match="mode must be"):
        GrokSignals(mode="test")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_in_training_bit_identical_rng_untouched_keys_documented(tmp_path, model):
    probes = [
        HeldOut(data=batch(model, 99), train_data=batch(model, 98), schedule=every(3)),
        GrokSignals(schedule=every(3)),
    ]
    run, _ = watched_run(tmp_path, model, probes, steps=10)
    recorded = run.keys()
    for probe in probes:
        for key in run.keys(f"{probe.name}/"):
            series = run.series(key)
            assert series.steps.tolist() == [0, 3, 6, 9]
            assert np.all(np.isfinite(series.values)), key
    assert set(recorded) >= {
        "heldout/loss",
        "heldout/acc",
        "heldout/train_loss",
        "heldout/train_acc",
        "grok/param_norm",
        "grok/softmax_collapse",
        "grok/nlm_cos",
    }
