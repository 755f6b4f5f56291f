"""PGD adversarial accuracy against the closed-form L∞ worst case of linear classifiers,
and the Robustness probe in a real training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.cases import MODELS, hook_count
from tests.contract import watched_run
from trainprobe.probes import StepContext, every
from trainprobe.probes.robustness import Robustness
from trainprobe.regions import pgd_attack

F64 = torch.float64


def _linear(classes: int, seed: int):
    """A linear classifier and labelled points near its decision boundaries."""
    torch.manual_seed(seed)
    model = nn.Linear(6, classes).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 6, generator=gen, dtype=F64)
    with torch.no_grad():
        noisy = model(x) + 0.5 * torch.randn(400, classes, generator=gen, dtype=F64)
    return model, x, noisy.argmax(dim=1)


def _certified(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``[N]`` robust in closed form: for every ``j ≠ y`` the worst-case margin
    ``min_{‖δ‖∞ <= ε} (w_y − w_j)ᵀ(x + δ) + b_y − b_j = m_j − ε ‖w_y − w_j‖_1`` is > 0."""
    with torch.no_grad():
        logits = model(x)  # [N, C]
        rows = torch.arange(len(x))
        ok = torch.ones(len(x), dtype=torch.bool)
        for j in range(logits.shape[1]):
            margin = logits[rows, y] - logits[:, j]  # [N]
            l1 = (model.weight[y] - model.weight[j]).abs().sum(dim=1)  # [N]
            ok &= (y == j) | (margin - eps * l1 > 0)
    return ok


@pytest.mark.parametrize("eps", [0.05, 0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_binary_linear_adversarial_accuracy_is_the_closed_form(seed, eps):
    """Two classes: the sign of the input gradient is ``sign(w_j − w_y)`` everywhere, so
    PGD reaches the worst corner and the count is exact."""
    model, x, y = _linear(2, seed)
    got = pgd_attack(model, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    expected = _certified(model, x, y, eps)
    assert torch.equal(got.robust, expected)
    assert 0 < float(got.adv_acc) < float(got.clean_acc)
    assert float(got.delta.abs().max()) <= eps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_pgd_never_breaks_a_certified_point(seed):
    """More classes: cross-entropy PGD is a heuristic, so it may miss an attack (robust
    accuracy is then over-estimated) but can never break a certified point."""
    model, x, y = _linear(3, seed)
    got = pgd_attack(model, x, y, eps=0.2, generator=torch.Generator().manual_seed(0))
    certified = _certified(model, x, y, 0.2)
    assert not (certified & ~got.robust).any()
    assert not (got.robust & ~got.clean).any()
    assert float(got.adv_acc) - float(certified.double().mean()) <= 0.02


def test_zero_radius_gives_the_clean_accuracy():
    model, x, y = _linear(3, 0)
    got = pgd_attack(model, x, y, eps=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got.robust, got.clean) and not got.delta.any()
    assert float(got.clean_acc) == pytest.approx(float((model(x).argmax(1) == y).double().mean()))


def test_bounds_are_respected_and_nothing_else_changes():
    torch.manual_seed(0)
    model = MODELS["cnn"]()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(6, 1, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    got = pgd_attack(model, x, y, eps=0.3, steps=3, generator=gen, bounds=(0.0, 1.0))
    adversarial = x + got.delta
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    assert float(got.delta.abs().max()) <= 0.3 + 1e-7
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(bool((p.grad == 7).all()) for p in model.parameters())


def _measure(probe: Robustness, model: nn.Module, batch) -> dict[str, float]:
    ctx = StepContext(step=3, model=model, params=dict(model.named_parameters()), batch=batch)
    return {k: float(v) for k, v in probe.measure(ctx).items()}


def test_the_probe_records_the_attack_on_its_own_data():
    model, x, y = _linear(2, 1)
    probe = Robustness(eps=0.2, data=(x.float(), y), max_points=300, seed=4)
    got = _measure(probe, model, batch=None)
    direct = pgd_attack(
        model, x[:300], y[:300], eps=0.2, generator=torch.Generator().manual_seed(4 + 3)
    )
    assert got == {
        "robustness/clean_acc": pytest.approx(float(direct.clean_acc)),
        "robustness/adv_acc": pytest.approx(float(direct.adv_acc)),
        "robustness/eps": 0.2,
    }
    certified = _certified(model, x[:300], y[:300], 0.2).double().mean()
    assert got["robustness/adv_acc"] == pytest.approx(float(certified))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_training_is_bit_identical_and_keys_are_documented(tmp_path, model):
    probe = Robustness(eps=0.1, steps=3, schedule=every(1))
    run, _ = watched_run(tmp_path, model, [probe], steps=3)
    keys = run.keys("robustness")
    assert set(keys) == {"robustness/clean_acc", "robustness/adv_acc", "robustness/eps"}
    for key in keys:
        values = run.series(key).values.ravel()
        assert len(values) == 3 and all(math.isfinite(v) for v in values), key
    clean, adv = run.series("robustness/clean_acc").values, run.series("robustness/adv_acc").values
    assert (adv <= clean).all()


@pytest.mark.parametrize(
    ("batch", "call", "match"),
    [
        (None, "probe", "Robustness needs data: pass data=.x, y. or batch= to mon.step"),
        ((torch.zeros(4, 8), torch.zeros(4)), "probe", r"labels \[N\] integer classes"),
        (
            (torch.zeros(4, 8), torch.tensor([0, 1, 2, 3])),
            "probe",
            r"labels must lie in \[0, 3\) for 3 logits, got values in \[0, 3\]",
        ),
        ((torch.zeros(4, 8), torch.tensor([0, 1, 2, 0])), "eps", "eps must be a finite number"),
        ((torch.zeros(4, 8), torch.tensor([0, 1, 2, 0])), "steps", "steps must be an integer"),
        ((torch.zeros(4, 8), torch.tensor([0, 1, 2, 0])), "size", "step_size must be a finite"),
        ((torch.zeros(4, 8), torch.tensor([0, 1, 2, 0])), "bounds", "bounds must be a tuple"),
        ((torch.zeros(4), torch.tensor([0, 1, 2, 0])), "pgd", "inputs must be a floating tensor"),
        ((torch.zeros(4, 8), torch.tensor([0, 1])), "pgd", r"labels must be an integer tensor"),
        (
            (torch.zeros(4, 8), torch.tensor([0, 1, 2, 0])),
            "logits",
            r"the model must return \[N, C\] logits, got \(4, 3, 1\)",
        ),
    ],
)
def test_bad_batches_and_models(batch, call, match):
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    gen = torch.Generator()
    options = {"eps": 0.1, "generator": gen}
    with pytest.raises(ValueError, match=match):
        if call == "probe":
            _measure(Robustness(), model, batch)
        elif call == "logits":
            pgd_attack(nn.Sequential(model, nn.Unflatten(1, (3, 1))), *batch, **options)
        else:
            bad = {
                "eps": {"eps": -1.0},
                "steps": {"steps": 1.5},
                "size": {"step_size": math.nan},
                "bounds": {"bounds": (0, 0)},
                "pgd": {},
            }[call]
            pgd_attack(model, *batch, **{**options, **bad})
    assert hook_count(model) == 0
