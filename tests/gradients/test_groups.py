"""Group, micro-batch and task gradients against plain autograd on the sub-batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.cases import MODELS, batch
from trainprobe.curvature import criterion_loss
from trainprobe.functional import Objective
from trainprobe.gradients import (
    group_gradients,
    microbatch_gradients,
    per_sample_gradients,
    task_gradients,
)

CE = criterion_loss(nn.CrossEntropyLoss())


def _case(name: str, size: int = 12):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, y = batch(name, 0, size=size)
    return model, (x.double(), y)


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Gradient ``[P]`` and loss of the mean cross-entropy on ``(x, y)``, in eval mode."""
    was = model.training
    model.eval()
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.train(was)
    return torch.cat([g.reshape(-1) for g in grads]), float(loss.detach())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["subset", "persample"])
def test_group_gradients_are_the_sub_batch_gradients(method):
    model, (x, y) = _case("cnn")
    ids = torch.tensor([5, 2, 5, 9, 2, 2, 5, 9, 5, 5, 2, 9])
    groups = group_gradients(Objective(model, CE), (x, y), ids, method=method)
    assert groups.ids == (2, 5, 9)
    assert groups.counts.tolist() == [4, 5, 3]
    torch.testing.assert_close(groups.weights, torch.tensor([4, 5, 3], dtype=torch.float64) / 12)
    for row, label in enumerate(groups.ids):
        expected, loss = _grad(model, x[ids == label], y[ids == label])
        assert _rel(groups.grads[row], expected) <= 1e-10
        assert float(groups.losses[row]) == pytest.approx(loss, rel=1e-12)
    full, _ = _grad(model, x, y)
    assert _rel(groups.total, full) <= 1e-12  # ∇L = Σ_g (n_g / N) g_g


def test_persample_grouping_equals_the_mean_of_per_example_gradients():
    model, data = _case("mlp")
    ids = data[1]
    rows = per_sample_gradients(Objective(model, CE), data).grads  # [B, P]
    groups = group_gradients(Objective(model, CE), data, ids, method="persample")
    for row, label in enumerate(groups.ids):
        assert _rel(groups.grads[row], rows[ids == label].mean(dim=0)) <= 1e-12


def test_persample_grouping_falls_back_to_the_loop_where_vmap_cannot():
    model, data = _case("rnn")
    with pytest.warns(RuntimeWarning, match="falling back"):
        persample = group_gradients(Objective(model, CE), data, data[1], method="persample")
    subset = group_gradients(Objective(model, CE), data, data[1])
    assert _rel(persample.grads, subset.grads) <= 1e-10


def test_microbatches_are_consecutive_chunks():
    model, (x, y) = _case("mlp", size=10)
    groups = microbatch_gradients(Objective(model, CE), (x, y), 3)
    assert groups.ids == (0, 1, 2) and groups.counts.tolist() == [4, 3, 3]
    for row, (xs, ys) in enumerate(zip(x.tensor_split(3), y.tensor_split(3), strict=True)):
        expected, loss = _grad(model, xs, ys)
        assert _rel(groups.grads[row], expected) <= 1e-12
        assert float(groups.losses[row]) == pytest.approx(loss, rel=1e-12)
    assert _rel(groups.total, _grad(model, x, y)[0]) <= 1e-12


class _TwoHeads(nn.Module):
    """A shared linear trunk ``w`` and one head per task: closed-form task gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 1, bias=False)
        self.head_a = nn.Linear(1, 1, bias=False)
        self.head_b = nn.Linear(1, 1, bias=False)


def _tasks(model: _TwoHeads, x: torch.Tensor) -> dict[str, torch.Tensor]:
    z = model.trunk(x)  # [B, 1]
    return {"b": (model.head_b(z) ** 2).mean(), "a": model.head_a(z).mean()}


def test_task_gradients_match_closed_forms_and_leave_grads_alone():
    model = _TwoHeads().double()
    with torch.no_grad():
        model.trunk.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        model.head_a.weight.fill_(3.0)
        model.head_b.weight.fill_(-1.5)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for p in model.parameters():
        p.grad = torch.full_like(p, 9.0)
    groups = task_gradients(Objective(model, _tasks), x)
    assert groups.ids == ("a", "b") and groups.counts.tolist() == [5, 5]
    w, a, b = model.trunk.weight[0].detach(), 3.0, -1.5
    z = x @ w  # [B]
    grad_a = torch.cat([a * x.mean(0), z.mean()[None], torch.zeros(1)])  # [w, head_a, head_b]
    grad_b = torch.cat(
        [2 * b**2 * (z[:, None] * x).mean(0), torch.zeros(1), 2 * b * (z**2).mean()[None]]
    )
    assert _rel(groups.grads[0], grad_a) <= 1e-12 and _rel(groups.grads[1], grad_b) <= 1e-12
    torch.testing.assert_close(groups.losses, torch.stack([a * z.mean(), ((b * z) ** 2).mean()]))
    assert all(bool((p.grad == 9).all()) for p in model.parameters())
    assert torch.equal(groups.total, groups.grads.sum(dim=0))


def test_a_task_that_does_not_depend_on_the_parameters_has_a_zero_gradient():
    model = _TwoHeads().double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    groups = task_gradients(
        Objective(model, lambda m, b: {"main": m.trunk(b).mean(), "const": b.sum()}), x
    )
    assert groups.ids == ("const", "main") and not groups.grads[0].any()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda m, d: group_gradients(Objective(m, CE), d, d[1].double()),
            TypeError,
            r"ids must be an integer tensor \[B\]",
        ),
        (
            lambda m, d: group_gradients(Objective(m, CE), d, d[1][:3]),
            ValueError,
            r"ids has shape \(3,\) but the batch has 12 examples",
        ),
        (
            lambda m, d: group_gradients(Objective(m, CE), d, d[1], method="dense"),
            ValueError,
            "method must be 'subset' or 'persample'",
        ),
        (
            lambda m, d: microbatch_gradients(Objective(m, CE), d, 13),
            ValueError,
            "microbatches must be an integer between 1 and the batch size 12",
        ),
        (
            lambda m, d: microbatch_gradients(Objective(m, CE), d, True),
            ValueError,
            "microbatches must be an integer",
        ),
        (
            lambda m, d: task_gradients(Objective(m, CE), d),
            TypeError,
            r"return a dict \{task name: scalar loss\}, got Tensor",
        ),
        (
            lambda m, d: task_gradients(Objective(m, lambda mm, b: {}), d),
            ValueError,
            "returned an empty dict",
        ),
        (
            lambda m, d: task_gradients(Objective(m, lambda mm, b: {1: CE(mm, b)}), d),
            TypeError,
            "return a dict",
        ),
        (
            lambda m, d: task_gradients(Objective(m, lambda mm, b: {"t": mm(b[0])}), d),
            ValueError,
            "task 't' must return a scalar tensor",
        ),
    ],
)
def test_bad_arguments(call, error, match):
    model, data = _case("mlp")
    with pytest.raises(error, match=match):
        call(model, data)
