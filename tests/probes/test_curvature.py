"""Curvature probes in a real training loop, checked against dense float64 Hessians."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.nn import functional as F

import trainprobe
from tests.cases import OnceAct
from trainprobe.curvature import ParamLayout, criterion_loss
from trainprobe.probes import (
    GradientSubspace,
    HessianDensity,
    HessianTop,
    HessianTrace,
    Sharpness,
    at_steps,
    every,
    stability_rule,
)
from trainprobe.store import Run

CE = criterion_loss(nn.CrossEntropyLoss())
MEASURED = (0, 3, 7)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (32,), generator=gen
    )


def _dense(model: nn.Module, batch) -> torch.Tensor:
    layout = ParamLayout.trainable(model)
    w = layout.flatten(dict(model.named_parameters())).detach()
    x, y = batch
    return hessian(lambda v: F.cross_entropy(functional_call(model, layout.unflatten(v), (x,)), y))(
        w
    )


def _dense_gradient(model: nn.Module, batch) -> torch.Tensor:
    layout = ParamLayout.trainable(model)
    w = layout.flatten(dict(model.named_parameters())).detach()
    x, y = batch
    return torch.func.grad(
        lambda v: F.cross_entropy(functional_call(model, layout.unflatten(v), (x,)), y)
    )(w)


def _states(make_opt, steps: int = 8) -> dict[int, nn.Module]:
    """Copies of the unwatched model at each measured step (before its update)."""
    model = _model()
    opt = make_opt(model.parameters())
    states = {}
    for step in range(steps):
        batch = _batch(step)
        if step in MEASURED:
            states[step] = copy.deepcopy(model)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
        opt.zero_grad()
    return states


def _train(make_opt, probes=None, run_dir=None, steps: int = 8):
    """Seeded loop; returns the model and the dense Hessians (and Adam states) at MEASURED."""
    model = _model()
    opt = make_opt(model.parameters())
    references = {}
    mon = (
        trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt, loss_fn=CE, flush_seconds=0)
        if probes is not None
        else None
    )
    with mon if mon is not None else _Null():
        for step in range(steps):
            batch = _batch(step)
            if step in MEASURED:
                references[step] = (_dense(model, batch), copy.deepcopy(opt.state_dict()))
            block = mon.step(step, batch=batch) if mon is not None else _Null()
            with block:
                loss = F.cross_entropy(model(batch[0]), batch[1])
                loss.backward()
            opt.step()
            opt.zero_grad()
    return model, references


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def test_probes_on_train_bit_identically_and_match_the_dense_hessian(tmp_path):
    schedule = at_steps(*MEASURED)
    probes = [
        HessianTop(top=3, bottom=1, tol=1e-10, schedule=schedule),
        HessianTrace(matvecs=60, schedule=schedule),
        HessianDensity(probes=4, steps=60, schedule=schedule),
        Sharpness(tol=1e-10, schedule=schedule),
        GradientSubspace(k=3, tol=1e-10, schedule=schedule),
    ]
    plain, references = _train(_sgd)
    watched, _ = _train(_sgd, probes, tmp_path / "run")
    watched_states = _states(_sgd)  # the parameters at each measured step
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)
    run = Run(tmp_path / "run")
    assert run.series("hessian/eig_0").steps.tolist() == list(MEASURED)
    for i, step in enumerate(MEASURED):
        exact = torch.linalg.eigvalsh(references[step][0])  # ascending
        for j in range(3):
            assert run.series(f"hessian/eig_{j}").values[i] == pytest.approx(
                float(exact[-1 - j]), rel=1e-8
            )
        assert run.series("hessian/bottom_0").values[i] == pytest.approx(float(exact[0]), rel=1e-8)
        assert run.series("sharpness/lambda_max").values[i] == pytest.approx(
            float(exact[-1]), rel=1e-8
        )
        assert run.series("sharpness/threshold").values[i] == pytest.approx(2 / 0.5)
        g = _dense_gradient(watched_states[step], _batch(step))  # [P] at that step
        along = float(g @ references[step][0] @ g / (g @ g))
        assert run.series("sharpness/directional").values[i] == pytest.approx(along, rel=1e-8)
        assert along <= float(exact[-1]) * (1 + 1e-12)
        trace, stderr = (
            run.series("hessian_trace/trace").values[i],
            run.series("hessian_trace/stderr").values[i],
        )
        assert abs(trace - float(exact.sum())) <= 5 * stderr + 1e-9
    assert (run.series("hessian/converged").values == 1).all()
    density = run.arrays("hessian_density/density")
    grid = run.arrays("hessian_density/grid")
    for g, d in zip(grid[1], density[1], strict=True):
        assert np.trapezoid(d, g) == pytest.approx(1, abs=1e-3)
    fraction = run.series("grad_subspace/fraction").values
    assert ((fraction >= 0) & (fraction <= 1 + 1e-12)).all()


def test_gradient_subspace_fraction_is_exact():
    model = _model()
    batch = _batch(0)
    dense = _dense(model, batch)
    _, vectors = torch.linalg.eigh(dense)
    op = trainprobe.hessian_operator(model, CE, batch=batch)
    g = op.gradient
    top = vectors[:, -2:]  # [P, 2]
    expected = float((top.T @ g).pow(2).sum() / (g @ g))
    ctx = _context(model, batch, torch.optim.SGD(model.parameters(), lr=0.1))
    values = GradientSubspace(k=2, tol=1e-12).measure(ctx)
    assert float(values["grad_subspace/fraction"]) == pytest.approx(expected, rel=1e-8)


def _context(model, batch, optimizer, step: int = 0):
    return trainprobe.probes.StepContext(
        step=step,
        model=model,
        params=dict(model.named_parameters()),
        batch=batch,
        optimizer=optimizer,
        loss_fn=CE,
    )


@pytest.mark.parametrize(
    ("make", "threshold"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 3.8 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 3.8 / 0.05),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / (0.1 * 2.8)),
    ],
)
def test_sgd_thresholds(make, threshold):
    model = _model()
    rule = stability_rule(make(model.parameters()), dict(model.named_parameters()))
    assert rule.threshold == pytest.approx(threshold) and rule.preconditioner is None


def test_sgd_weight_decay_is_added_to_the_sharpness():
    model, batch = _model(), _batch(0)
    top = float(torch.linalg.eigvalsh(_dense(model, batch))[-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.3)
    values = Sharpness(tol=1e-12).measure(_context(model, batch, opt))
    assert values["sharpness/lambda_max"] == pytest.approx(top + 0.3, rel=1e-9)


@pytest.mark.parametrize("adamw", [False, True])
def test_adam_preconditioned_sharpness(adamw):
    make = (
        (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1))
        if adamw
        else (lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6))
    )
    model = _model()
    opt = make(model.parameters())
    _replay(model, opt, 3)
    dense = _dense(model, _batch(3))
    group = opt.param_groups[0]
    (beta1, beta2), eps = group["betas"], group["eps"]
    diag = []
    for p in model.parameters():
        s, t = opt.state[p], float(opt.state[p]["step"])
        diag.append(
            ((1 - beta1**t) * ((s["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)).reshape(-1)
        )
    d = torch.cat(diag).rsqrt()  # P^{-1/2}
    exact = float(torch.linalg.eigvalsh(d[:, None] * dense * d[None, :])[-1])
    values = Sharpness(tol=1e-12).measure(_context(model, _batch(3), opt, step=3))
    assert values["sharpness/preconditioned"] == 1.0
    assert values["sharpness/lambda_max"] == pytest.approx(exact, rel=1e-8)
    assert values["sharpness/threshold"] == pytest.approx((2 + 2 * beta1) / ((1 - beta1) * 0.01))


def _replay(model, opt, steps: int) -> None:
    for step in range(steps):
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_adam_before_its_first_step_and_unknown_optimizers_warn_once():
    """One key, one quantity: before Adam's first step there is no preconditioner, so
    nothing is recorded (not the plain Hessian's λ_max under the same key)."""
    model, batch = _model(), _batch(0)
    probe = Sharpness()
    with pytest.warns(UserWarning, match="Adam has not stepped yet"):
        values = probe.measure(_context(model, batch, torch.optim.Adam(model.parameters())))
    assert values == {}
    with pytest.warns(UserWarning, match="no known threshold for RMSprop"):
        values = probe.measure(_context(model, batch, torch.optim.RMSprop(model.parameters())))
    assert "sharpness/ratio" not in values and values["sharpness/lr"] == 0.01
    groups = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}]
    )
    assert "differ in lr" in stability_rule(groups, dict(model.named_parameters())).note


def _two_decay_groups(model, make, **options):
    decayed = [p for p in model.parameters() if p.ndim == 2]
    plain = [p for p in model.parameters() if p.ndim == 1]
    return make(
        [{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
        **options,
    )


def test_groups_differing_only_in_weight_decay_share_one_threshold():
    """The usual AdamW setup (decay on matrices, none on biases and norms, one lr): its
    decoupled decay is not in the Hessian; SGD's coupled decay enters as diag(wd)."""
    model, batch = _model(), _batch(0)
    params = dict(model.named_parameters())
    adamw = _two_decay_groups(model, torch.optim.AdamW, lr=1e-3)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    adamw.step()
    rule = stability_rule(adamw, params)
    assert rule.threshold == pytest.approx(38 / 1e-3) and rule.weight_decay == 0.0
    sgd = _two_decay_groups(model, torch.optim.SGD, lr=0.1)
    rule = stability_rule(sgd, params)
    assert rule.threshold == pytest.approx(2 / 0.1)
    wd = torch.cat(
        [
            torch.full((p.numel(),), 0.1 if p.ndim == 2 else 0.0, dtype=torch.float64)
            for p in params.values()
        ]
    )
    assert torch.equal(rule.weight_decay, wd)
    values = Sharpness(tol=1e-12).measure(_context(model, batch, sgd))
    dense = _dense(model, batch) + torch.diag(wd)
    top = float(torch.linalg.eigvalsh(dense)[-1])
    assert values["sharpness/lambda_max"] == pytest.approx(top, rel=1e-9)


def test_a_loop_without_an_optimizer_gives_its_learning_rate_or_threshold():
    model, batch = _model(), _batch(0)
    top = float(torch.linalg.eigvalsh(_dense(model, batch))[-1])
    values = Sharpness(lr=0.5, tol=1e-12).measure(_context(model, batch, None))
    assert values["sharpness/threshold"] == 4.0 and values["sharpness/lr"] == 0.5
    assert values["sharpness/ratio"] == pytest.approx(top / 4.0, rel=1e-9)
    rms = torch.optim.RMSprop(model.parameters(), lr=0.01)
    values = Sharpness(threshold=7.0, tol=1e-12).measure(_context(model, batch, rms))
    assert values["sharpness/threshold"] == 7.0 and values["sharpness/lr"] == 0.01


def test_one_nan_batch_skips_that_step_and_keeps_the_probe_on(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"probe 'sharpness' skipped step 2: the loss is nan"):
        with trainprobe.watch(
            model,
            [Sharpness(schedule=at_steps(*range(5)))],
            run_dir=tmp_path / "r",
            optimizer=opt,
            loss_fn=CE,
        ) as mon:
            for step in range(5):
                x, y = _batch(step)
                if step == 2:
                    x[0, 0] = float("nan")
                with mon.step(step, batch=(x, y)) as s:
                    loss = F.cross_entropy(model(x), y)
                    if torch.isfinite(loss):  # the loop skips the bad batch
                        loss.backward()
                    s.log(loss=loss)
                opt.zero_grad()
    run = Run(tmp_path / "r")
    assert run.series("sharpness/lambda_max").steps.tolist() == [0, 1, 3, 4]
    assert run.meta["skipped_steps"] == {"sharpness": [2]} and run.meta["disabled_probes"] == {}


def test_warm_starts_spend_fewer_products(tmp_path):
    schedule = at_steps(*range(1, 8))
    _train(_sgd, [HessianTop(top=3, tol=1e-6, schedule=schedule)], tmp_path / "warm")
    _train(
        _sgd, [HessianTop(top=3, tol=1e-6, warm_start=False, schedule=schedule)], tmp_path / "cold"
    )
    warm = Run(tmp_path / "warm").series("hessian/hvps").values[1:]
    cold = Run(tmp_path / "cold").series("hessian/hvps").values[1:]
    assert warm.mean() < cold.mean()


def test_missing_loss_or_data_disables_the_probe_with_the_fix(tmp_path):
    model = _model()
    with pytest.warns(RuntimeWarning, match="needs a loss: pass loss_fn= to watch"):
        with trainprobe.watch(
            model, [HessianTop(schedule=at_steps(0))], run_dir=tmp_path / "a"
        ) as mon:
            with mon.step(0, batch=_batch(0)):
                pass
    with pytest.warns(RuntimeWarning, match="needs data: pass batch= to mon.step"):
        with trainprobe.watch(
            model, [Sharpness(schedule=at_steps(0))], run_dir=tmp_path / "b", loss_fn=CE
        ) as mon:
            with mon.step(0):
                pass


def test_fixed_data_and_dataset_batches():
    model, (x, y) = _model(), _batch(0)
    dense = _dense(model, (x, y))
    top = float(torch.linalg.eigvalsh(dense)[-1])
    ctx = _context(model, None, None)
    fixed = HessianTop(tol=1e-12, data=(x, y)).measure(ctx)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    split = HessianTop(tol=1e-12, batches=loader).measure(ctx)
    assert fixed["hessian/eig_0"] == pytest.approx(top, rel=1e-9)
    assert split["hessian/eig_0"] == pytest.approx(top, rel=1e-9)


def test_watch_refuses_a_loss_fn_that_is_not_callable():
    with pytest.raises(TypeError, match=r"loss_fn=...\) must be a callable"):
        trainprobe.watch(_model(), loss_fn=3)


def test_hessian_forwards_do_not_reach_other_probes_hooks(tmp_path):
    """The Hessian probes evaluate the model after the step's hooks are removed: the
    activation statistics of a step are the same with and without them."""
    schedule = at_steps(*MEASURED)
    alone = [trainprobe.ActivationStats(schedule=schedule)]
    together = [
        trainprobe.ActivationStats(schedule=schedule),
        HessianTop(top=2, schedule=schedule),
        Sharpness(schedule=schedule),
    ]
    _train(_sgd, alone, tmp_path / "alone")
    _train(_sgd, together, tmp_path / "together")
    a, b = Run(tmp_path / "alone"), Run(tmp_path / "together")
    keys = a.keys("activations")
    assert keys and keys == b.keys("activations")
    for key in keys:
        np.testing.assert_array_equal(a.series(key).values, b.series(key).values)


def test_two_instances_of_one_probe_record_side_by_side(tmp_path):
    schedule = at_steps(2, 5)
    probes = [
        GradientSubspace(k=1, name="grad_subspace_top1", schedule=schedule),
        GradientSubspace(k=10, name="grad_subspace_top10", schedule=schedule),
    ]
    _train(_sgd, probes, tmp_path / "run")
    run = Run(tmp_path / "run")
    assert sorted(run.keys("grad_subspace")) == sorted(
        f"grad_subspace_top{k}/{metric}" for k in (1, 10) for metric in ("fraction", "hvps")
    )
    top1, top10 = (run.series(f"grad_subspace_top{k}/fraction").values for k in (1, 10))
    assert top1.shape == top10.shape == (2,)
    assert (top1 <= top10 + 1e-9).all()  # a larger eigenspace holds at least as much
    assert [p["name"] for p in run.meta["probes"]] == ["grad_subspace_top1", "grad_subspace_top10"]


def test_curvature_probes_fall_back_to_finite_differences_and_say_so(tmp_path):
    """A layer without a double backward: the probes' "auto" engine runs finite
    differences, records their estimated error, and λ_max agrees with the exact value of
    the same function (nn.Tanh in its place) to 1e-3 in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), OnceAct(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    loss = criterion_loss(nn.CrossEntropyLoss())
    probes = [Sharpness(schedule=every(1), lr=0.1, tol=1e-6), HessianTop(top=2, schedule=every(1))]
    with pytest.warns(RuntimeWarning, match=r"engine='fd'"):
        with trainprobe.watch(model, probes, run_dir=tmp_path / "r", loss_fn=loss) as mon:
            with mon.step(0, batch=(x, y)):
                pass
    run = Run(tmp_path / "r")
    assert 0 < run.series("sharpness/fd_error").values[0] < 1e-4
    assert "hessian/fd_error" in run and not run.meta["disabled_probes"]
    exact = nn.Sequential(model[0], nn.Tanh(), model[2])
    with trainprobe.watch(exact, probes[:1], run_dir=tmp_path / "exact", loss_fn=loss) as mon:
        with mon.step(0, batch=(x, y)):
            pass
    got = run.series("sharpness/lambda_max").values[0]
    want = Run(tmp_path / "exact").series("sharpness/lambda_max").values[0]
    assert abs(got - want) <= 1e-3 * abs(want)
    assert "sharpness/fd_error" not in Run(tmp_path / "exact")


def test_a_refused_finite_difference_disables_the_probe_and_names_why(tmp_path):
    """A layer without a double backward feeding a ReLU that sits on its kink (zero
    inputs, zero bias): every finite-difference product is off by O(1), so the probe
    records nothing, is disabled with the refusal's text, and training goes on."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), OnceAct(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    nn.init.zeros_(model[2].bias)
    nn.init.zeros_(model[0].bias)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    x[::2] = 0  # tanh(0) = 0 then a bias-free layer: pre-activations exactly on the kink
    batch = (x, torch.arange(32) % 3)
    loss = criterion_loss(nn.CrossEntropyLoss())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning):
        with trainprobe.watch(
            model, [Sharpness(schedule=every(1))], run_dir=tmp_path, loss_fn=loss
        ) as mon:
            for step in range(2):
                with mon.step(step, batch=batch):
                    loss(model, batch).backward()
    run = Run(tmp_path)
    assert "sharpness/lambda_max" not in run
    (reason,) = run.meta["disabled_probes"].values()
    assert "FiniteDifferenceError" in reason or "finite-difference" in reason
    assert "ReLU" in reason and "dtype=torch.float64" in reason
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
