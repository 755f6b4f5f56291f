"""Hessian operators against dense float64 Hessians from ``torch.func.hessian``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.cases import OnceAct
from trainprobe.curvature import ParamLayout, lanczos
from trainprobe.curvature.blocks import block_lanczos, diagonal_block_eigenpairs
from trainprobe.curvature.hvp import EXACT_ENGINES as ENGINES
from trainprobe.curvature.hvp import hessian_operator
from trainprobe.functional import criterion_loss

CE = criterion_loss(nn.CrossEntropyLoss())


def _data(n: int = 24, shape: tuple[int, ...] = (5,), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class _BNNet(nn.Module):
    """Conv + BatchNorm + linear head, no dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


def _bn_net() -> nn.Module:
    torch.manual_seed(1)
    net = _BNNet().double()
    net.bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial running statistics
    net.bn.running_var.uniform_(0.5, 2.0)
    return net


def _bn_reference(net: _BNNet, x, y, *, train: bool):
    """An independent forward with BatchNorm written out (batch or running statistics).

    Written by hand: ``torch.func.hessian`` (forward over reverse) through train-mode
    ``F.batch_norm`` disagrees with finite differences by ~1e-2 in torch 2.13.
    """
    layout = ParamLayout.trainable(net)

    def loss(w):
        p = layout.unflatten(w)
        h = F.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1)  # [B, C, H, W]
        if train:
            mean = h.mean(dim=(0, 2, 3))
            var = h.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = net.bn.running_mean, net.bn.running_var
        scale = p["bn.weight"] / torch.sqrt(var + net.bn.eps)
        h = (h - mean[:, None, None]) * scale[:, None, None] + p["bn.bias"][:, None, None]
        logits = F.linear(torch.tanh(h).flatten(1), p["head.weight"], p["head.bias"])
        return F.cross_entropy(logits, y)

    return layout, loss


def _dense(model: nn.Module, loss_of_output, x, y):
    """Dense Hessian of ``loss_of_output(model(x), y)`` in the flat trainable parameters."""
    layout = ParamLayout.trainable(model)
    w = layout.flatten(dict(model.named_parameters())).detach()

    def loss(v):
        return loss_of_output(functional_call(model, layout.unflatten(v), (x,)), y)

    return hessian(loss)(w)


def _rel(a, b) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("engine", ENGINES)
def test_mlp_products_match_the_dense_hessian(engine):
    model, (x, y) = _mlp(), _data()
    dense = _dense(model, F.cross_entropy, x, y)
    op = hessian_operator(model, CE, batch=(x, y), engine=engine)
    vs = torch.randn(op.dim, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert _rel(op.matmat(vs), dense @ vs) < 1e-10
    single = torch.stack([op.matvec(vs[:, i]) for i in range(6)], dim=1)
    assert _rel(single, dense @ vs) < 1e-10
    assert op.matvecs == 12 and op.engine == engine


@pytest.mark.parametrize("engine", ENGINES)
def test_mean_squared_error_under_every_engine(engine):
    """nn.MSELoss (reduction "mean") under forward-over-reverse: torch 2.13's fused
    mse_loss raises "ZeroTensors are immutable" in jvp(grad) and segfaults in
    linearize(grad); the engines evaluate it as its composite inside their scope only."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2)).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    layout = ParamLayout.trainable(model)
    w = layout.flatten(dict(model.named_parameters())).detach()
    # the reference by double backward: torch.func.hessian (jacfwd of jacrev) is 4% off
    # on this LayerNorm network in torch 2.13 (central differences of the gradient agree
    # with double backward to 3e-9 and with torch.func.hessian to 4e-2 only)
    dense = torch.autograd.functional.hessian(
        lambda v: F.mse_loss(functional_call(model, layout.unflatten(v), (x,)), y), w
    )
    original = F.mse_loss
    op = hessian_operator(model, criterion_loss(nn.MSELoss()), batch=(x, y), engine=engine)
    vs = torch.randn(op.dim, 3, generator=gen, dtype=torch.float64)
    assert _rel(op.matmat(vs), dense @ vs) < 1e-10
    assert F.mse_loss is original  # restored after every product


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("engine", ENGINES)
def test_batchnorm_in_eval_and_train_semantics(engine, train):
    net, (x, y) = _bn_net(), _data(16, (1, 4, 4))
    layout, reference = _bn_reference(net, x, y, train=train)
    dense = hessian(reference)(layout.flatten(dict(net.named_parameters())).detach())
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    op = hessian_operator(net, CE, batch=(x, y), mode="train" if train else "eval", engine=engine)
    vs = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert _rel(op.matmat(vs), dense @ vs) < 1e-10
    for name, b in net.named_buffers():  # running statistics never move
        assert torch.equal(b, buffers[name]), name
    assert net.training and net.bn.track_running_stats


def test_attention_block_and_a_custom_loss():
    torch.manual_seed(2)
    block = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).double()
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def custom(model, batch):  # not criterion(model(x), y): a smooth penalty on the outputs
        out = model(batch)
        return (out.tanh() ** 2).mean() + 0.1 * out.pow(4).mean()

    layout = ParamLayout.trainable(block)
    w = layout.flatten(dict(block.named_parameters())).detach()

    def of_w(v):  # train mode: eval would take the fused fast path, whose derivatives are off

        return custom(lambda b: functional_call(block, layout.unflatten(v), (b,)), x)

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no second derivative
        # plain autograd: torch.func.hessian (and jacrev∘jacrev) of this block disagree with
        # finite differences by ~1e-1 in torch 2.13, autograd.functional agrees to 5e-8
        dense = torch.autograd.functional.hessian(of_w, w)
    vs = torch.randn(w.numel(), 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for engine in ENGINES:  # the operator switches attention to the math kernel itself
        op = hessian_operator(block, custom, batch=x, engine=engine, mode="train")
        assert _rel(op.matmat(vs), dense @ vs) < 1e-10


def test_top5_bottom2_and_eigenvectors_match_eigh():
    model, (x, y) = _mlp(), _data()
    dense = _dense(model, F.cross_entropy, x, y)
    exact, vectors = torch.linalg.eigh(dense)  # ascending
    op = hessian_operator(model, CE, batch=(x, y))
    gen = torch.Generator().manual_seed(0)
    pairs = lanczos(op, op.dim, top=5, bottom=2, tol=1e-12, generator=gen)
    want = torch.cat([exact.flip(0)[:5], exact[:2]])
    assert pairs.converged
    torch.testing.assert_close(pairs.values, want, rtol=1e-8, atol=1e-12)
    order = [op.dim - 1 - i for i in range(5)] + [0, 1]
    for col, i in enumerate(order):  # up to sign
        assert abs(float(pairs.vectors[:, col] @ vectors[:, i])) == pytest.approx(1, abs=1e-8)
    blocked = block_lanczos(
        op,
        op.dim,
        top=5,
        bottom=2,
        block_size=4,
        tol=1e-12,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(blocked.values, want, rtol=1e-8, atol=1e-12)


def test_per_layer_blocks_are_the_diagonal_blocks_of_the_dense_hessian():
    model, (x, y) = _mlp(), _data()
    dense = _dense(model, F.cross_entropy, x, y)
    op = hessian_operator(model, CE, batch=(x, y))
    bounds, start = [], 0
    for n in op.layout.numels:
        bounds.append(slice(start, start + n))
        start += n
    results = diagonal_block_eigenpairs(
        op, op.dim, bounds, top=2, bottom=1, tol=1e-12, generator=torch.Generator().manual_seed(1)
    )
    calls = op.matvecs
    for b, pairs in zip(bounds, results, strict=True):
        exact = torch.linalg.eigvalsh(dense[b, b])
        want = torch.cat([exact.flip(0)[:2], exact[:1]]) if len(exact) > 2 else exact.flip(0)
        torch.testing.assert_close(pairs.values, want, rtol=1e-8, atol=1e-12)
    assert calls == sum(p.matvecs for p in results)


def test_dataset_over_uneven_batches_equals_the_full_batch():
    model, (x, y) = _mlp(), _data(23)
    full = hessian_operator(model, CE, batch=(x, y))
    parts = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]  # 10, 10, 3
    vs = torch.randn(full.dim, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for engine in ENGINES:
        split = hessian_operator(model, CE, batches=parts, engine=engine)
        assert _rel(split.matmat(vs), full.matmat(vs)) < 1e-10
        torch.testing.assert_close(split.gradient, full.gradient, rtol=1e-10, atol=1e-14)
    summed = hessian_operator(
        model, criterion_loss(nn.CrossEntropyLoss(reduction="sum")), batches=parts, reduction="sum"
    )
    assert _rel(summed.matmat(vs), 23 * full.matmat(vs)) < 1e-10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    assert _rel(hessian_operator(model, CE, batches=loader).matmat(vs), full.matmat(vs)) < 1e-10


@pytest.mark.parametrize("selection", ["0\\.", ["0.weight", "0.bias"], "module"])
def test_parameter_subsets_are_the_submatrix(selection):
    model, (x, y) = _mlp(), _data()
    dense = _dense(model, F.cross_entropy, x, y)
    params = model[0] if selection == "module" else selection
    op = hessian_operator(model, CE, batch=(x, y), params=params)
    n = sum(p.numel() for p in model[0].parameters())  # layer 0 comes first in the vector
    assert op.layout.names == ("0.weight", "0.bias")
    eye = torch.eye(n, dtype=torch.float64)
    assert _rel(op.matmat(eye), dense[:n, :n]) < 1e-10


def test_float32_model_with_float64_products():
    model, (x, y) = _mlp(), _data()
    dense = _dense(model, F.cross_entropy, x, y)
    small = copy.deepcopy(model).float()
    op = hessian_operator(small, CE, batch=(x.float(), y), dtype=torch.float64)
    vs = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert op.dtype == torch.float64 and _rel(op.matmat(vs), dense @ vs) < 1e-6  # w rounded
    assert next(small.parameters()).dtype == torch.float32


def test_no_side_effects_on_model_grads_modes_or_rng():
    net, (x, y) = _bn_net(), _data(16, (1, 4, 4))
    net.train()
    net.head.eval()  # a mixed mode must survive
    F.cross_entropy(net(x), y).backward()
    before = copy.deepcopy(net.state_dict())
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    rng = torch.get_rng_state()
    for engine in ENGINES:
        for mode in ("eval", "train"):
            op = hessian_operator(net, CE, batch=(x, y), engine=engine, mode=mode)
            op.matmat(torch.ones(op.dim, 2, dtype=torch.float64))
            lanczos(op, op.dim, top=2, generator=torch.Generator().manual_seed(0))
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, p in net.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    assert net.training and not net.head.training and net.conv.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_shuffling_dataloader_leaves_the_global_rng_alone():
    model, (x, y) = _mlp(), _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=5, shuffle=True
    )
    rng = torch.get_rng_state()
    hessian_operator(model, CE, batches=loader)
    assert torch.equal(torch.get_rng_state(), rng)


def test_dropout_in_train_mode_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    x, y = _data()
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"module '2' \(Dropout\).*use mode='eval'"):
        hessian_operator(model, CE, batch=(x, y), mode="train")
    assert torch.equal(torch.get_rng_state(), rng)
    hessian_operator(model, CE, batch=(x, y))  # eval semantics: dropout is off


def test_a_random_loss_closure_is_refused():
    model, (x, y) = _mlp(), _data()

    def noisy(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1]) + 1e-3 * torch.rand(())

    with pytest.raises(ValueError, match="loss closure draws randomness"):
        hessian_operator(model, noisy, batch=(x, y))


def _forwards(model: nn.Module) -> list[int]:
    """A counter of ``model``'s forward calls (one hook on the root)."""
    count = [0]
    model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_a_passed_determinism_check_is_remembered_for_the_model_and_closure():
    """The check's two forwards are paid once per model, loss closure and mode: the graph
    engine's build is then one forward. A model with a random module (dropout, even off
    in eval mode) is checked every time, and so is another closure."""
    model, (x, y) = _mlp(), _data()
    count = _forwards(model)
    hessian_operator(model, CE, batch=(x, y), engine="graph")
    assert count[0] == 3  # two checking forwards, one for the gradient graph
    hessian_operator(model, CE, batch=(x, y), engine="graph")
    assert count[0] == 4
    hessian_operator(model, CE, batch=(x, y), engine="graph", mode="train")
    assert count[0] == 7  # another mode: checked
    other = criterion_loss(nn.CrossEntropyLoss())
    hessian_operator(model, other, batch=(x, y), engine="graph")
    assert count[0] == 10  # another closure: checked

    torch.manual_seed(0)
    dropped = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    count = _forwards(dropped)
    for _ in range(2):
        hessian_operator(dropped, CE, batch=(x, y), engine="graph")
    assert count[0] == 6  # checked both times


def test_a_random_closure_is_refused_every_time():
    model, (x, y) = _mlp(), _data()

    def noisy(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1]) + 1e-3 * torch.rand(())

    for _ in range(2):
        with pytest.raises(ValueError, match="loss closure draws randomness"):
            hessian_operator(model, noisy, batch=(x, y))


def test_roundoff_between_two_evaluations_is_not_randomness():
    """A CPU reduction split over threads may add in another order from call to call:
    differences of a few ulps pass, a relative 1e-9 in float64 (dropout-sized noise
    is far larger) is refused."""
    model, (x, y) = _mlp(), _data()
    calls = iter(range(100))

    def jitter(scale):
        def loss(m, batch):
            value = F.cross_entropy(m(batch[0]), batch[1])
            return value * (1 + scale * (next(calls) % 2))  # alternates between two values

        return loss

    hessian_operator(model, jitter(8 * torch.finfo(torch.float64).eps), batch=(x, y))
    with pytest.raises(ValueError, match="loss closure draws randomness"):
        hessian_operator(model, jitter(1e-9), batch=(x, y))


def test_an_op_without_second_derivative_names_the_engine_to_try():
    model, (x, y) = _mlp(), _data()

    def loss(m, batch):  # aten::_cdist_backward has no derivative of its own
        out = m(batch[0])
        return torch.cdist(out, out.flip(0)).mean()

    op = hessian_operator(model, loss, batch=(x, y), engine="graph")
    expected = r"'graph' HVP engine cannot differentiate.*engine='jvp'"
    with pytest.raises(RuntimeError, match=expected):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))


def test_non_finite_hvp_and_loss():
    model, (x, y) = _mlp(), _data()

    model[0].weight.data[0, 0] = 0.0

    def huge(m, batch):  # finite loss and gradient; |w|^1.5 has an infinite curvature at 0
        return F.cross_entropy(m(batch[0]), batch[1]) + m[0].weight[0, 0].abs() ** 1.5

    op = hessian_operator(model, huge, batch=(x, y))
    with pytest.raises(FloatingPointError, match="Hessian-vector product is not finite"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan on batch 0"):
        hessian_operator(model, CE, batch=(bad, y))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of batch="),
        ({"batch": 1, "batches": [1]}, ValueError, "exactly one of batch="),
        ({"batches": []}, ValueError, "yielded no batch"),
        ({"batch": "B", "engine": "fast"}, ValueError, "engine must be 'auto' or one of"),
        ({"batch": "B", "mode": "test"}, ValueError, "mode must be 'eval' or 'train'"),
        ({"batch": "B", "reduction": "none"}, ValueError, "reduction must be 'mean' or 'sum'"),
        ({"batch": "B", "params": "nothing"}, ValueError, "no trainable parameter name matches"),
        ({"batch": "B", "params": ["0.weight", "x"]}, ValueError, r"unknown names \['x'\]"),
        ({"batch": "B", "params": []}, ValueError, "params is empty"),
        ({"batches": ["B", "C"]}, ValueError, "cannot tell the batch size"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        hessian_operator(_mlp(), lambda m, b: m[0].weight.sum() ** 2, **kwargs)


def test_frozen_unused_and_non_scalar():
    model, (x, y) = _mlp(), _data()
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0.bias'\] are frozen"):
        hessian_operator(model, CE, batch=(x, y), params=["0.weight", "0.bias"])
    assert "0.bias" not in hessian_operator(model, CE, batch=(x, y)).layout.names
    first_layer = lambda m, b: m[0](b[0]).pow(2).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"\['2.weight', '2.bias'\] do not affect the loss"):
        hessian_operator(model, first_layer, batch=(x, y), params=r"^(0\.weight|2\.)")
    # the default selection is what training moves: the parameters the loss uses
    assert hessian_operator(model, first_layer, batch=(x, y)).layout.names == ("0.weight",)
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        hessian_operator(model, lambda m, b: m(b[0]), batch=(x, y))
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        hessian_operator("net", CE, batch=(x, y))
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        hessian_operator(model, 3, batch=(x, y))
    with pytest.raises(ValueError, match=r"expected a \[\d+\] vector"):
        hessian_operator(model, CE, batch=(x, y)).matvec(torch.ones(3))


def test_linearize_on_conv_after_conv_falls_back_to_exact_columns():
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()
    x, y = _data(8, (1, 4, 4))
    dense = _dense(net, F.cross_entropy, x, y)
    op = hessian_operator(net, CE, batch=(x, y), engine="linearize")
    vs = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with warnings.catch_warnings():  # whether vmap fails depends on the torch version
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _rel(op.matmat(vs), dense @ vs) < 1e-10
        assert _rel(op.matmat(vs), dense @ vs) < 1e-10


def test_graph_engine_refuses_a_layer_without_double_backward_and_names_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), OnceAct(), nn.Linear(8, 3)).double()
    xy = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    loss = criterion_loss(nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match=r"Function OnceTanh \(the output of module '1'"):
        hessian_operator(model, loss, batch=xy, engine="graph")
    for engine in ("jvp", "linearize"):  # no forward AD: these raise on their own
        with pytest.raises(RuntimeError):
            hessian_operator(model, loss, batch=xy, engine=engine).matvec(
                torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
            )
    # the way out the message names: the Hessian in the parameters after the layer
    op = hessian_operator(model, loss, batch=xy, engine="graph", params=r"^2\.")
    exact = nn.Sequential(model[0], nn.Tanh(), model[2])
    want = hessian_operator(exact, loss, batch=xy, engine="graph", params=r"^2\.")
    eye = torch.eye(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(eye), want.matmat(eye))


def test_full_float32_turns_tf32_off_for_cuda_and_restores_the_flags():
    from trainprobe.functional import full_float32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with full_float32(torch.device("cpu")):  # nothing to do off CUDA
            assert torch.backends.cudnn.allow_tf32
        with full_float32(torch.device("cuda")):  # flags only: no GPU needed to check them
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- finite differences ----------------------------------------------------------------


def _once_net(dtype: torch.dtype) -> tuple[nn.Module, nn.Module, tuple]:
    """An MLP whose activation has no double backward, and the same net with nn.Tanh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), OnceAct(), nn.Linear(16, 3)).to(dtype)
    exact = nn.Sequential(model[0], nn.Tanh(), model[2])
    gen = torch.Generator().manual_seed(1)
    xy = (torch.randn(64, 6, generator=gen).to(dtype), torch.randint(0, 3, (64,), generator=gen))
    return model, exact, xy


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_finite_differences_through_a_layer_without_double_backward(dtype, tol):
    """Central differences of first-order gradients against the exact engine on the same
    function (nn.Tanh in place of the once-differentiable tanh)."""
    model, exact, xy = _once_net(dtype)
    loss = criterion_loss(nn.CrossEntropyLoss())
    fd = hessian_operator(model, loss, batch=xy, engine="fd")
    want = hessian_operator(exact, loss, batch=xy, engine="graph", dtype=torch.float64)
    vs = torch.randn(fd.dim, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = fd.matmat(vs.to(dtype)).double()
    error = _rel(got, want.matmat(vs))
    assert error < tol
    assert fd.engine == "fd" and 0 < fd.fd_error < 10 * tol  # its own estimate, same scale
    assert fd.matvecs == 6
    # Lanczos on it: the top eigenvalue within 1e-3 (float32) of the exact one
    top = lanczos(fd, fd.dim, top=1, tol=1e-6).values[0]
    exact_top = lanczos(want, want.dim, top=1, tol=1e-10).values[0]
    assert abs(float(top) - float(exact_top)) <= 1e-3 * abs(float(exact_top))


def test_auto_falls_back_to_finite_differences_with_a_warning():
    model, exact, xy = _once_net(torch.float32)
    loss = criterion_loss(nn.CrossEntropyLoss())
    with pytest.warns(RuntimeWarning, match=r"OnceTanh.*engine='fd'.*estimated relative error"):
        op = hessian_operator(model, loss, batch=xy)
    assert op.engine == "fd" and op.fd_error is not None
    assert hessian_operator(exact, loss, batch=xy).engine == "graph"  # no fallback needed
    with pytest.raises(RuntimeError, match="no double backward"):  # asked for by name
        hessian_operator(model, loss, batch=xy, engine="graph")


def test_half_precision_parameters_get_float32_products_unless_asked():
    """A bf16 model's Hessian in float32 by default (bf16 products: ~3 digits)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    xy = (torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen))
    loss = criterion_loss(nn.CrossEntropyLoss())
    want = hessian_operator(copy.deepcopy(model).to(torch.bfloat16).double(), loss, batch=xy)
    half = copy.deepcopy(model).to(torch.bfloat16)
    op = hessian_operator(half, loss, batch=xy)
    assert op.dtype == torch.float32
    v = torch.randn(op.dim, generator=gen, dtype=torch.float64)
    assert _rel(op.matvec(v.float()).double()[:, None], want.matvec(v)[:, None]) < 1e-5
    assert hessian_operator(half, loss, batch=xy, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # the model untouched
