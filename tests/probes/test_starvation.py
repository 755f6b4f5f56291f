"""FeatureAttribution and NTKResponse: exact on linear models, and separating a starved toy
from its control (Pezeshki et al. 2021) over three seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from tests.cases import MODELS, batch
from tests.contract import watched_run
from trainprobe.probes import StepContext, at_steps, every
from trainprobe.probes.ntk_response import NTKResponse
from trainprobe.probes.starvation import FeatureAttribution
from trainprobe.store import Run

STEPS = 300


def _logistic(model: nn.Module, data) -> torch.Tensor:
    """``mean log(1 + exp(−y f(x)))`` for ``±1`` labels (Pezeshki et al.'s loss)."""
    x, y = data
    return F.softplus(-y * model(x)[:, 0]).mean()


def _toy(seed: int, *, starved: bool, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Two features, both separating the ``±1`` labels: ``easy = y·U(1, 4)`` (margin 1,
    large) and ``hard = y·U(0.2, 0.25)`` (margin 0.2). The control shuffles the easy column
    across examples: same values, no label information, so only the hard one predicts."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.ones(n // 2), -torch.ones(n // 2)])
    easy = y * (1 + 3 * torch.rand(n, generator=gen))
    hard = y * (0.2 + 0.05 * torch.rand(n, generator=gen))
    if not starved:
        easy = easy[torch.randperm(n, generator=gen)]
    return torch.stack([easy, hard], dim=1), y


def _run_toy(tmp_path, seed: int, starved: bool) -> dict[str, float]:
    """Full-batch SGD on a 2-64-1 ReLU net, probed at init and at the last step."""
    data = _toy(seed, starved=starved)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    last = at_steps(STEPS - 1)
    probes = [
        FeatureAttribution(features={"easy": [0], "hard": [1]}, data=data, schedule=last),
        NTKResponse(data=data, schedule=at_steps(0, STEPS - 1)),
    ]
    run_dir = tmp_path / f"{'starved' if starved else 'control'}_{seed}"
    with trainprobe.watch(
        model, probes, run_dir=run_dir, loss_fn=_logistic, on_probe_error="raise", flush_seconds=60
    ) as mon:
        for step in range(STEPS):
            with mon.step(step, batch=data) as s:
                loss = _logistic(model, data)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    run = Run(run_dir)
    recorded = run.keys()
    return {k: float(run.series(k).values.ravel()[-1]) for k in recorded}


def test_starved_toy_separates_from_its_control(tmp_path):
    """Measured (seeds 0, 1, 2; 300 full-batch SGD steps, lr 0.05; probes read after 299):

    =========================  =====================  =====================
    signal                     starved                control
    =========================  =====================  =====================
    attribution/share/hard     0.010, 0.004, 0.014    0.740, 0.579, 0.772
    attribution/ablation/hard  0.0003, 0.0002, 0.0007 0.457, 0.417, 0.512
    ntk_response/min_ratio     0.061, 0.066, 0.067    0.807, 0.466, 0.733
    scalars/loss               0.0067, 0.0063, 0.0070 0.229, 0.269, 0.180
    =========================  =====================  =====================

    In the starved runs the third label-carrying NTK direction (label energy about 0.09)
    answers with ``r ≈ 0.46`` against ``r ≈ 7`` for the first two. The loss alone ranks
    the starved runs *better* (saturated, tiny per-example gradients, as in any healthy
    run that has fit its data); shares and response ratios put them an order of
    magnitude apart. The margins checked: the control's worst seed against the starved
    runs' worst, by a factor (10x for the share, 4x for the ratio).
    """
    starved = [_run_toy(tmp_path, seed, True) for seed in range(3)]
    control = [_run_toy(tmp_path, seed, False) for seed in range(3)]

    def values(runs: list[dict[str, float]], key: str) -> np.ndarray:
        return np.array([r[key] for r in runs])

    share_s, share_c = (
        values(starved, "attribution/share/hard"),
        values(control, "attribution/share/hard"),
    )
    assert share_s.max() < 0.05 and share_c.min() > 0.4 and share_c.min() > 10 * share_s.max()
    ablation_s = values(starved, "attribution/ablation/hard")
    ablation_c = values(control, "attribution/ablation/hard")
    assert np.abs(ablation_s).max() < 0.01 and ablation_c.min() > 0.1
    ratio_s, ratio_c = (
        values(starved, "ntk_response/min_ratio"),
        values(control, "ntk_response/min_ratio"),
    )
    assert ratio_s.max() < 0.1 and ratio_c.min() > 0.3 and ratio_c.min() > 4 * ratio_s.max()
    assert values(starved, "scalars/loss").max() < values(control, "scalars/loss").min()
    for run in starved + control:
        assert run["attribution/share/easy"] + run["attribution/share/hard"] == pytest.approx(1)


def test_attribution_of_a_linear_model_by_hand():
    """``s = wᵀx + b``: ``∂s/∂x = w``, so ``a_g = mean_i Σ_{j∈g} |w_j x_ij|``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    y = torch.where(torch.rand(12, generator=gen) > 0.5, 1.0, -1.0).double()
    groups = {"a": slice(0, 1), "b": [1, 3], "c": torch.tensor([False, False, True, False])}
    got = FeatureAttribution(features=groups, data=(x, y), loss_fn=_logistic).measure(_ctx(model))
    w = model.weight.detach()[0]
    contrib = (w * x).abs().mean(0)  # [4]
    expected = torch.stack([contrib[0], contrib[1] + contrib[3], contrib[2]])
    expected = expected / expected.sum()
    for name, value in zip("abc", expected, strict=True):
        assert float(got[f"attribution/share/{name}"]) == pytest.approx(float(value), rel=1e-12)
    ablated = x.clone()
    ablated[:, [1, 3]] = x[:, [1, 3]].mean(0)
    with torch.no_grad():
        rise = _logistic(model, (ablated, y)) - _logistic(model, (x, y))
    assert float(got["attribution/ablation/b"]) == pytest.approx(float(rise), rel=1e-12)
    assert not any(p.grad is not None for p in model.parameters())


def test_attribution_score_is_the_centered_true_class_logit():
    """Three classes: ``∂(z_y − mean_c z_c)/∂x = W_y − mean_c W_c``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    got = FeatureAttribution(data=(x, y)).measure(_ctx(model, loss_fn=_ce))
    w = model.weight.detach()
    grads = w[y] - w.mean(0)  # [n, 3]
    contrib = (grads * x).abs().mean(0)
    for j in range(3):  # default groups: one per feature, f0, f1, f2
        share = float(contrib[j] / contrib.sum())
        assert float(got[f"attribution/share/f{j}"]) == pytest.approx(share, rel=1e-12)


def _ce(model: nn.Module, data) -> torch.Tensor:
    return F.cross_entropy(model(data[0]), data[1])


def _ctx(model: nn.Module, data=None, loss_fn=None) -> StepContext:
    return StepContext(
        step=0, model=model, params=dict(model.named_parameters()), batch=data, loss_fn=loss_fn
    )


def test_default_groups_are_contiguous_chunks():
    torch.manual_seed(0)
    model = MODELS["cnn"]()
    got = FeatureAttribution().measure(_ctx(model, batch("cnn", 0), _ce))
    names = [k.split("/")[2] for k in got if k.startswith("attribution/share/")]
    assert names == ["f0_7", "f8_15", "f16_23", "f24_31", "f32_39", "f40_47", "f48_55", "f56_63"]
    assert sum(float(got[f"attribution/share/{n}"]) for n in names) == pytest.approx(1)
    assert model.training  # the modes are restored


def test_ntk_response_of_a_linear_model_by_hand():
    """``f = wᵀx + b`` has ``K = XXᵀ + 11ᵀ``: directions and ratios from its eigenpairs."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    y = torch.where(x[:, 0] + 0.3 * x[:, 1] > 0, 1.0, -1.0).double()
    probe = NTKResponse(data=(x, y), directions=2, min_label_energy=0.05)
    got = probe.measure(_ctx(model))
    values, vectors = torch.linalg.eigh(x @ x.T + 1)
    vectors = vectors.flip(1)[:, : values.gt(1e-9).sum()]  # decreasing, non-null
    proj = vectors.T @ y
    chosen = (proj**2 / (y @ y) >= 0.05).nonzero()[:2, 0]
    with torch.no_grad():
        ratios = (vectors[:, chosen].T @ model(x)[:, 0]) / proj[chosen]
    assert set(got) == {"ntk_response/dir_0", "ntk_response/dir_1", "ntk_response/min_ratio"}
    for k in range(2):
        assert float(got[f"ntk_response/dir_{k}"]) == pytest.approx(float(ratios[k]), rel=1e-9)
    expected = ratios.min() / ratios.max() if ratios.max() > 0 else float("nan")
    assert float(got["ntk_response/min_ratio"]) == pytest.approx(
        float(expected), rel=1e-9, nan_ok=True
    )


def test_ntk_response_one_vs_rest_and_reset():
    """Two logits with labels {0, 1} read like one output ``z_1 − z_0`` with ``±1`` labels."""
    torch.manual_seed(0)
    two = nn.Linear(3, 2).double()
    one = nn.Linear(3, 1).double()
    with torch.no_grad():
        two.weight[1, 0] += 2.0  # z_1 − z_0 follows x_0, the label: positive responses
        one.weight.copy_(two.weight[1:] - two.weight[:1])
        one.bias.copy_(two.bias[1:] - two.bias[:1])
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = (x[:, 0] > 0).long()
    a = NTKResponse(data=(x, labels)).measure(_ctx(two))
    b = NTKResponse(data=(x, labels.double() * 2 - 1)).measure(_ctx(one))
    assert a.keys() == b.keys()
    assert 0 < float(a["ntk_response/min_ratio"]) < 1
    for key in a:  # the two-logit kernel is twice as large: same eigenvectors, same ratios
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-9)
    probe = NTKResponse(min_label_energy=0.01)
    probe.measure(_ctx(two, (x, labels)))
    frozen = probe._subset.get(None)
    probe.reset()
    with pytest.raises(ValueError, match="needs data"):
        probe.measure(_ctx(two))
    assert torch.equal(frozen[0], x)


def test_bad_data_is_refused():
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    x, y = batch("mlp", 0)
    with pytest.raises(ValueError, match="selects no feature or one outside"):
        FeatureAttribution(features={"far": [8]}).measure(_ctx(model, (x, y), _ce))
    with pytest.raises(ValueError, match="floating-point inputs"):
        FeatureAttribution().measure(_ctx(model, (y, y), _ce))
    with pytest.raises(ValueError, match="needs one integer class label"):
        FeatureAttribution().measure(_ctx(model, (x, y.double()), _ce))
    with pytest.raises(ValueError, match=r"positive_class=5 is not one of the model's 3"):
        NTKResponse(positive_class=5).measure(_ctx(model, (x, y)))
    with pytest.raises(ValueError, match="no eigendirection of the initial NTK carries"):
        NTKResponse(min_label_energy=1.0).measure(_ctx(model, (x, y)))
    with pytest.raises(ValueError, match="one label per example"):
        NTKResponse().measure(_ctx(model, (x, torch.zeros(16, 2))))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_in_training_bit_identical_rng_untouched_keys_documented(tmp_path, model):
    probes = [FeatureAttribution(schedule=every(3)), NTKResponse(schedule=every(3))]
    run, _ = watched_run(tmp_path, model, probes, steps=10)
    for probe in probes:
        for key in run.keys(f"{probe.name}/"):
            assert run.series(key).steps.tolist() == [0, 3, 6, 9], key
            if key != "ntk_response/min_ratio":  # NaN while no direction responds positively
                assert np.all(np.isfinite(run.series(key).values)), key
