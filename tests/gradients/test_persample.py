"""Per-example gradients against single-example backward passes, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.cases import MODELS, batch
from trainprobe.curvature import criterion_loss
from trainprobe.functional import Objective, SplitBatch
from trainprobe.gradients import DEFAULT_MAX_MEMORY, per_sample_gradients
from trainprobe.gradients.persample import chunk_for, for_each_chunk

CE = criterion_loss(nn.CrossEntropyLoss())


def _case(name: str, size: int = 6) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, y = batch(name, 0, size=size)
    return model, (x.double(), y)


def _reference(model: nn.Module, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, P]`` gradients and ``[B]`` losses by one plain backward per example (eval)."""
    x, y = data
    was = model.training
    model.eval()
    rows, losses = [], []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
        losses.append(loss.detach())
    model.train(was)
    return torch.stack(rows), torch.stack(losses)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_vmap_equals_single_example_backward_and_leaves_the_model_alone(name):
    model, data = _case(name)
    expected, losses = _reference(model, data)
    model.train()
    before, rng = _snapshot(model), torch.get_rng_state()
    result = per_sample_gradients(Objective(model, CE), data, chunk_size=4)
    assert result.method == "vmap" and result.chunk_size == 4
    assert result.grads.shape == expected.shape and result.grads.dtype == torch.float64
    assert _rel(result.grads, expected) <= 1e-10
    torch.testing.assert_close(result.losses, losses, rtol=1e-12, atol=0)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_batch_gradient_is_the_mean_of_per_example_gradients():
    model, data = _case("cnn", size=8)
    model.eval()
    loss = CE(model, data)
    full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    result = per_sample_gradients(Objective(model, CE), data)
    assert _rel(result.grads.mean(dim=0), full) <= 1e-12
    assert float(result.losses.mean()) == pytest.approx(float(loss.detach()), rel=1e-12)


def test_rnn_needs_the_loop_and_auto_falls_back_to_it():
    """nn.GRU has no vmap batching rule in torch 2.13: a model vmap cannot handle."""
    model, data = _case("rnn")
    expected, _ = _reference(model, data)
    with pytest.raises(RuntimeError, match=r"vmap cannot batch.*method='loop'"):
        per_sample_gradients(Objective(model, CE), data)
    loop = per_sample_gradients(Objective(model, CE), data, method="loop")
    assert loop.method == "loop" and loop.chunk_size == 1
    assert _rel(loop.grads, expected) <= 1e-10
    with pytest.warns(RuntimeWarning, match="falling back to one backward pass per example"):
        auto = per_sample_gradients(Objective(model, CE), data, method="auto")
    assert auto.method == "loop" and torch.equal(auto.grads, loop.grads)


class _Item(nn.Module):
    """Reads a value on the host in the forward (vmap cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * (1 + 0.0 * x.abs().max().item())


class _Branch(nn.Module):
    """Data-dependent control flow (vmap cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if out.sum() > 0 else -out


@pytest.mark.parametrize("make", [_Item, _Branch])
def test_models_vmap_cannot_batch_name_the_loop_which_is_exact(make):
    torch.manual_seed(0)
    model = make().double()
    _, data = _case("mlp")
    with pytest.raises(RuntimeError, match=r"per_sample_gradients\(\.\.\., method='loop'\)"):
        per_sample_gradients(Objective(model, CE), data)
    expected, _ = _reference(model, data)
    looped = per_sample_gradients(Objective(model, CE), data, method="loop")
    assert _rel(looped.grads, expected) <= 1e-12


def test_a_model_error_is_not_blamed_on_vmap():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, x):
            raise RuntimeError("the model itself is broken")

    _, data = _case("mlp")
    with pytest.raises(RuntimeError, match="the model itself is broken"):
        per_sample_gradients(Objective(Broken(), CE), data)


def test_chunks_and_the_memory_bound_give_the_same_gradients():
    model, data = _case("cnn", size=10)
    whole = per_sample_gradients(Objective(model, CE), data)
    dim = whole.grads.shape[1]
    assert whole.chunk_size == min(DEFAULT_MAX_MEMORY // (dim * 8), 10)
    bounded = per_sample_gradients(Objective(model, CE), data, max_memory=3 * dim * 8 + 7)
    assert bounded.chunk_size == 3
    torch.testing.assert_close(bounded.grads, whole.grads, rtol=1e-12, atol=1e-15)
    blocks: list[int] = []
    fl = Objective(model, CE)
    for_each_chunk(
        fl,
        SplitBatch.of(data),
        lambda s, g, v: blocks.append(g.shape[0]),
        method="vmap",
        chunk_size=None,
        max_memory=3 * dim * 8,
    )
    assert blocks == [3, 3, 3, 1]


def test_layout_parameter_selection_and_unsplit_leaves():
    model, (x, y) = _case("mlp")
    full = per_sample_gradients(Objective(model, CE), (x, y))
    parts = full.per_param()
    assert list(parts) == [n for n, _ in model.named_parameters()]
    assert parts["0.weight"].shape == (6, 16, 8)
    first = per_sample_gradients(Objective(model, CE, params=r"^0\."), (x, y))
    assert first.layout.names == ("0.weight", "0.bias")
    torch.testing.assert_close(first.grads, full.grads[:, : first.layout.size], rtol=0, atol=0)

    def scaled(m, b):  # a number and a tensor of another length go whole to every example
        return b["scale"] * F.cross_entropy(m(b["x"]) + b["shift"], b["y"])

    data = {"x": x, "y": y, "scale": 2.0, "shift": torch.ones(3, dtype=torch.float64)}
    result = per_sample_gradients(Objective(model, scaled), data)
    model.eval()
    loss = scaled(model, {**data, "x": x[2:3], "y": y[2:3]})
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
    assert _rel(result.grads[2], expected) <= 1e-12


def test_train_mode_keeps_dropout_off_the_global_rng():
    model, data = _case("mlp")
    rng = torch.get_rng_state()
    result = per_sample_gradients(Objective(model, CE, mode="train"), data)
    assert torch.equal(torch.get_rng_state(), rng)
    assert bool(torch.isfinite(result.grads).all())
    eval_grads = per_sample_gradients(Objective(model, CE), data).grads
    assert not torch.equal(result.grads, eval_grads)  # dropout masks drawn per example


def test_existing_grads_are_left_untouched():
    model, data = _case("mlp")
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    per_sample_gradients(Objective(model, CE), data)
    per_sample_gradients(Objective(model, CE), data, method="loop")
    assert all(bool((p.grad == 7).all()) for p in model.parameters())


def _untracked_bn() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)
    ).double()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda m, d: per_sample_gradients(Objective(m, CE, mode="train"), d),
            ValueError,
            r"BatchNorm '1' under mode='train'.*use mode='eval'",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, CE, mode="test"), d),
            ValueError,
            "mode must be 'eval'",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, CE), d, method="jit"),
            ValueError,
            "method must be one of",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, CE), d, chunk_size=2, max_memory=10**6),
            ValueError,
            "pass chunk_size= or max_memory=, not both",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, CE), d, chunk_size=0),
            ValueError,
            "chunk_size must be an integer >= 1",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, CE), d, max_memory=100),
            ValueError,
            r"holds less than one example's gradient .*pass max_memory >= ",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, lambda mm, b: mm(b[0])), d),
            ValueError,
            "must return a scalar tensor",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, CE), (1.0, "y")),
            ValueError,
            "no tensor with a leading",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, CE), (d[0][:0], d[1][:0])),
            ValueError,
            "the batch is empty",
        ),
        (
            lambda m, d: per_sample_gradients(Objective("model", CE), d),
            TypeError,
            "model must be an nn.Module",
        ),
        (
            lambda m, d: per_sample_gradients(Objective(m, 3), d),
            TypeError,
            "loss_fn must be a callable",
        ),
        (
            lambda m, d: per_sample_gradients(m, d),
            TypeError,
            "expected a trainprobe.functional.Objective, got",
        ),
    ],
)
def test_bad_arguments(call, error, match):
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    _, data = _case("mlp")
    with pytest.raises(error, match=match):
        call(model, data)


def test_batchnorm_without_running_statistics_is_refused_in_eval_too():
    _, data = _case("mlp")
    with pytest.raises(
        ValueError, match=r"without running statistics would .*track_running_stats=True"
    ):
        per_sample_gradients(Objective(_untracked_bn(), CE), data)


def test_chunk_for_caps_at_the_batch():
    assert chunk_for(10, torch.float32, 5, None, None) == 5
    assert chunk_for(10, torch.float32, 500, None, 400) == 10
    assert chunk_for(10, torch.float32, 5, 8, None) == 5
