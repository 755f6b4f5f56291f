"""The spectra core against exact references: svdvals, known singular values, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainprobe.spectra import (
    GATES,
    as_matrix,
    effective_rank,
    ema_update_,
    energy_fraction,
    gate_blocks,
    is_matrix,
    randomized_svdvals,
    slow_ratio,
    spectral_norm,
    spectrum,
    stable_rank,
)
from trainprobe.spectra.matrix import check_int
from trainprobe.spectra.temporal import check_alpha

F64 = torch.float64


def known(rows: int, cols: int, sigma, *, seed: int = 0) -> torch.Tensor:
    """``U diag(σ) Vᵀ`` with random orthonormal ``U [rows, m]``, ``V [cols, m]`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.as_tensor(sigma, dtype=F64)
    u = torch.linalg.qr(torch.randn(rows, len(sigma), generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(cols, len(sigma), generator=gen, dtype=F64)).Q
    return u @ torch.diag(sigma) @ v.T


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    gru = nn.GRU(3, 5)
    return {
        "linear": nn.Linear(7, 4).weight,
        "conv": nn.Conv2d(3, 6, (3, 2)).weight,
        "gru_ih": gru.weight_ih_l0,
        "gru_hh": gru.weight_hh_l0,
        "embedding": nn.Embedding(9, 4).weight,
    }


# -- matrices ------------------------------------------------------------------------


def test_as_matrix_shapes_and_views():
    w = weights()
    assert as_matrix(w["linear"]).shape == (4, 7)
    conv = as_matrix(w["conv"])
    assert conv.shape == (6, 3 * 3 * 2)
    assert conv.data_ptr() == w["conv"].data_ptr()  # a view, no copy
    assert torch.equal(conv[2], w["conv"][2].reshape(-1))  # row = one output channel
    assert as_matrix(w["gru_hh"]).shape == (15, 5)
    assert as_matrix(w["embedding"]).shape == (9, 4)
    assert not is_matrix(torch.zeros(3)) and not is_matrix(torch.zeros(0, 3))
    assert is_matrix(torch.zeros(1, 1))


def test_as_matrix_refuses_what_has_no_spectrum():
    with pytest.raises(ValueError, match=r"shape \(4,\) is not a matrix.*biases and norm"):
        as_matrix(torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(\) is not a matrix"):
        as_matrix(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"shape \(0, 3\) is not a matrix"):
        as_matrix(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="as_matrix takes a tensor, got list"):
        as_matrix([[1.0]])


def test_gate_blocks_split_recurrent_weights_in_pytorch_order():
    torch.manual_seed(0)
    gru, lstm, rnn = nn.GRU(2, 4), nn.LSTM(2, 4, proj_size=3), nn.RNN(2, 4)
    blocks = gate_blocks(gru.weight_hh_l0, gru.mode)
    assert list(blocks) == ["r", "z", "n"]
    assert torch.equal(blocks["z"], gru.weight_hh_l0[4:8])
    blocks = gate_blocks(lstm.weight_hh_l0, lstm.mode)  # [4·4, 3] with a projection
    assert list(blocks) == list(GATES["LSTM"])
    assert torch.equal(blocks["g"], lstm.weight_hh_l0[8:12]) and blocks["g"].shape == (4, 3)
    assert gate_blocks(rnn.weight_hh_l0, rnn.mode) == {}
    with pytest.raises(ValueError, match=r"mode must be one of .*got 'GRU2'"):
        gate_blocks(gru.weight_hh_l0, "GRU2")
    with pytest.raises(ValueError, match=r"a LSTM recurrent weight is \[4·H, cols\], got shape"):
        gate_blocks(torch.zeros(6, 3), "LSTM")


# -- singular values -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "conv", "gru_ih", "gru_hh", "embedding"])
def test_exact_path_is_svdvals_of_the_reshaped_matrix(name):
    w = weights()[name].detach()
    found = spectrum(as_matrix(w), top=2)
    reference = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    assert found.complete
    assert torch.equal(found.sigma, reference)
    assert torch.equal(found.frobenius, torch.linalg.matrix_norm(w.reshape(w.shape[0], -1)))


def test_size_threshold_picks_the_path():
    a = known(40, 30, torch.linspace(3, 1, 30))
    assert spectrum(a, top=3, exact_max=30, oversample=2).complete  # min dim == exact_max
    large = spectrum(a, top=3, exact_max=29, oversample=2)
    assert not large.complete and large.sigma.shape == (3,)
    assert spectrum(a, top=3, exact_max=5, oversample=27).complete  # sketch no smaller
    assert large.frobenius == pytest.approx(torch.linalg.matrix_norm(a).item(), rel=1e-14)


def test_randomized_svd_on_a_decaying_spectrum():
    """``σ_i = 0.8^i``: with q = 2 power iterations the top 5 are exact to 1e-8 relative."""
    sigma = 0.8 ** torch.arange(120, dtype=F64)
    a = known(300, 200, sigma)
    rng = torch.get_rng_state()
    gen = torch.Generator().manual_seed(1)
    found = randomized_svdvals(a, 5, oversample=10, power_iters=2, generator=gen)
    assert torch.equal(torch.get_rng_state(), rng)  # only the explicit generator draws
    torch.testing.assert_close(found, sigma[:5], rtol=1e-8, atol=0)
    rough = randomized_svdvals(a, 5, power_iters=0, generator=torch.Generator().manual_seed(1))
    assert (rough <= sigma[:5] * (1 + 1e-12)).all()
    torch.testing.assert_close(rough, sigma[:5], rtol=2e-2, atol=0)  # no power iteration


@pytest.mark.parametrize("seed", range(4))
def test_randomized_svd_on_a_flat_spectrum(seed):
    """``σ`` flat from 2 to 1: estimates are low (never high) by at most 10% with q = 2."""
    sigma = torch.linspace(2, 1, 150, dtype=F64)
    a = known(300, 200, sigma)
    gen = torch.Generator().manual_seed(seed)
    found = randomized_svdvals(a, 5, oversample=10, power_iters=2, generator=gen)
    assert (found <= sigma[:5] * (1 + 1e-12)).all()  # σ_i(QQᵀA) <= σ_i(A)
    assert ((sigma[:5] - found) / sigma[:5]).max() < 0.10


def test_randomized_svd_is_reproducible_and_exact_when_the_sketch_is_full():
    a = known(60, 50, torch.linspace(5, 1, 50))
    first = randomized_svdvals(a, 4, generator=torch.Generator().manual_seed(3))
    again = randomized_svdvals(a, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert torch.equal(randomized_svdvals(a, 4), randomized_svdvals(a, 4))  # default seed 0
    full = randomized_svdvals(a, 4, oversample=100, power_iters=0)  # l capped at 50
    torch.testing.assert_close(full, torch.linalg.svdvals(a)[:4], rtol=1e-12, atol=0)
    single = randomized_svdvals(a.float(), 2, oversample=48)  # full sketch
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, torch.linalg.svdvals(a.float())[:2], rtol=1e-4, atol=0)


def test_half_precision_is_computed_in_float32():
    a = known(20, 10, torch.linspace(3, 1, 10)).to(torch.bfloat16)
    found = spectrum(a)
    assert found.sigma.dtype == torch.float32
    torch.testing.assert_close(found.sigma, torch.linalg.svdvals(a.float()))


def test_singular_value_options_are_checked():
    a = known(10, 8, torch.ones(8))
    with pytest.raises(ValueError, match=r"spectrum takes a non-empty 2-D matrix, got shape"):
        spectrum(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match=r"spectrum takes a floating-point matrix, got torch.int64"):
        spectrum(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"spectrum takes a 2-D tensor, got ndarray"):
        spectrum(a.numpy())
    with pytest.raises(ValueError, match=r"spectrum\(top=...\) must be >= 1, got 0"):
        spectrum(a, top=0)
    with pytest.raises(TypeError, match=r"spectrum\(top=...\) must be an int, got bool"):
        spectrum(a, top=True)
    with pytest.raises(ValueError, match=r"spectrum\(exact_max=...\) must be >= 1"):
        spectrum(a, exact_max=0)
    with pytest.raises(ValueError, match=r"spectrum\(oversample=...\) must be >= 0"):
        spectrum(a, oversample=-1)
    with pytest.raises(ValueError, match=r"spectrum\(power_iters=...\) must be >= 0"):
        spectrum(a, power_iters=-1)
    with pytest.raises(ValueError, match=r"k=9 exceeds min\(rows, cols\)=8 .* at most 8"):
        randomized_svdvals(a, 9)
    with pytest.raises(ValueError, match=r"randomized_svdvals\(oversample=...\) must be >= 0"):
        randomized_svdvals(a, 2, oversample=-2)
    with pytest.raises(ValueError, match=r"randomized_svdvals\(power_iters=...\) must be >= 0"):
        randomized_svdvals(a, 2, power_iters=-1)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator.*got int"):
        randomized_svdvals(a, 2, generator=0)
    with pytest.raises(TypeError, match=r"x must be an int, got float 1.5"):
        check_int("x", 1.5, 0)


# -- summaries -----------------------------------------------------------------------


def test_summaries_equal_hand_computed_values():
    """``σ = (4, 2, 1, 1, 0)``: srank 22/16, erank 2^1.75, top-2 energy 20/22."""
    a = known(6, 5, [4.0, 2.0, 1.0, 1.0, 0.0])
    found = spectrum(a)
    expected = torch.tensor([4.0, 2, 1, 1, 0], dtype=F64)
    torch.testing.assert_close(found.sigma, expected, atol=1e-12, rtol=0)
    assert stable_rank(found.frobenius, found.sigma[0]).item() == pytest.approx(22 / 16, rel=1e-12)
    # p = (1/2, 1/4, 1/8, 1/8, 0): H = 1.75 ln 2
    assert effective_rank(found.sigma).item() == pytest.approx(2**1.75, rel=1e-10)
    assert energy_fraction(found.sigma, found.frobenius, 2).item() == pytest.approx(20 / 22)
    assert energy_fraction(found.sigma, found.frobenius, 9).item() == pytest.approx(1.0)


def test_effective_rank_extremes_batching_and_truncation():
    assert effective_rank(torch.ones(7, dtype=F64)).item() == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0, 0])).item() == pytest.approx(1.0)
    batch = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    torch.testing.assert_close(effective_rank(batch), torch.tensor([2.0, 1.0]))
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=F64)
    for m in range(1, 5):  # the renormalised top part never exceeds the whole
        assert effective_rank(sigma[:m]) <= effective_rank(sigma) + 1e-12
        assert effective_rank(sigma[:m]) <= m + 1e-12
    assert math.isnan(effective_rank(torch.zeros(3)).item())
    zero = torch.zeros(3, 2)
    assert math.isnan(stable_rank(torch.linalg.matrix_norm(zero), torch.tensor(0.0)).item())


def test_summary_arguments_are_checked():
    with pytest.raises(ValueError, match=r"effective_rank takes \[..., m\] .* got shape \(\)"):
        effective_rank(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"m >= 1, got shape \(2, 0\)"):
        effective_rank(torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"energy_fraction: r must be >= 1, got 0"):
        energy_fraction(torch.ones(3), torch.tensor(2.0), 0)


# -- spectral norm -------------------------------------------------------------------


def _gap(a: torch.Tensor, estimate) -> float:
    """Distance from ``σ̂²`` to the nearest ``σ_j²`` (the residual bounds it)."""
    return (torch.linalg.svdvals(a) ** 2 - estimate.value**2).abs().min().item()


def test_power_iteration_converges_over_warm_started_calls():
    """``σ = (3, 2, 1, 0.5)``: ``tan φ`` shrinks by 4/9 per iteration; 4 per call."""
    a = known(40, 30, [3.0, 2.0, 1.0, 0.5])
    found = spectral_norm(a, iters=4)
    errors = []
    for _ in range(4):
        assert found.value.item() <= 3.0 * (1 + 1e-14)  # a Rayleigh quotient: never above
        assert _gap(a, found) <= found.residual.item() + 1e-12  # the residual bound
        errors.append(1 - found.value.item() / 3.0)
        found = spectral_norm(a, start=found.vector, iters=4)
    assert errors == sorted(errors, reverse=True)
    assert errors[0] < 1e-4 and errors[-1] < 1e-12
    assert found.iters == 4 and found.vector.shape == (30,)
    assert torch.linalg.vector_norm(found.vector).item() == pytest.approx(1.0)


def test_warm_start_tracks_a_slowly_changing_matrix():
    a = known(40, 30, [3.0, 2.0, 1.0, 0.5])
    previous = spectral_norm(a, iters=8)
    noise = torch.randn(40, 30, generator=torch.Generator().manual_seed(5), dtype=F64)
    moved = a + 1e-3 * noise  # a weight after a few optimizer steps
    top = torch.linalg.svdvals(moved)[0].item()
    warm = spectral_norm(moved, start=previous.vector, iters=2)
    cold = spectral_norm(moved, iters=2)
    assert 1 - warm.value.item() / top < 1e-6
    assert 1 - cold.value.item() / top > 1e-4  # what the warm start saves


def test_power_iteration_on_a_zero_matrix_and_options():
    zero = spectral_norm(torch.zeros(3, 4))
    assert zero.value.item() == 0.0 and zero.residual.item() == 0.0
    assert torch.isfinite(zero.vector).all()
    with pytest.raises(ValueError, match=r"start must be a \[4\] vector .* got \(3,\)"):
        spectral_norm(torch.ones(3, 4), start=torch.ones(3))
    with pytest.raises(ValueError, match=r"start must be a \[4\] vector .* got list"):
        spectral_norm(torch.ones(3, 4), start=[1.0] * 4)
    with pytest.raises(ValueError, match=r"spectral_norm\(iters=...\) must be >= 1, got 0"):
        spectral_norm(torch.ones(3, 4), iters=0)
    with pytest.raises(ValueError, match=r"spectral_norm takes a non-empty 2-D matrix"):
        spectral_norm(torch.ones(4))


# -- slow and fast parts -------------------------------------------------------------


def test_ema_update_equals_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(3, 4, generator=gen, dtype=F64) for _ in range(6)]
    ema, alpha = [gs[0].clone()], 0.9
    for g in gs[1:]:
        ema_update_(ema, [g], alpha)
    # ema_T = α^T g_0 + (1 − α) Σ_{t=1..T} α^{T−t} g_t
    closed = alpha**5 * gs[0] + (1 - alpha) * sum(alpha ** (5 - t) * gs[t] for t in range(1, 6))
    torch.testing.assert_close(ema[0], closed, rtol=1e-12, atol=1e-14)
    ema_update_([], [], alpha)  # nothing to do


def test_slow_ratio_values():
    g = torch.tensor([3.0, 4.0], dtype=F64)
    assert slow_ratio([g.clone()], [g]).item() == 1.0  # constant gradient: all slow
    ema, now = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64)
    assert slow_ratio([ema], [now]).item() == pytest.approx(1 / (1 + 4))
    mixed = slow_ratio([ema, torch.zeros(2)], [now, torch.zeros(2)])
    assert mixed.dtype == F64 and math.isnan(mixed[1].item())


def test_slow_ratio_noise_floor():
    """Zero-mean noise: ``ρ → (1 − α)/(1 − α + 2α²)`` (0.0581 at α = 0.9)."""
    alpha, gen = 0.9, torch.Generator().manual_seed(0)
    ema = [torch.randn(2000, generator=gen, dtype=F64)]
    ratios = []
    for t in range(400):
        g = torch.randn(2000, generator=gen, dtype=F64)
        ema_update_(ema, [g], alpha)
        if t >= 100:  # the start is forgotten
            ratios.append(slow_ratio(ema, [g]).item())
    floor = (1 - alpha) / (1 - alpha + 2 * alpha**2)
    assert sum(ratios) / len(ratios) == pytest.approx(floor, rel=0.03)


def test_temporal_arguments_are_checked():
    with pytest.raises(ValueError, match=r"ema_update_: alpha must be in \(0, 1\) .* got 1.0"):
        ema_update_([torch.zeros(2)], [torch.ones(2)], 1.0)
    with pytest.raises(TypeError, match=r"ema_update_: alpha must be a float in \(0, 1\)"):
        ema_update_([torch.zeros(2)], [torch.ones(2)], True)
    with pytest.raises(ValueError, match=r"2 averages but 1 values; give one value each"):
        ema_update_([torch.zeros(2)] * 2, [torch.ones(2)], 0.5)
    with pytest.raises(ValueError, match=r"slow_ratio takes as many values .* got 0 and 0"):
        slow_ratio([], [])
    with pytest.raises(ValueError, match=r"slow_ratio takes as many values .* got 1 and 2"):
        slow_ratio([torch.zeros(2)], [torch.ones(2)] * 2)
    with pytest.raises(TypeError, match=r"x: alpha must be a float in \(0, 1\), got '0.9'"):
        check_alpha("0.9", "x")
    assert check_alpha(0.5, "x") == 0.5
