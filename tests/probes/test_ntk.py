"""The empirical NTK against per-example backward passes in float64, centered alignment
against a hand computation, and NTKAlignment in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.cases import MODELS, batch
from tests.contract import watched_run
from tests.gradients.test_ntk import brute_force_kernel, budget, points, tiny
from trainprobe.functional import network
from trainprobe.gradients.ntk import (
    centered_alignment,
    label_directions,
    label_kernel,
    output_gradients,
    relative_change,
    tangent_kernel,
)
from trainprobe.probes import StepContext, at_steps, every
from trainprobe.probes.ntk import NTKAlignment
from trainprobe.probes.ntk_response import NTKResponse


def _mlp(size: int = 6):
    torch.manual_seed(0)
    model = MODELS["mlp"]().double()  # in train mode: dropout must be switched off
    x, y = batch("mlp", 0, size=size)
    return model, x.double(), y


def _jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[C, n, P]``: ``∂z_c(x_i)/∂w`` by one backward pass per example and output (eval)."""
    was = model.training
    model.eval()
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]  # [C]
        per_output = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], list(model.parameters()), retain_graph=True)
            per_output.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_output))  # [C, P]
    model.train(was)
    return torch.stack(rows, dim=1)  # [C, n, P]


def _ctx(model: nn.Module, data=None, step: int = 0) -> StepContext:
    return StepContext(step=step, model=model, params=dict(model.named_parameters()), batch=data)


def test_trace_kernel_and_projections_against_per_example_backward():
    model, x, _ = _mlp()
    jac = _jacobians(model, x)  # [3, 6, P]
    kernel, used = tangent_kernel(network(model), x, torch.eye(3, dtype=torch.float64))
    expected = torch.einsum("cip,cjp->ij", jac, jac)  # Σ_c J_c J_cᵀ
    assert used == "vmap" and model.training
    torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-12)
    v = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-1.0, 3.0]], dtype=torch.float64)  # [C, k]
    projected = torch.einsum("cj,cip->jip", v, jac)  # [k, n, P]: J_{v_j}
    got, _ = tangent_kernel(network(model), x, v, method="loop")
    torch.testing.assert_close(
        got, torch.einsum("jip,jkp->ik", projected, projected), rtol=1e-12, atol=1e-12
    )
    rows = output_gradients(network(model), x, v[:, 1])
    torch.testing.assert_close(rows.grads, projected[1], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(rows.losses, model(x) @ v[:, 1])  # the values f_v(x_i)
        model.train()


def test_centered_alignment_by_hand():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    kernel = a @ a.T
    labels = torch.tensor([0, 1, 1, 2, 0])
    target = label_kernel(labels)
    one_hot = np.eye(3)[labels.numpy()]
    np.testing.assert_array_equal(target.numpy(), one_hot @ one_hot.T)
    h = np.eye(5) - np.ones((5, 5)) / 5
    kc, tc = h @ kernel.numpy() @ h, h @ target.numpy() @ h
    expected = (kc * tc).sum() / (np.linalg.norm(kc) * np.linalg.norm(tc))
    assert float(centered_alignment(kernel, target)) == pytest.approx(expected, rel=1e-12)
    assert float(centered_alignment(3 * target + 7, target)) == pytest.approx(1.0, rel=1e-12)
    real = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(label_kernel(real), torch.outer(real, real))
    assert float(relative_change(2 * kernel, kernel)) == pytest.approx(1.0, rel=1e-12)


def test_label_directions_pick_label_carrying_eigenvectors():
    basis = torch.linalg.qr(
        torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )[0]
    kernel = basis @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)) @ basis.T
    y = 3 * basis[:, 1] + 1 * basis[:, 3]  # energy 0.9 on λ=4, 0.1 on λ=1, none elsewhere
    vectors, proj = label_directions(kernel, y, count=4, min_energy=0.05)
    assert vectors.shape == (4, 2)
    torch.testing.assert_close(vectors.abs(), basis[:, [1, 3]].abs(), rtol=0, atol=1e-12)
    torch.testing.assert_close(proj.abs(), torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert label_directions(kernel, y, count=4, min_energy=0.95) is None


def test_linear_model_kernel_never_moves():
    """``f = wᵀx + b`` has ``J_i = [x_i, 1]`` whatever ``w``: ``K = XXᵀ + 11ᵀ`` exactly, the
    centering removes ``11ᵀ``, and ``ntk/change`` is 0 after training (a lazy model)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(10, generator=gen, dtype=torch.float64)
    probe = NTKAlignment(data=(x, y))
    first = probe.measure(_ctx(model))
    expected = centered_alignment(x @ x.T, torch.outer(y, y))
    assert float(first["ntk/alignment"]) == pytest.approx(float(expected), rel=1e-12)
    assert float(first["ntk/trace"]) == pytest.approx(float((x * x).sum() + 10), rel=1e-12)
    assert float(first["ntk/change"]) == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        ((model(x)[:, 0] - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert float(probe.measure(_ctx(model))["ntk/change"]) == 0


def test_sketch_above_max_outputs_is_fixed_and_projects():
    model, x, y = _mlp()
    probe = NTKAlignment(data=(x, y), max_outputs=2, seed=5)
    v = probe.projections(3)  # [3, 2]
    torch.testing.assert_close(v.abs(), torch.full((3, 2), 2**-0.5, dtype=torch.float64))
    assert torch.equal(v, probe.projections(3))  # the same columns at every measurement
    assert torch.equal(NTKAlignment(max_outputs=3).projections(3), torch.eye(3).double())
    got = probe.measure(_ctx(model))
    kernel, _ = tangent_kernel(network(model), x, v)
    assert float(got["ntk/trace"]) == pytest.approx(float(torch.trace(kernel)), rel=1e-12)
    assert float(got["ntk/alignment"]) == pytest.approx(
        float(centered_alignment(kernel, label_kernel(y))), rel=1e-12
    )


def test_subset_is_frozen_from_the_first_step_batch_until_reset():
    model, x, y = _mlp(size=8)
    probe = NTKAlignment(max_examples=4)
    probe.measure(_ctx(model, (x, y)))
    again = probe.measure(_ctx(model, (x.flip(0), y.flip(0))))  # another batch: ignored
    assert float(again["ntk/change"]) == 0
    probe.reset()
    other = probe.measure(_ctx(model, (x[4:], y[4:])))
    assert float(other["ntk/change"]) == 0  # a new K_0 on the new subset
    alone = NTKAlignment(data=(x[4:], y[4:])).measure(_ctx(model))
    assert float(other["ntk/trace"]) == float(alone["ntk/trace"])


def test_bad_inputs_are_refused():
    model, x, y = _mlp()
    with pytest.raises(ValueError, match="needs data: pass data"):
        NTKAlignment().measure(_ctx(model))
    with pytest.raises(ValueError, match="integer labels must have shape"):
        NTKAlignment(data=(x, y[:, None].repeat(1, 2))).measure(_ctx(model))
    with pytest.raises(ValueError, match="projections must be a"):
        tangent_kernel(network(model), x, torch.ones(3))
    with pytest.raises(ValueError, match="the output projection has 2 entries"):
        output_gradients(network(model), x, torch.ones(2))
    with pytest.raises(ValueError, match="must be square matrices of one shape"):
        centered_alignment(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match=r"must return a tensor \[n, C\]"):
        NTKAlignment(data=(x, y)).measure(_ctx(_TupleModel()))


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3).double()

    def forward(self, x: torch.Tensor):
        return (self.lin(x),)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_in_training_bit_identical_rng_untouched_keys_documented(tmp_path, model):
    """K_0 at step 0 (change 0), the MLP's/CNN's kernel moves under Adam (rich, not lazy)."""
    probe = NTKAlignment(schedule=at_steps(0, 11), max_examples=8)
    run, _ = watched_run(tmp_path, model, [probe], steps=12)
    assert sorted(run.keys("ntk/")) == ["ntk/alignment", "ntk/change", "ntk/trace"]
    change = run.series("ntk/change").values.ravel()
    assert change[0] == 0 and change[1] > 1e-3
    assert np.all(np.abs(run.series("ntk/alignment").values) <= 1)


@pytest.mark.parametrize("n", [300, 600])
def test_probes_above_256_examples_by_blocks_match_per_example_autograd(n):
    """Past the old cap, with a budget that forces blocks of rows: the records are those of
    the brute-force kernel (1e-10 relative)."""
    model, x = tiny(), points(n)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()  # two classes
    tight = budget(n, held=n // 5, streamed=16)
    got = NTKAlignment(data=(x, y), max_examples=n, max_memory=tight).measure(_ctx(model))
    kernel = brute_force_kernel(model, x, torch.eye(2, dtype=torch.float64))
    alignment = float(centered_alignment(kernel, label_kernel(y)))
    assert float(got["ntk/alignment"]) == pytest.approx(alignment, rel=1e-10)
    assert float(got["ntk/trace"]) == pytest.approx(float(torch.trace(kernel)), rel=1e-10)
    response = NTKResponse(data=(x, y), max_examples=n, max_memory=tight)
    ratios = response.measure(_ctx(model))
    v = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)  # f = z_1 − z_0
    labels = 2.0 * y.double() - 1
    vectors, proj = label_directions(
        brute_force_kernel(model, x, v), labels, count=4, min_energy=0.02
    )
    with torch.no_grad():
        expected = (vectors.T @ (model(x) @ v)[:, 0]) / proj  # [k]
    assert len(expected) >= 2
    for k, r in enumerate(expected):
        assert float(ratios[f"ntk_response/dir_{k}"]) == pytest.approx(float(r), rel=1e-10)


def test_a_max_memory_too_small_for_the_kernel_is_refused():
    with pytest.raises(ValueError, match=r"NTKAlignment: max_memory=2000000 bytes cannot hold"):
        NTKAlignment(max_examples=600, max_memory=2_000_000)
    model, x = tiny(), points(600)
    y = (x[:, 0] > 0).long()
    need = budget(600, 1, 1)
    probe = NTKResponse(data=(x, y), max_examples=600, max_memory=need - 1)
    message = (
        rf"NTKResponse: the NTK of n=600 examples needs at least {need} bytes.*"
        rf"max_memory={need - 1}; pass max_memory={need} or more, fewer examples "
        r"\(max_examples=\)"
    )
    with pytest.raises(ValueError, match=message):
        probe.measure(_ctx(model))


def test_default_schedule():
    assert NTKAlignment().schedule == every(100)
