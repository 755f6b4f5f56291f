"""Monitor behaviour: validation at the boundary, buffering, resume, probe failures."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import trainprobe
from tests.cases import hook_count
from trainprobe.cli.report import format_findings, probe_notes
from trainprobe.keys import Key
from trainprobe.probes import ActivationStats, LayerNorms, LearningRate, UpdateNorms, every
from trainprobe.probes.base import OnHost, PerLayer, StepContext
from trainprobe.store import Run


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def _steps(mon, steps, model, **kw) -> None:
    for step in steps:
        with mon.step(step, **kw) as s:
            loss = model(torch.ones(2, 3)).pow(2).mean()
            loss.backward()
            s.log(loss=loss)
        model.zero_grad()


class _Broken:
    name = "broken"
    needs = frozenset()
    keys = (Key("broken/x", "never written: measure raises"),)
    schedule = every(1)

    def attach(self, model):
        return []

    def measure(self, ctx):
        raise ZeroDivisionError("probe bug")

    def settings(self):
        return {}


class _Trespasser(_Broken):
    name = "trespasser"
    keys = (Key("trespasser/x", "declared, but measure writes another probe's key"),)

    def measure(self, ctx):
        return {"norms/fake": 1.0}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, r"expected a torch.nn.Module, got str"),
        ({"model": nn.ReLU()}, ValueError, r"ReLU has no trainable parameters"),
        (
            {"probes": [LayerNorms]},
            TypeError,
            r"probes\[0\] is the class LayerNorms; pass an "
            r"instance: LayerNorms\(\)",
        ),
        ({"probes": [object()]}, TypeError, r"probes\[0\] \(object\) is not a probe: it lacks"),
        ({"probes": "norms"}, TypeError, r"expected a list of probe instances"),
        ({"probes": [LayerNorms(), LayerNorms()]}, ValueError, r"two probes are named \['norms'\]"),
        ({"optimizer": "sgd"}, TypeError, r"watch\(optimizer=...\): expected a torch.optim"),
        ({"flush_seconds": -1}, ValueError, r"flush_seconds=...\) must be >= 0"),
        ({"on_probe_error": "ignore"}, ValueError, r"must be 'warn' or 'raise'"),
    ],
)
def test_watch_validates_its_arguments(tmp_path, kwargs, error, match):
    kwargs = {"model": _model(), "run_dir": tmp_path / "r"} | kwargs
    with pytest.raises(error, match=match):
        trainprobe.watch(kwargs.pop("model"), **kwargs)


def test_unfrozen_subset_is_watched(tmp_path):
    model = _model()
    model[0].requires_grad_(False)
    with trainprobe.watch(model, [LayerNorms(schedule=every(1))], run_dir=tmp_path / "r") as mon:
        _steps(mon, [0], model)
    run = Run(tmp_path / "r")
    assert run.meta["model"]["params"] == ["2.weight", "2.bias"]
    assert run.meta["model"]["num_trainable"] == 5
    assert run.meta["model"]["num_params"] == 21


def test_unknown_need_is_refused(tmp_path):
    probe = _Broken()
    probe.needs = frozenset({"hessian"})
    with pytest.raises(ValueError, match=r"needs \['hessian'\], which the monitor does not"):
        trainprobe.watch(_model(), [probe], run_dir=tmp_path / "r")


def test_steps_must_increase(tmp_path):
    model = _model()
    with trainprobe.watch(model, run_dir=tmp_path / "r") as mon:
        _steps(mon, [0, 5], model)
        with pytest.raises(ValueError, match=r"step 5 does not come after step 5: steps must"):
            mon.step(5)
        with pytest.raises(ValueError, match=r"step 3 does not come after step 5"):
            mon.step(3)
        with pytest.raises(TypeError, match=r"expected a non-negative int, got 1.5"):
            mon.step(1.5)
        with pytest.raises(ValueError, match=r"expected a non-negative int, got -1"):
            mon.step(-1)
    assert Run(tmp_path / "r").series("scalars/loss").steps.tolist() == [0, 5]


def test_step_outside_the_monitor_and_nested_steps(tmp_path):
    model = _model()
    mon = trainprobe.watch(model, run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"outside `with trainprobe.watch"):
        mon.step(0)
    with mon, mon.step(0), pytest.raises(ValueError, match=r"blocks cannot nest"):
        mon.step(1).__enter__()


def test_log_validates_values(tmp_path):
    model = _model()
    with trainprobe.watch(model, run_dir=tmp_path / "r") as mon, mon.step(0) as s:
        with pytest.raises(
            TypeError,
            match=r"log\(x=...\): expected a scalar, got a tensor of "
            r"shape \(2,\)",
        ):
            s.log(x=torch.ones(2))
        with pytest.raises(TypeError, match=r"expected a number or a one-element tensor, got str"):
            s.log(x="high")
        s.log(a=1, b=torch.tensor([2.0]), c=3.5)
    with pytest.raises(ValueError, match=r"mon.log\(\) records into the step that just ended"):
        with trainprobe.watch(model, run_dir=tmp_path / "r2") as mon:
            mon.log(val=1.0)
    run = Run(tmp_path / "r")
    assert [run.series(f"scalars/{k}").values[0] for k in "abc"] == [1.0, 2.0, 3.5]


def test_values_are_buffered_then_committed_at_exit(tmp_path):
    model = _model()
    with trainprobe.watch(model, run_dir=tmp_path / "r", flush_seconds=3600) as mon:
        _steps(mon, range(5), model)
        assert "scalars/loss" not in Run(tmp_path / "r")  # still on the device
        mon.flush()
        # no update probe was due at step 4 (every 10 steps): it was buffered as it ended
        assert len(Run(tmp_path / "r").series("scalars/loss")) == 5
        mon.log(val_accuracy=0.5)  # after its commit: a second record of step 4
    run = Run(tmp_path / "r")
    assert run.series("scalars/loss").steps.tolist() == [0, 1, 2, 3, 4]
    assert run.series("scalars/val_accuracy").steps.tolist() == [4]
    assert run.meta["status"] == "finished"


def test_flush_seconds_zero_commits_each_step_as_its_block_ends(tmp_path):
    model = _model()
    with trainprobe.watch(model, run_dir=tmp_path / "r", flush_seconds=0) as mon:
        _steps(mon, [0], model)
        assert Run(tmp_path / "r").series("scalars/loss").steps.tolist() == [0]
        mon.log(val_accuracy=0.5)
        with pytest.warns(RuntimeWarning, match=r"already committed for step 0") as caught:
            mon.log(loss=1.0)  # logged inside the block and committed: dropped, said so
        assert caught[0].filename == __file__  # the warning points at this line
        # step 0 had update probes due: what they measure goes in when step 1 begins
        assert "updates/norm_total" not in Run(tmp_path / "r")
        _steps(mon, [1], model)
        assert Run(tmp_path / "r").series("updates/norm_total").steps.tolist() == [0]
        assert Run(tmp_path / "r").series("scalars/loss").steps.tolist() == [0, 1]
    run = Run(tmp_path / "r")
    assert run.series("scalars/loss").steps.tolist() == [0, 1]
    assert run.series("scalars/val_accuracy").steps.tolist() == [0]
    assert run.series("scalars/loss").values[0] != 1.0


def test_resume_appends_past_the_last_step(tmp_path):
    model = _model()
    with trainprobe.watch(model, run_dir=tmp_path / "r") as mon:
        _steps(mon, range(3), model)
    with pytest.raises(FileExistsError, match=r"already holds a run .* pass resume=True"):
        trainprobe.watch(model, run_dir=tmp_path / "r").__enter__()
    with trainprobe.watch(model, run_dir=tmp_path / "r", resume=True) as mon:
        with pytest.raises(ValueError, match=r"step 2 does not come after step 2"):
            mon.step(2)
        _steps(mon, [3, 4], model)
    assert Run(tmp_path / "r").series("scalars/loss").steps.tolist() == [0, 1, 2, 3, 4]


def test_a_failing_probe_is_disabled_with_a_warning(tmp_path):
    model = _model()
    with pytest.warns(RuntimeWarning, match=r"probe 'broken' disabled .* ZeroDivisionError"):
        with trainprobe.watch(
            model, [_Broken(), LayerNorms(schedule=every(1))], run_dir=tmp_path / "r"
        ) as mon:
            _steps(mon, range(3), model)
    run = Run(tmp_path / "r")
    assert len(run.series("norms/grad_total")) == 3
    assert "ZeroDivisionError" in run.meta["disabled_probes"]["broken"]
    with pytest.raises(ZeroDivisionError, match="probe bug"):
        with trainprobe.watch(
            model, [_Broken()], run_dir=tmp_path / "r2", on_probe_error="raise"
        ) as mon:
            _steps(mon, [0], model)


def test_a_probe_may_only_write_its_own_keys(tmp_path):
    model = _model()
    with pytest.raises(
        ValueError,
        match=r"probe 'trespasser' wrote key 'norms/fake'; its keys "
        r"must start with 'trespasser/'",
    ):
        with trainprobe.watch(model, [_Trespasser()], run_dir=tmp_path / "r") as mon:
            _steps(mon, [0], model)


class _Undeclared(_Broken):
    """Writes ``undeclared/<kind>`` values that its ``keys`` do not declare."""

    name = "undeclared"
    keys = (Key("undeclared/ok", "declared"), Key("undeclared/layer/<param>", "declared"))

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def measure(self, ctx):
        if self.kind == "plain":
            return {"undeclared/ok": 1.0, "undeclared/other": 2.0}
        if self.kind == "layer":
            return {"undeclared/weight": PerLayer(("0.weight",), torch.ones(1))}
        if self.kind == "host":
            return {"undeclared/check": OnHost(torch.ones(1), lambda a: {"undeclared/x": 1.0})}
        return {"undeclared/Bad": 1.0}  # not lower_snake


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (
            "plain",
            r"probe 'undeclared' wrote key 'undeclared/other', which matches none of "
            r"the keys it declares: \['undeclared/ok', 'undeclared/layer/<param>'\]",
        ),
        ("layer", r"probe 'undeclared' wrote key 'undeclared/weight/0.weight', which matches"),
        ("host", r"probe 'undeclared' wrote key 'undeclared/x', which matches none"),
        ("case", r"probe 'undeclared': record key 'undeclared/Bad' is not 'probe/metric"),
    ],
)
def test_a_probe_may_only_write_the_keys_it_declares(tmp_path, kind, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        with trainprobe.watch(
            model,
            [_Undeclared(kind)],
            run_dir=tmp_path / "r",
            on_probe_error="raise",
            flush_seconds=0,
        ) as mon:
            _steps(mon, [0], model)


def test_a_declared_per_layer_key_is_accepted(tmp_path):
    class Layered(_Undeclared):
        def measure(self, ctx):
            return {"undeclared/layer": PerLayer(("0.weight", "Odd Name-1"), torch.ones(2))}

    model = _model()
    with trainprobe.watch(model, [Layered("layer")], run_dir=tmp_path / "r") as mon:
        _steps(mon, range(2), model)
    run = Run(tmp_path / "r")
    assert run.keys("undeclared/") == ["undeclared/layer/0.weight", "undeclared/layer/Odd Name-1"]


class _Keyless(_Broken):
    name = "keyless"


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"keys": None},
            TypeError,
            r"probe 'keyless' \(_Keyless\): keys must be a non-empty "
            r"tuple of trainprobe.keys.Key",
        ),
        (
            {"keys": (Key("keyless/a", "a"), Key("other/b", "b"))},
            ValueError,
            r"declares keys under \['keyless', 'other'\]; spell every pattern with one",
        ),
        ({"name": "Keyless"}, ValueError, r"name: 'Keyless' is not a lower_snake name"),
    ],
)
def test_watch_checks_the_declared_keys_and_the_name(tmp_path, change, error, match):
    probe = _Keyless()
    for attr, value in change.items():
        setattr(probe, attr, value)
    with pytest.raises(error, match=match):
        trainprobe.watch(_model(), [probe], run_dir=tmp_path / "r")


def test_a_probe_without_keys_is_not_a_probe(tmp_path):
    class Old:
        name, needs, schedule = "old", frozenset(), every(1)

        def attach(self, model):
            return []

        def measure(self, ctx):
            return {}

        def settings(self):
            return {}

    with pytest.raises(TypeError, match=r"probes\[0\] \(Old\) is not a probe: it lacks \['keys'\]"):
        trainprobe.watch(_model(), [Old()], run_dir=tmp_path / "r")


def test_a_probe_needing_the_optimizer_is_skipped_without_one(tmp_path):
    model = _model()
    with pytest.warns(RuntimeWarning, match=r"'optim' disabled .* pass optimizer="):
        with trainprobe.watch(model, [LearningRate()], run_dir=tmp_path / "r") as mon:
            _steps(mon, range(2), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with trainprobe.watch(model, [LearningRate()], run_dir=tmp_path / "r2") as mon:
        _steps(mon, range(2), model, optimizer=opt)  # per-step optimizer works too
    run = Run(tmp_path / "r2")
    assert run.series("optim/lr/0").values.tolist() == [0.5, 0.5]
    assert run.meta["optimizer"]["class"] == "SGD"


def test_metadata_describes_the_run(tmp_path):
    model = _model()
    with trainprobe.watch(model, run_dir=tmp_path / "r", meta={"seed": 3}) as mon:
        _steps(mon, [0], model)
    meta = Run(tmp_path / "r").meta
    assert meta["user"] == {"seed": 3}
    assert meta["versions"]["torch"] == torch.__version__
    assert {p["name"]: p["schedule"] for p in meta["probes"]} == {
        "norms": "every(10)",
        "updates": "every(10)",
        "activations": "every(10)",
        "nonfinite": "every(1)",
        "optim": "every(1)",
    }
    assert meta["model"]["shapes"]["0.weight"] == [4, 3]


def test_logged_tensors_are_snapshots(tmp_path):
    model = _model()
    running = torch.zeros(())
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with trainprobe.watch(
        model, [LearningRate()], run_dir=tmp_path / "r", optimizer=opt, flush_seconds=3600
    ) as mon:
        for step in range(3):
            running += 1  # changed in place after it was logged
            with mon.step(step) as s:
                s.log(count=running)
            opt.step()
            sched.step()  # updates the tensor learning rate in place
    run = Run(tmp_path / "r")
    assert run.series("scalars/count").values.tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(run.series("optim/lr/0").values, [0.1, 0.05, 0.025], rtol=1e-6)


class _BadOnHost(_Broken):
    name = "badhost"
    keys = (Key("badhost/x", "its finish raises"),)

    def measure(self, ctx):
        return {"badhost/x": OnHost(torch.ones(2), lambda a: 1 / 0)}


def test_a_value_failing_on_the_host_loses_nothing_else(tmp_path):
    model = _model()
    with pytest.warns(RuntimeWarning, match=r"'badhost' disabled .* failed on the host"):
        with trainprobe.watch(
            model, [_BadOnHost(), LayerNorms(schedule=every(1))], run_dir=tmp_path / "r"
        ) as mon:
            _steps(mon, range(3), model)
    run = Run(tmp_path / "r")
    assert run.series("norms/grad_total").steps.tolist() == [0, 1, 2]
    assert run.series("scalars/loss").steps.tolist() == [0, 1, 2]
    assert run.meta["status"] == "finished"


class _BrokenUpdate(_Broken):
    name = "brokenupdate"
    keys = (Key("brokenupdate/x", "never written: measure raises"),)
    needs = frozenset({"update"})


def test_an_error_while_closing_keeps_the_records_and_marks_the_run_failed(tmp_path):
    model = _model()
    with pytest.raises(ZeroDivisionError):
        with trainprobe.watch(
            model,
            [_BrokenUpdate(), LayerNorms(schedule=every(1))],
            run_dir=tmp_path / "r",
            on_probe_error="raise",
        ) as mon:
            with mon.step(0) as s:
                loss = model(torch.ones(2, 3)).pow(2).mean()
                loss.backward()
                s.log(loss=loss)
    run = Run(tmp_path / "r")
    assert run.series("scalars/loss").steps.tolist() == [0]
    assert run.series("norms/grad_total").steps.tolist() == [0]
    assert run.meta["status"].startswith("failed: ZeroDivisionError while closing the monitor")


def test_the_parameter_copy_is_released_after_use(tmp_path):
    model = _model()
    with trainprobe.watch(model, [UpdateNorms(schedule=every(1))], run_dir=tmp_path / "r") as mon:
        with mon.step(0) as s:
            pass
        assert s.holds_params  # held until the next step measures the update
        with mon.step(1):
            assert not s.holds_params


def test_activation_stats_refuse_a_compiled_model(tmp_path):
    model = torch.compile(_model(), backend="eager")
    with pytest.warns(RuntimeWarning, match=r"cannot hook a torch.compile'd module"):
        with (
            trainprobe.watch(
                model, [ActivationStats(schedule=every(1))], run_dir=tmp_path / "r"
            ) as mon,
            mon.step(0),
        ):
            pass
    assert hook_count(model) == 0


def test_activation_hooks_are_removed_when_attach_fails_midway(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), torch.jit.script(nn.ReLU()))
    probe = ActivationStats(schedule=every(1))
    with pytest.raises(RuntimeError):
        probe.attach(model)  # the scripted module refuses forward hooks
    assert hook_count(model) == 0


def test_more_argument_errors(tmp_path):
    model = _model()
    with trainprobe.watch(model, run_dir=tmp_path / "r") as mon:
        with pytest.raises(TypeError, match=r"mon.step\(optimizer=...\): expected a torch.optim"):
            mon.step(0, optimizer="adam")
    with pytest.raises(ValueError, match=r"UpdateNorms needs ctx.update"):
        UpdateNorms().measure(StepContext(step=0, model=model, params={}))


def test_a_warning_when_gradient_probes_see_no_gradient(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"no parameter had a gradient when step 0 ended"):
        with trainprobe.watch(
            model, [LayerNorms(schedule=every(1))], run_dir=tmp_path / "r", optimizer=opt
        ) as mon:
            for step in range(2):
                with mon.step(step):
                    model(torch.ones(2, 3)).sum().backward()
                    opt.step()
                    opt.zero_grad()  # inside the block: the probe sees no gradient
    assert "norms/grad_total" not in Run(tmp_path / "r")


def test_an_evaluation_step_runs_only_what_needs_no_training(tmp_path):
    """Training steps, then an evaluation-only last step (no backward, no optimizer step):
    no warning, nothing gradient- or update-based recorded for it, activations still."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = [
        LayerNorms(schedule=every(1)),
        UpdateNorms(schedule=every(1)),
        ActivationStats(schedule=every(1)),
        LearningRate(),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with trainprobe.watch(model, probes, run_dir=tmp_path / "r", optimizer=opt) as mon:
            for step in range(2):
                with mon.step(step):
                    model(torch.ones(2, 3)).sum().backward()
                opt.step()
                opt.zero_grad()
            with mon.step(2, evaluation=True) as s, torch.no_grad():
                s.log(val_loss=model(torch.ones(2, 3)).sum())
    run = Run(tmp_path / "r")
    assert run.series("norms/grad_total").steps.tolist() == [0, 1]
    assert run.series("norms/weight_total").steps.tolist() == [0, 1]  # LayerNorms needs grads
    assert run.series("updates/ratio_total").steps.tolist() == [0, 1]
    assert run.series("optim/lr/0").steps.tolist() == [0, 1]
    assert 2 in run.series("scalars/val_loss").steps.tolist()
    assert 2 in run.series(run.keys("activations")[0]).steps.tolist()
    with pytest.raises(TypeError, match=r"evaluation=...\) takes True or False"):
        with trainprobe.watch(model, run_dir=tmp_path / "r2") as mon:
            mon.step(0, evaluation="yes")


def test_default_probes_without_an_optimizer_stay_quiet_and_say_so_in_the_report(tmp_path):
    """A hand-written update (no optimizer) that steps on p.grad: the defaults' learning
    rate has nothing to read; no warning, one line in the run's metadata and report."""
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with trainprobe.watch(model, run_dir=tmp_path / "r") as mon:
            for step in range(12):
                with mon.step(step):
                    model(torch.ones(2, 3)).sum().backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
                        p.grad = None
    run = Run(tmp_path / "r")
    assert "optim" in run.meta["idle_probes"] and not run.meta["disabled_probes"]
    assert "norms/grad_total" in run and "updates/ratio_total" in run
    notes = probe_notes(run)
    assert notes == [
        f"probe 'optim' recorded nothing at some steps: {run.meta['idle_probes']['optim']}"
    ]
    assert notes[0] in " ".join(format_findings(run, []).split())  # wrapped at 100
    with pytest.warns(RuntimeWarning, match=r"probe 'optim' disabled.*needs an optimizer"):
        with trainprobe.watch(model, [LearningRate()], run_dir=tmp_path / "chosen") as mon:
            with mon.step(0):
                pass  # a probe the user asked for by name: told at once


def test_two_named_instances_of_one_probe_record_side_by_side(tmp_path):
    model = _model()
    probes = [LayerNorms(schedule=every(1)), LayerNorms(schedule=every(2), name="norms_slow")]
    with trainprobe.watch(model, probes, run_dir=tmp_path / "r") as mon:
        _steps(mon, range(4), model)
    run = Run(tmp_path / "r")
    assert run.series("norms/grad_total").steps.tolist() == [0, 1, 2, 3]
    assert run.series("norms_slow/grad_total").steps.tolist() == [0, 2]
    slow = [k.replace("norms/", "norms_slow/", 1) for k in run.keys("norms/")]
    assert run.keys("norms_slow/") == slow
    np.testing.assert_array_equal(
        run.series("norms_slow/weight_total").values, run.series("norms/weight_total").values[::2]
    )
