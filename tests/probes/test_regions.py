"""The LocalComplexity probe: its values are the core counts on its point sets, and it
leaves training untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.cases import MODELS, hook_count
from tests.contract import watched_run
from trainprobe.probes import PerLayer, StepContext, every
from trainprobe.probes.base import probe_settings
from trainprobe.probes.regions import LocalComplexity
from trainprobe.regions import local_complexity, random_frame, segment_pieces

F64 = torch.float64


def _flat(values) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, PerLayer):
            out.update(
                {f"{key}/{n}": float(v) for n, v in zip(value.names, value.values, strict=True)}
            )
        else:
            out[key] = float(value)
    return out


def _measure(probe: LocalComplexity, model: nn.Module, batch=None, step: int = 0):
    ctx = StepContext(step=step, model=model, params=dict(model.named_parameters()), batch=batch)
    return _flat(probe.measure(ctx))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 12),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(12, 12),
        nn.LeakyReLU(0.1),
        nn.Linear(12, 2),
    ).double()


def _points(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_values_are_the_core_counts_on_each_set():
    model, train_x, test_x = _model(), _points(30, 1), _points(20, 2)
    probe = LocalComplexity(
        train=(train_x, None), test=test_x, radius=0.4, dim=2, seed=7, segments=True
    )
    got = _measure(probe, model)
    frame = random_frame(2, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    for name, x in (("train", train_x), ("test", test_x)):
        counts = local_complexity(model, x, radius=0.4, frame=frame)
        assert counts.layers == ("1", "4")
        assert got[f"regions/{name}/total"] == pytest.approx(float(counts.total.double().mean()))
        for i, layer in enumerate(counts.layers):
            expected = float(counts.counts[:, i].double().mean())
            assert got[f"regions/{name}/layer/{layer}"] == pytest.approx(expected)
        pieces = segment_pieces(model, x[:-1], x[1:]).pieces.double().mean()
        assert got[f"regions/{name}/segment_pieces"] == pytest.approx(float(pieces))
    assert got["regions/train/total"] > 0 and got["regions/train/segment_pieces"] > 1
    assert not [k for k in got if k.startswith("regions/random")]


def test_given_directions_record_exactly_what_the_function_returns():
    """Explicit directions (neither unit nor orthogonal, used as given) at every measurement,
    on every set, described (not stored) in the run metadata."""
    model, train_x, test_x = _model(), _points(40, 5), _points(25, 6)
    directions = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, -0.5, 2.0]], dtype=F64)
    probe = LocalComplexity(
        train=train_x, test=test_x, random=30, directions=directions, radius=0.3, seed=4
    )
    directions.zero_()  # the probe keeps its own copy
    given = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, -0.5, 2.0]], dtype=F64)
    for step in (0, 1):
        got = _measure(probe, model, step=step)
        sets = {"train": train_x, "test": test_x, "random": probe._random}
        for name, x in sets.items():
            counts = local_complexity(model, x, radius=0.3, frame=given)
            assert got[f"regions/{name}/total"] == float(counts.total.float().mean())
            for i, layer in enumerate(counts.layers):
                expected = float(counts.counts[:, i].float().mean())
                assert got[f"regions/{name}/layer/{layer}"] == expected
        assert got["regions/train/total"] > 0
        with torch.no_grad():  # a changed model: the same directions measure it
            model[0].weight.mul_(-1.5)
    frame = local_complexity(model, train_x, radius=0.3, frame=torch.eye(3, dtype=F64))
    again = _measure(probe, model)["regions/train/total"]
    assert again != float(frame.total.float().mean())  # not a frame of its own
    assert probe_settings(probe)["directions"] == "tensor (3, 3) float64"


def test_random_points_match_the_train_moments_and_stay_fixed():
    model = _model()
    train_x = _points(400, 3) * torch.tensor([1.0, 3.0, 0.5], dtype=F64) + 2.0
    probe = LocalComplexity(train=train_x, random=2000, radius=0.4, max_points=2000)
    first = _measure(probe, model, step=0)
    drawn = probe._random
    assert drawn.shape == (2000, 3)
    torch.testing.assert_close(drawn.mean(0), train_x.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(drawn.std(0), train_x.std(0), atol=0.0, rtol=0.06)
    second = _measure(probe, model, step=5)
    assert probe._random is drawn and first == second
    given = LocalComplexity(train=train_x, random=drawn, radius=0.4, max_points=2000)
    assert _measure(given, model)["regions/random/total"] == first["regions/random/total"]


def test_the_step_batch_is_the_default_train_set_and_max_points_caps_it():
    model, x = _model(), _points(50, 4)
    capped = _measure(LocalComplexity(max_points=10, dim=3), model, batch=(x, None))
    fixed = _measure(LocalComplexity(train=x[:10], dim=3), model)
    assert capped == fixed and set(capped) >= {"regions/train/total", "regions/train/layer/1"}


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("mlp", {"segments": True, "random": 8}),
        ("cnn", {"random": 8, "dim": 5, "radius": 0.5}),
    ],
)
def test_training_is_bit_identical_and_keys_are_documented(tmp_path, model, options):
    shape = (12, 1, 8, 8) if model == "cnn" else (12, 8)
    test_x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    probe = LocalComplexity(test=test_x, schedule=every(1), **options)
    run, _ = watched_run(tmp_path, model, [probe], steps=3)
    keys = run.keys("regions")
    layers = {"mlp": ["1"], "cnn": ["2", "3"]}[model]  # ReLU; ReLU and MaxPool2d
    for name in ("train", "test", "random"):
        assert f"regions/{name}/total" in keys
        assert {f"regions/{name}/layer/{layer}" for layer in layers} <= set(keys)
        assert (f"regions/{name}/segment_pieces" in keys) == (model == "mlp")
    for key in keys:
        values = run.series(key).values.ravel()
        assert len(values) == 3 and all(math.isfinite(v) for v in values), key
    assert run.series("regions/train/total").values.max() > 0


@pytest.mark.parametrize(
    ("probe", "model", "batch", "match"),
    [
        (LocalComplexity(), "mlp", None, "needs points: pass train= to the probe, or batch="),
        (
            LocalComplexity(),
            "mlp",
            {"x": torch.zeros(2, 8)},
            r"the step's batch= must be a floating tensor.*; pass train=",
        ),
        (
            LocalComplexity(test=torch.zeros(3, 4)),
            "mlp",
            (torch.zeros(3, 8), None),
            "point sets differ in shape",
        ),
        (
            LocalComplexity(directions=torch.eye(3)),
            "mlp",
            (torch.zeros(3, 8), None),
            r"directions= are \[k, 3\] but the points have 8 features per example \(shape "
            r"\(8,\)\); pass directions of shape \[k, 8\]",
        ),
        (
            LocalComplexity(dim=9),
            "mlp",
            (torch.zeros(3, 8), None),
            r"frame dim must be an integer in \[1, 8\]",
        ),
        (
            LocalComplexity(segments=True),
            "cnn",
            (torch.zeros(3, 1, 8, 8), None),
            r"MaxPool2d\) is a max-pool, which the exact segment walk does not support",
        ),
        (
            LocalComplexity(),
            "transformer",
            (torch.zeros(3, 8), None),
            r"\(TransformerEncoderLayer\) is not piecewise linear",
        ),
    ],
)
def test_bad_points_and_models(probe, model, batch, match):
    torch.manual_seed(0)
    module = MODELS[model]()
    with pytest.raises(ValueError, match=match):
        _measure(probe, module, batch)
    assert hook_count(module) == 0
