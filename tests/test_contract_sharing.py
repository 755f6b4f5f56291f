"""The observer contract on models whose parameters are shared, tied, frozen or unused.

Every probe runs on (a) a module registered under two attribute names, (b)
``nn.ModuleList([block] * n)``, (c) tied weights, (d) a frozen parameter and (e) an
unused parameter: training stays bit-identical, every slot of the model still holds the
very ``Parameter`` objects it held before (``is``), and the functional core's values
agree with a direct computation on the model itself (no ``functional_call``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.cases import SHARING, batch, hook_count, train
from tests.contract import PROBE_SETS, assert_same_training
from trainprobe.curvature import hessian_operator
from trainprobe.functional import Objective, criterion_loss
from trainprobe.gradients import per_sample_gradients

CE = criterion_loss(nn.CrossEntropyLoss())


def slots(model: nn.Module) -> dict[tuple[int, str], object]:
    """Every ``(module, attribute)`` slot of the model and the object it holds."""
    return {
        (id(m), local): tensor
        for _, m in model.named_modules(remove_duplicate=False)
        for local, tensor in m._parameters.items()
    }


@pytest.mark.parametrize("probe_set", sorted(PROBE_SETS))
@pytest.mark.parametrize("model", sorted(SHARING))
def test_every_probe_leaves_shared_tied_frozen_and_unused_parameters_alone(
    tmp_path, model, probe_set
):
    reference = train(model, steps=4)
    before: dict = {}
    probes = PROBE_SETS[probe_set]("mlp")
    watched = train(
        model,
        steps=4,
        probes=probes,
        run_dir=tmp_path / "run",
        on_model=lambda net: before.update(slots(net)),
    )
    assert_same_training(reference, watched)
    net, opt = watched
    after = slots(net)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "a slot holds another object now"
    held = [p for group in opt.param_groups for p in group["params"]]
    for tensor in after.values():
        assert isinstance(tensor, nn.Parameter)
    # the optimizer still trains the objects the modules hold: nothing was swapped out
    live = {id(t) for t in after.values()}
    assert all(id(p) in live for p in held)
    assert hook_count(net) == 0


def reference_gradient(model: nn.Module, names: list[str], xy) -> torch.Tensor:
    """``∇L`` by ``backward`` on the model itself."""
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(xy[0]), xy[1])
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(params[n]) if g is None else g).reshape(-1)
            for n, g in zip(names, grads, strict=True)
        ]
    )


def reference_hessian(model: nn.Module, names: list[str], xy) -> torch.Tensor:
    """The dense ``[P, P]`` Hessian by double backward on the model's own parameters."""
    params = dict(model.named_parameters())
    tensors = [params[n] for n in names]
    loss = F.cross_entropy(model(xy[0]), xy[1])
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], tensors, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(t) if r is None else r).reshape(-1)
                    for t, r in zip(tensors, row, strict=True)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("model", sorted(SHARING))
def test_functional_values_match_a_direct_computation(model):
    torch.manual_seed(0)
    net = SHARING[model]().double().eval()
    x, y = batch("mlp", 0, size=6)
    xy = (x.double(), y)
    identity = slots(net)
    objective = Objective(net, CE)
    names = list(objective.layout.names)
    with objective.scope(), torch.enable_grad():
        w = objective.leaves()
        got = objective.flat_grad(objective(w, xy), w)
    torch.testing.assert_close(got, reference_gradient(net, names, xy), rtol=1e-12, atol=1e-14)
    per_example = per_sample_gradients(Objective(net, CE), xy)
    torch.testing.assert_close(per_example.grads.mean(0), got, rtol=1e-10, atol=1e-12)
    operator = hessian_operator(net, CE, batch=xy)
    used = list(operator.layout.names)
    dense = operator.matmat(torch.eye(operator.dim, dtype=torch.float64))
    torch.testing.assert_close(dense, reference_hessian(net, used, xy), rtol=1e-10, atol=1e-12)
    assert all(slots(net)[k] is v for k, v in identity.items())  # the same objects
    if model == "unused":
        assert "spare.weight" not in used and "spare.weight" in names


def _compiled_training(probes, run_dir, steps: int = 4) -> torch.Tensor:
    import trainprobe

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    model = torch.compile(eager)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = (
        trainprobe.watch(
            model, probes, run_dir=run_dir, optimizer=opt, loss_fn=CE, on_probe_error="raise"
        )
        if probes
        else None
    )
    with watch if watch is not None else torch.no_grad() as mon:
        for step in range(steps):
            x, y = batch("mlp", step)
            if mon is None:
                with torch.enable_grad():
                    F.cross_entropy(model(x), y).backward()
            else:
                with mon.step(step, batch=(x, y)):
                    F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in eager.parameters()])


@pytest.mark.slow
def test_compiled_models_train_bit_identically_under_the_functional_probes(tmp_path):
    """torch.compile (inductor): a probe evaluating the model at other shapes used to
    recompile the training graph with dynamic shapes (GradNoise drifted ~1e-7 a step),
    and the graph engine could not differentiate the compiled graph twice."""
    pytest.importorskip("torch._inductor")
    from trainprobe.probes import PROBES, every

    torch._dynamo.reset()
    reference = _compiled_training(None, None)
    for name in ("grad_noise", "conflict", "sharpness", "hessian"):
        torch._dynamo.reset()
        got = _compiled_training([PROBES[name](schedule=every(1))], tmp_path / name)
        assert torch.equal(got, reference), name
