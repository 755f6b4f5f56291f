"""Region counts against brute force: dense grids over 2-D neighbourhoods, dense sampling
along segments, and closed-form networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.cases import MODELS, hook_count
from trainprobe.regions import cross_polytope, local_complexity, random_frame, segment_pieces

F64 = torch.float64


def _mlp(seed: int, act: type[nn.Module] = nn.ReLU, width: int = 8, inputs: int = 2):
    """Two hidden layers; PReLU slopes drawn per neuron in [-0.5, 0.5]."""
    torch.manual_seed(seed)
    acts = {nn.PReLU: lambda: nn.PReLU(width), nn.LeakyReLU: lambda: nn.LeakyReLU(0.2)}
    make = acts.get(act, act)
    model = nn.Sequential(
        nn.Linear(inputs, width), make(), nn.Linear(width, width), make(), nn.Linear(width, 3)
    ).double()
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(-0.5, 0.5)
    return model


def _pre_activations(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Every activation module's input, computed layer by layer (no hooks)."""
    out = []
    for module in model:
        if isinstance(module, nn.ReLU | nn.LeakyReLU | nn.PReLU):
            out.append(x)
        x = module(x)
    return out


def _changed(states: torch.Tensor) -> torch.Tensor:
    """``[F]`` whether each neuron's state differs anywhere among ``[M, F]`` states."""
    return (states != states[:1]).any(dim=0)


def _diamond(x: torch.Tensor, frame: torch.Tensor, radius: float, size: int = 201):
    """Grid over the 2-D cross-polytope ``x + r (s u_1 + t u_2)``, ``|s| + |t| <= 1``
    (its four vertices included): ``[M, 2]``."""
    s, t = torch.meshgrid(
        torch.linspace(-1, 1, size, dtype=F64),
        torch.linspace(-1, 1, size, dtype=F64),
        indexing="ij",
    )
    keep = s.abs() + t.abs() <= 1
    coords = torch.stack([s[keep], t[keep]], dim=1)  # [M, 2]
    return x + radius * coords @ frame


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vertex_count_against_a_dense_grid_over_the_neighbourhood(seed):
    """First layer: its pre-activation is affine, so a sign change among the vertices is
    exactly a zero set crossing the diamond: vertex count == grid count. Deeper layers:
    the vertices are grid points, so vertex count <= grid count."""
    model = _mlp(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, generator=gen, dtype=F64)
    frame = random_frame(2, 2, generator=gen, dtype=F64)
    got = local_complexity(model, x, radius=0.6, frame=frame)
    assert got.layers == ("1", "3") and got.neurons.tolist() == [8, 8]
    first_layer_hits = 0
    for i in range(len(x)):
        vertices = cross_polytope(x[i : i + 1], frame, 0.6)[0]  # [4, 2]
        by_vertex = [_changed(z > 0) for z in _pre_activations(model, vertices)]
        by_grid = [_changed(z > 0) for z in _pre_activations(model, _diamond(x[i], frame, 0.6))]
        assert got.counts[i].tolist() == [int(c.sum()) for c in by_vertex]
        assert torch.equal(by_vertex[0], by_grid[0])
        assert not (by_vertex[1] & ~by_grid[1]).any()
        first_layer_hits += int(by_grid[0].sum())
    assert first_layer_hits > 0  # the comparison is not vacuous
    assert torch.equal(got.total, got.counts.sum(dim=1))


def _absolute_value_network(radius: float) -> nn.Sequential:
    """``z_2 = r/2 − |x_1| − |x_2|`` from four ReLUs ``relu(±x_i)``, then an output layer."""
    model = nn.Sequential(
        nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 1)
    ).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))
        model[0].bias.zero_()
        model[2].weight.fill_(-1.0)
        model[2].bias.fill_(radius / 2)
    return model


def test_a_deeper_neuron_can_change_inside_without_separating_vertices():
    """``z_2`` is −r/2 at every vertex of the diamond ``|x_1| + |x_2| <= r`` and +r/2 at
    its centre: the grid sees its zero set, the vertex count does not."""
    model = _absolute_value_network(1.0)
    x, frame = torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)
    got = local_complexity(model, x, radius=1.0, frame=frame)
    assert got.layers == ("1", "3")  # the output layer (model[4]) is not a neuron
    assert got.counts.tolist() == [[4, 0]]
    grid = _pre_activations(model, _diamond(x[0], frame, 1.0))
    assert [int(_changed(z > 0).sum()) for z in grid] == [4, 1]


def test_the_output_is_counted_only_through_an_activation_module():
    model = _absolute_value_network(1.0)
    x, frame = torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)
    with_relu = nn.Sequential(*model, nn.ReLU())
    plain = local_complexity(model, x, radius=1.0, frame=frame)
    ended = local_complexity(with_relu, x, radius=1.0, frame=frame)
    assert ended.layers == ("1", "3", "5") and ended.neurons.tolist() == [4, 1, 1]
    assert ended.counts[:, :2].tolist() == plain.counts.tolist()


def test_max_pool_neurons_change_with_the_window_argmax():
    """MaxPool1d(2) over affine ``z``: window ``(z_0, z_1)`` changes argmax exactly where
    ``z_1 − z_0`` changes sign among the vertices."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.Unflatten(1, (2, 4)), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(4, 2)
    ).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 3, generator=gen, dtype=F64)
    frame = random_frame(3, 3, generator=gen, dtype=F64)
    got = local_complexity(model, x, radius=0.5, frame=frame)
    assert got.layers == ("2",) and got.neurons.tolist() == [4]
    z = model[0](cross_polytope(x, frame, 0.5)).reshape(20, 6, 4, 2)  # [N, V, windows, 2]
    first_wins = z[..., 0] >= z[..., 1]  # [N, V, 4] (ties keep the first)
    expected = (first_wins != first_wins[:, :1]).any(dim=1).sum(dim=1)  # [N]
    assert torch.equal(got.counts[:, 0], expected) and expected.sum() > 0


def test_tied_pool_windows_after_relu_do_not_count():
    model = nn.Sequential(
        nn.Linear(2, 4), nn.ReLU(), nn.Unflatten(1, (1, 4)), nn.MaxPool1d(4), nn.Flatten()
    ).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # every ReLU off: the window is all zeros everywhere
    got = local_complexity(
        model, torch.zeros(2, 2, dtype=F64), radius=0.5, frame=torch.eye(2, dtype=F64)
    )
    assert got.counts.tolist() == [[0, 0], [0, 0]]


def test_inplace_relu_and_a_shared_module_called_twice():
    torch.manual_seed(4)
    shared = nn.ReLU(inplace=True)
    inplace = nn.Sequential(
        nn.Linear(2, 6), shared, nn.Linear(6, 6), shared, nn.Linear(6, 1)
    ).double()
    plain = nn.Sequential(inplace[0], nn.ReLU(), inplace[2], nn.ReLU(), inplace[4])
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 2, generator=gen, dtype=F64)
    frame = random_frame(2, 2, generator=gen, dtype=F64)
    one = local_complexity(inplace, x, radius=0.8, frame=frame)
    two = local_complexity(plain, x, radius=0.8, frame=frame)
    assert one.layers == ("1",) and one.neurons.tolist() == [12]  # both calls pooled
    assert torch.equal(one.counts[:, 0], two.counts.sum(dim=1))
    a, b = x[:5], x[5:]
    assert torch.equal(segment_pieces(inplace, a, b).pieces, segment_pieces(plain, a, b).pieces)


def test_random_frames_are_orthonormal_and_reproducible():
    frame = random_frame(5, 12, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert frame.shape == (5, 12)
    torch.testing.assert_close(frame @ frame.T, torch.eye(5, dtype=F64))
    again = random_frame(5, 12, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(frame, again)
    x = torch.randn(3, 2, 6, dtype=F64)
    vertices = cross_polytope(x, frame.float().double(), 0.1)  # [3, 10, 2, 6]
    assert vertices.shape == (3, 10, 2, 6)
    steps = (vertices - x[:, None]).reshape(3, 10, 12).norm(dim=-1)
    torch.testing.assert_close(steps, torch.full((3, 10), 0.1, dtype=F64))


def _sampled_changes(model: nn.Sequential, a: torch.Tensor, b: torch.Tensor, samples: int):
    """Sample midpoints ``t`` of a fine grid; return the cells ``[t_i, t_{i+1}]`` across which
    the activation pattern changes (``[C, 2]``)."""
    t = (torch.arange(samples, dtype=F64) + 0.5) / samples  # [T], never exactly 0 or 1
    pattern = torch.cat([z > 0 for z in _pre_activations(model, a + t[:, None] * (b - a))], 1)
    change = (pattern[1:] != pattern[:-1]).any(dim=1)  # [T − 1]
    return torch.stack([t[:-1][change], t[1:][change]], dim=1)


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.PReLU])
@pytest.mark.parametrize("seed", [0, 1])
def test_segment_pieces_match_dense_sampling(act, seed):
    model = _mlp(seed, act, width=10, inputs=4)
    gen = torch.Generator().manual_seed(10 + seed)
    a, b = torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64)
    got = segment_pieces(model, a, b)
    for s in range(3):
        cells = _sampled_changes(model, a[s], b[s], 40_000)
        assert int(got.pieces[s]) == len(cells) + 1 > 3
        breaks = got.breakpoints[s, : len(cells)]
        assert ((breaks >= cells[:, 0]) & (breaks <= cells[:, 1])).all()
        assert got.breakpoints[s, len(cells) :].isnan().all()


def test_segments_through_the_origin_of_a_bias_free_network():
    """A bias-free ReLU network is positively homogeneous: one region along any ray from 0,
    two along a segment through 0 (every neuron meets zero at the same t = 1/2)."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(3, 12, bias=False),
        nn.ReLU(),
        nn.Linear(12, 12, bias=False),
        nn.ReLU(),
        nn.Linear(12, 2, bias=False),
    ).double()
    b = torch.randn(4, 3, dtype=F64)
    ray = segment_pieces(model, torch.zeros_like(b), b)
    assert ray.pieces.tolist() == [1, 1, 1, 1] and ray.breakpoints.shape == (4, 0)
    through = segment_pieces(model, -b, b)
    assert through.pieces.tolist() == [2, 2, 2, 2]
    assert through.breakpoints[:, 0].tolist() == [0.5] * 4


def test_segment_walk_step_limit():
    model = _mlp(0, width=10, inputs=4)
    a, b = -3 * torch.ones(1, 4, dtype=F64), 3 * torch.ones(1, 4, dtype=F64)
    assert int(segment_pieces(model, a, b).pieces[0]) > 2
    with pytest.raises(ValueError, match="more than max_steps=2 regions; raise max_steps="):
        segment_pieces(model, a, b, max_steps=2)


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.mark.parametrize("fn", ["complexity", "segments"])
def test_hooks_are_removed_when_the_forward_raises(fn):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), _Boom())
    x = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        if fn == "complexity":
            local_complexity(model, x, radius=0.1, frame=torch.eye(2))
        else:
            segment_pieces(model, x, x + 1)
    assert hook_count(model) == 0


def _measured(model: nn.Module, fn: str, gen: torch.Generator):
    if fn == "complexity":  # BatchNorm, ReLU, MaxPool2d, Dropout2d
        got = local_complexity(
            model, torch.randn(3, 1, 8, 8, generator=gen), radius=0.1, generator=gen
        )
        return got.layers, got.counts
    x = torch.randn(3, 8, generator=gen)  # ReLU, Dropout
    return ("pieces",), segment_pieces(model, x, x.flip(0)).pieces


@pytest.mark.parametrize(("case", "fn"), [("cnn", "complexity"), ("mlp", "segments")])
def test_nothing_of_the_model_or_the_global_rng_changes(case, fn):
    torch.manual_seed(0)
    model = MODELS[case]().train()
    for m in model.modules():
        m.momentum = 1.0  # a BatchNorm forward in train mode would overwrite its statistics
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    first = _measured(model, fn, torch.Generator().manual_seed(1))
    assert first[0] in [("2", "3"), ("pieces",)] and first[1].sum() > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert hook_count(model) == 0
    again = _measured(model, fn, torch.Generator().manual_seed(1))  # dropout stays off
    assert torch.equal(first[1], again[1])


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Tanh()), r"'2' \(Tanh\) is not piecewise"),
        (nn.Sequential(nn.Linear(2, 2), nn.GELU()), r"\(GELU\) is not piecewise linear"),
        (nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.LayerNorm(2)), r"\(LayerNorm\) is not"),
        (MODELS["transformer"](), r"'block' \(TransformerEncoderLayer\) is not piecewise"),
        (MODELS["rnn"](), r"'rnn' \(GRU\) is not piecewise linear.*nn.ReLU, nn.LeakyReLU"),
        (_Functional(), "no nn.ReLU.*module.*F.relu.*use nn.ReLU modules"),
        (
            nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False), nn.ReLU()),
            "no running statistics",
        ),
    ],
)
def test_unsupported_models_raise_naming_the_supported_modules(model, match):
    with pytest.raises(ValueError, match=match):
        local_complexity(model, torch.zeros(2, 8), radius=0.1, frame=torch.eye(8)[:2])
    assert hook_count(model) == 0


def test_segment_walk_rejects_max_pool():
    with pytest.raises(ValueError, match=r"'3' \(MaxPool2d\) is a max-pool.*segment walk"):
        segment_pieces(MODELS["cnn"](), torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8))


def test_compiled_models_are_measured_through_their_eager_module():
    pytest.importorskip("torch._dynamo")
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 2))
    compiled = torch.compile(eager, backend="eager")
    x, frame = torch.randn(5, 2), torch.eye(2)
    want = local_complexity(eager, x, radius=0.3, frame=frame)
    got = local_complexity(compiled, x, radius=0.3, frame=frame)
    assert torch.equal(got.counts, want.counts) and want.counts.sum() > 0
    assert got.layers == want.layers
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(segment_pieces(compiled, a, b).pieces, segment_pieces(eager, a, b).pieces)
    assert hook_count(eager) == 0


def test_activations_must_be_batch_first():
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(2, 3), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x).T)

    with pytest.raises(ValueError, match=r"'act' saw a tensor of shape \(3, 8\), expected 8 rows"):
        local_complexity(Transposed(), torch.zeros(2, 2), radius=0.1, frame=torch.eye(2))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m: local_complexity(m, torch.zeros(4), radius=0.1, frame=torch.eye(4)),
            r"points must be a floating tensor \[N, \*shape\]",
        ),
        (
            lambda m: local_complexity(m, torch.zeros(2, 4), radius=0.0, frame=torch.eye(4)),
            "radius must be a finite number > 0",
        ),
        (
            lambda m: local_complexity(m, torch.zeros(2, 4), radius=0.1),
            "pass frame= or a torch.Generator as generator=",
        ),
        (
            lambda m: local_complexity(m, torch.zeros(2, 4), radius=0.1, frame=torch.eye(3)),
            r"frame must be \[k, 4\]",
        ),
        (
            lambda m: random_frame(5, 4, generator=torch.Generator()),
            r"frame dim must be an integer in \[1, 4\]",
        ),
        (
            lambda m: segment_pieces(m, torch.zeros(2, 4), torch.zeros(3, 4)),
            "a and b must be floating tensors of one shape",
        ),
        (
            lambda m: segment_pieces(m, torch.zeros(2, 4), torch.zeros(2, 4), max_steps=0),
            "max_steps must be an integer >= 1",
        ),
    ],
)
def test_bad_arguments(call, match):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=match):
        call(model)
