"""The contract every probe passes (DESIGN.md rule 10)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
import torch

import trainprobe
from tests.cases import MODELS, batch, hook_count, train
from tests.contract import (
    BAD_OPTIONS,
    PROBE_NAMES,
    PROBE_SETS,
    assert_same_training,
    documented_patterns,
    every_step,
)
from trainprobe.keys import Key
from trainprobe.probes import PROBES, default_probes, every
from trainprobe.probes.base import declared_keys, probe_settings
from trainprobe.probes.schedules import Schedule
from trainprobe.store import Run


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("probe", [*PROBE_NAMES, "all"])
def test_training_is_bit_identical_and_rng_untouched(tmp_path, model, probe):
    probes = default_probes(every_n=1) if probe == "all" else [every_step(probe, model)]
    reference = train(model)
    rng_reference = torch.get_rng_state()
    watched = train(model, probes=probes, run_dir=tmp_path / "run")
    assert torch.equal(torch.get_rng_state(), rng_reference)
    assert_same_training(reference, watched)
    assert hook_count(watched[0]) == 0


UNDEFINED_WHILE = ("ntk_response/min_ratio",)
"""NaN while no label-carrying direction responds positively (NTKResponse's doc): on a
tiny random case that can be every measurement; what is defined must be finite."""


@pytest.mark.parametrize("probe_set", sorted(PROBE_SETS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_probes_record_finite_documented_keys(tmp_path, model, probe_set):
    probes = PROBE_SETS[probe_set](model)
    train(model, steps=6, probes=probes, run_dir=tmp_path / "run")
    run = Run(tmp_path / "run")
    documented = {name: documented_patterns(cls) for name, cls in PROBES.items()}
    keys = run.keys()
    assert {k.split("/")[0] for k in keys} == {*(p.name for p in probes), "scalars"}
    zero_init = {n for n, w in _initial_weights(model).items() if not w.any()}
    for key in keys:
        series = run.series(key)
        assert len(series) >= 5, key
        values = series.values.ravel()
        if key.startswith("updates/ratio/") and key.split("/", 2)[2] in zero_init:
            values = values[1:]  # undefined (NaN) at the step where the tensor is all zeros
        if key in UNDEFINED_WHILE:
            values = values[~np.isnan(values)]
        assert all(math.isfinite(v) for v in values), key
        if key.startswith("scalars/"):
            continue
        patterns = documented[key.split("/")[0]]
        assert any(p.matches(key) for p in patterns), f"{key} is not in its probe's keys"


def _initial_weights(model: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # as cases.train does
    return dict(MODELS[model]().named_parameters())


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_hooks_removed_and_records_kept_when_the_loop_raises(tmp_path, model):
    with pytest.raises(RuntimeError, match="boom"):
        train(model, probes=default_probes(every_n=1), run_dir=tmp_path / "run", raise_at=5)
    run = Run(tmp_path / "run")
    assert run.series("scalars/loss").steps.tolist() == [0, 1, 2, 3, 4, 5]
    assert run.series("norms/grad_total").steps.tolist() == [0, 1, 2, 3, 4]
    assert run.meta["status"].startswith("failed: RuntimeError")


def test_hooks_removed_when_raising_inside_a_step(tmp_path):
    model = MODELS["cnn"]()
    with (
        pytest.raises(KeyError),
        trainprobe.watch(model, default_probes(every_n=1), run_dir=tmp_path / "r") as mon,
        mon.step(0),
    ):
        assert hook_count(model) > 0  # activation hooks are attached inside the step
        model(torch.randn(2, 1, 8, 8))
        raise KeyError("inside")
    assert hook_count(model) == 0


class _RandomProbe:
    """A deliberately bad probe: it draws from the global RNG."""

    name = "bad"
    needs = frozenset()
    keys = (Key("bad/noise", "a draw from the global RNG"),)
    schedule = every(1)

    def measure(self, ctx):  # no attach, no settings: both are optional
        return {"bad/noise": torch.rand(())}


def test_the_contract_catches_a_probe_that_perturbs(tmp_path):
    """Negative control: the comparison above is able to fail."""
    reference = train("mlp")
    watched = train("mlp", probes=[_RandomProbe()], run_dir=tmp_path / "run")
    with pytest.raises(AssertionError):
        assert_same_training(reference, watched)


def test_parameter_probes_work_on_a_compiled_model(tmp_path):
    """Norms, updates and the guard read parameters and grads: torch.compile is no obstacle."""
    pytest.importorskip("torch._dynamo")
    probes = [PROBES[name](schedule=every(1)) for name in ("norms", "updates", "nonfinite")]
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    with trainprobe.watch(compiled, probes, run_dir=tmp_path / "r") as mon:
        for step in range(3):
            with mon.step(step) as s:
                loss = torch.nn.functional.cross_entropy(compiled(x), y)
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    run = Run(tmp_path / "r")
    assert run.series("norms/grad_total").steps.tolist() == [0, 1, 2]
    assert run.series("updates/ratio_total").steps.tolist() == [0, 1, 2]
    assert run.series("nonfinite/grad").values.tolist() == [0, 0, 0]


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_every_probe_takes_a_name_and_its_keys_follow_it(name):
    renamed = {"data": batch("mlp", 999)} if name == "heldout" else {}
    probe = PROBES[name](name=f"{name}_2", **renamed)
    assert probe.name == f"{name}_2" and PROBES[name](**renamed).name == name
    assert [k.pattern.split("/", 1) for k in declared_keys(probe)] == [
        [f"{name}_2", k.pattern.split("/", 1)[1]] for k in PROBES[name].keys
    ]
    with pytest.raises(ValueError, match=rf"{PROBES[name].__name__}\(name=...\): 'Two' is not"):
        PROBES[name](name="Two", **renamed)


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_options_are_keyword_only_frozen_with_a_declared_default_schedule(name):
    cls = PROBES[name]
    parameters = inspect.signature(cls).parameters
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters.values()), "positional options"
    assert all(p.default is not p.empty for p in parameters.values()), "an option has no default"
    assert isinstance(parameters["schedule"].default, Schedule)
    assert parameters["name"].default == cls.name == cls.keys[0].probe
    probe = every_step(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        probe.schedule = every(2)
    assert not hasattr(cls, "settings"), "settings are derived from the options"


def test_every_probe_has_a_row_of_refused_options():
    assert set(BAD_OPTIONS) == set(PROBES)


_REFUSED = [
    pytest.param(name, options, error, match, id=f"{name}-{i}")
    for name in PROBE_NAMES
    for i, (options, error, match) in enumerate(
        (
            *BAD_OPTIONS[name],
            ({"schedule": 5}, TypeError, "schedule must be a trainprobe schedule"),
            ({"name": "Two"}, ValueError, "is not a lower_snake name"),
        )
    )
]


@pytest.mark.parametrize(("name", "options", "error", "match"), _REFUSED)
def test_bad_options_are_refused_when_the_probe_is_built(name, options, error, match):
    with pytest.raises(error, match=match):
        PROBES[name](**options)


@pytest.mark.parametrize("probe_set", sorted(PROBE_SETS))
def test_settings_are_the_options_and_never_run_time_state(tmp_path, probe_set):
    """The run metadata records each probe's options as built (JSON-safe), unchanged by
    measuring: warm starts, fallbacks and frozen subsets live apart from them."""
    probes = PROBE_SETS[probe_set]("mlp")
    before = [probe_settings(p) for p in probes]
    train("mlp", steps=3, probes=probes, run_dir=tmp_path / "run")
    assert [probe_settings(p) for p in probes] == before
    stored = [entry["settings"] for entry in Run(tmp_path / "run").meta["probes"]]
    assert stored == json.loads(json.dumps(before))
    for probe, settings in zip(probes, before, strict=True):
        options = {f.name for f in dataclasses.fields(probe) if f.init}
        assert set(settings) == options - {"name", "schedule"}
