"""GradientFlow: the gradient at each module's output and through time, against autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import trainprobe
from tests.cases import hook_count
from tests.contract import watched_run
from trainprobe.analysis import analyze, detect_vanishing_gradients
from trainprobe.probes import GradientFlow, every
from trainprobe.store import Run

F64 = torch.float64


class Recurrent(nn.Module):
    """A plain tanh RNN reading a whole sequence, classified from its last state."""

    def __init__(self, hidden: int = 16, *, gain: float = 1.0, orthogonal: bool = False) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)
        if orthogonal:
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # [B, T, H]
        return self.head(out[:, -1])


def _watched(run_dir, model, probe, batches, *, accumulate: int = 1) -> Run:
    """One step block with ``accumulate`` backward passes, watched by ``probe``."""
    with trainprobe.watch(model, [probe], run_dir=run_dir) as mon, mon.step(0) as s:
        for x, y in batches[:accumulate]:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        s.log(loss=loss)
    return Run(run_dir)


def _reference_output_grads(model, modules, batches, accumulate):
    """``{module: ||∂L/∂y||}`` summed (in squares) over the backward passes, by autograd."""
    squares = dict.fromkeys(modules, 0.0)
    for x, y in batches[:accumulate]:
        outputs = {}
        handles = [
            dict(model.named_modules())[m].register_forward_hook(
                lambda _m, _i, out, m=m, seen=outputs: seen.__setitem__(m, out)
            )
            for m in modules
        ]
        loss = F.cross_entropy(model(x), y)
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [outputs[m] for m in modules])
        for m, g in zip(modules, grads, strict=True):
            squares[m] += float(g.pow(2).sum())
    return {m: squares[m] ** 0.5 for m in modules}


@pytest.mark.parametrize("accumulate", [1, 3])
def test_output_gradient_norms_match_autograd_on_an_mlp(tmp_path, accumulate):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    model = model.double()
    batches = [(torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))) for _ in range(3)]
    modules = ["0", "1", "2", "3", "4"]
    expected = _reference_output_grads(model, modules, batches, accumulate)
    model.zero_grad()
    probe = GradientFlow(schedule=every(1))
    run = _watched(tmp_path / "r", model, probe, batches, accumulate=accumulate)
    for m in modules:
        got = run.series(f"grad_flow/norm/{m}").values[0]
        assert got == pytest.approx(expected[m], rel=1e-12), m
    assert not run.keys("grad_flow/first/")  # no sequence module
    assert hook_count(model) == 0


def test_positions_of_a_recurrent_input_match_autograd(tmp_path):
    torch.manual_seed(1)
    model = Recurrent().double()
    x, y = torch.randn(5, 30, 3, dtype=F64), torch.randint(0, 2, (5,))
    leaf = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf)
    per_position = gx.pow(2).sum((0, 2)).sqrt()  # [T]
    run = _watched(
        tmp_path / "r", model, GradientFlow(schedule=every(1), profile_points=7), [(x, y)]
    )
    first, last = per_position[0].item(), per_position[-1].item()
    assert run.series("grad_flow/first/rnn").values[0] == pytest.approx(first, rel=1e-12)
    assert run.series("grad_flow/last/rnn").values[0] == pytest.approx(last, rel=1e-12)
    assert run.series("grad_flow/ratio/rnn").values[0] == pytest.approx(first / last, rel=1e-12)
    index = torch.linspace(0, 29, 7).round().long()
    profile = run.series("grad_flow/profile/rnn").values[0]
    np.testing.assert_allclose(profile, per_position[index].numpy(), rtol=1e-12)
    assert not x.requires_grad  # the user's tensor is untouched


def test_a_packed_sequence_gets_its_norm_and_no_positions(tmp_path):
    torch.manual_seed(2)
    rnn = nn.GRU(3, 8, batch_first=True)
    head = nn.Linear(8, 2)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, head

        def forward(self, x):
            packed = pack_padded_sequence(x, [6, 4, 3], batch_first=True)
            out, _ = self.rnn(packed)
            return self.head(out.data[:3])  # the first position of each sequence

    model = Packed()
    batches = [(torch.randn(3, 6, 3), torch.tensor([0, 1, 0]))]
    run = _watched(tmp_path / "r", model, GradientFlow(schedule=every(1)), batches)
    assert run.series("grad_flow/norm/rnn").values[0] > 0
    assert not run.keys("grad_flow/ratio/")


def test_training_with_it_is_bit_identical_on_a_recurrent_net(tmp_path):
    run, _ = watched_run(tmp_path, "rnn", [GradientFlow(schedule=every(1))], steps=4)
    assert run.series("grad_flow/ratio/rnn").steps.tolist() == [0, 1, 2, 3]


def test_a_compiled_module_is_refused_with_the_way_out():
    pytest.importorskip("torch._dynamo")
    compiled = torch.compile(nn.Linear(2, 2), backend="eager")
    with pytest.raises(RuntimeError, match=r"cannot hook a torch.compile'd module .*_orig_mod"):
        GradientFlow().attach(compiled)
    with pytest.raises(ValueError, match=r"no module named \['nope'\]"):
        GradientFlow(modules=["nope"]).attach(nn.Linear(2, 2))


def _train_recurrent(run_dir, *, length: int, steps: int = 40, **init) -> Run:
    torch.manual_seed(3)
    model = Recurrent(**init)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(4)
    with trainprobe.watch(
        model,
        [GradientFlow(schedule=every(2)), trainprobe.LayerNorms(schedule=every(2))],
        run_dir=run_dir,
    ) as mon:
        for step in range(steps):
            x = torch.randn(16, length, 3, generator=gen)
            y = (x[:, 0, 0] > 0).long()  # the label is in the first position
            with mon.step(step) as s:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    return Run(run_dir)


def test_vanishing_through_time_is_found_in_a_recurrent_net_and_not_in_its_control(tmp_path):
    """A tanh RNN with a contracting recurrence (gain 0.3) over 60 steps: the first
    position's gradient underflows float32 (exactly 0) while its parameter gradients look
    normal. The control, orthogonal recurrent weights over 12 steps, keeps the first
    positions in reach (a ratio near 0.1; over 60 steps even a GRU or an LSTM at its
    default initialisation gets 1e-13)."""
    sick = _train_recurrent(tmp_path / "sick", length=60, gain=0.3)
    assert sick.series("grad_flow/ratio/rnn").values.max() < 1e-10
    (finding,) = [f for f in analyze(sick) if "through time" in f.message]
    assert finding.detector == "vanishing_gradients" and finding.keys == ("grad_flow/ratio/rnn",)
    assert finding.start_step == 0
    control = _train_recurrent(tmp_path / "control", length=12, orthogonal=True)
    assert np.median(control.series("grad_flow/ratio/rnn").values) > 1e-3
    assert not [f for f in detect_vanishing_gradients(control) if "through time" in f.message]


class Unrolled(nn.Module):
    """A tanh RNN unrolled by hand with an ``nn.RNNCell`` (one call per time step)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(3, 8)
        self.head = nn.Linear(8, 2)
        self.states: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 8)
        self.states = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            self.states.append(h)
        return self.head(h)


def test_a_cell_called_once_per_step_gives_the_hidden_state_gradients(tmp_path):
    """||∂L/∂h_t|| of each call's output, against autograd on the kept states, over two
    backward passes (the positions restart with each forward and add up)."""
    torch.manual_seed(5)
    model = Unrolled().double()
    batches = [(torch.randn(4, 12, 3, dtype=F64), torch.randint(0, 2, (4,))) for _ in range(2)]
    squares = torch.zeros(12, dtype=F64)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, model.states)
        squares += torch.stack([g.pow(2).sum() for g in grads])
    expected = squares.sqrt()
    run = _watched(tmp_path / "r", model, GradientFlow(schedule=every(1)), batches, accumulate=2)
    assert run.series("grad_flow/first/cell").values[0] == pytest.approx(
        expected[0].item(), rel=1e-12
    )
    assert run.series("grad_flow/last/cell").values[0] == pytest.approx(
        expected[-1].item(), rel=1e-12
    )
    assert hook_count(model) == 0


class InPlace(nn.Module):
    """A block that writes into its input in place (a position offset added with +=)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x += 1.0  # in place on the input: legal on data, and on what the probe passes on
        return self.proj(x).mean(1)


def test_a_module_writing_into_its_raw_input_still_trains_the_same(tmp_path):
    torch.manual_seed(6)
    model = InPlace()
    x, y = torch.randn(4, 5, 3), torch.randint(0, 2, (4,))
    reference = InPlace()
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(x.clone()), y).backward()
    probe = GradientFlow(schedule=every(1), time_dims={"": 1})
    run = _watched(tmp_path / "r", model, probe, [(x.clone(), y)])
    assert torch.equal(model.proj.weight.grad, reference.proj.weight.grad)
    assert run.series("grad_flow/profile/model").values.shape == (1, 5)
