"""The probes' channel to the run metadata: ``measured_with()`` -> ``meta["measured_with"]``,
written when it changes, by rank 0 alone under torch.distributed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainprobe
from tests.cases import OnceAct
from tests.monitor.ranks import rank_share, report, reports, spawn
from trainprobe.curvature import criterion_loss
from trainprobe.keys import Key
from trainprobe.probes import HessianTop, every
from trainprobe.store import Run, RunWriter

LOSS = criterion_loss(nn.CrossEntropyLoss())


class _Engines:
    """A probe that says how it measured: ``"a"`` until step 2, then ``"b"``."""

    needs = frozenset()
    schedule = every(1)

    def __init__(self, name: str = "engines", how=None) -> None:
        self.name = name
        self.keys = (Key(f"{name}/x", "a value"),)
        self.how = how
        self.calls = 0

    def measure(self, ctx):
        self.kind = "a" if ctx.step < 2 else "b"
        return {f"{self.name}/x": 1.0}

    def measured_with(self):
        self.calls += 1
        return {"kind": self.kind} if self.how is None else self.how


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


def _loop(mon, steps, seen=None, run_dir=None) -> None:
    for step in steps:
        with mon.step(step):
            pass
        if seen is not None:
            mon.flush()
            seen.append(Run(run_dir).meta.get("measured_with"))


def test_the_entry_follows_each_change_and_holds_every_probe(tmp_path, monkeypatch):
    writes = []
    set_meta = RunWriter.set_meta

    def counting(self, items):
        writes.extend(k for k in items if k == "measured_with")
        set_meta(self, items)

    monkeypatch.setattr(RunWriter, "set_meta", counting)
    probes = [_Engines(), _Engines("other")]
    seen: list = []
    with trainprobe.watch(_model(), probes, run_dir=tmp_path) as mon:
        _loop(mon, range(4), seen, tmp_path)
    assert [s["engines"]["kind"] for s in seen] == ["a", "a", "b", "b"]
    assert seen[-1] == {"engines": {"kind": "b"}, "other": {"kind": "b"}}
    assert probes[0].calls == 4  # asked after every measurement
    assert len(writes) == 4  # written on change only: each probe at steps 0 and 2


def test_a_resumed_run_takes_its_own_probes_entries(tmp_path):
    with trainprobe.watch(_model(), [_Engines()], run_dir=tmp_path) as mon:
        _loop(mon, range(3))
    assert Run(tmp_path).meta["measured_with"] == {"engines": {"kind": "b"}}
    with trainprobe.watch(_model(), [_Engines("later")], run_dir=tmp_path, resume=True) as mon:
        _loop(mon, [3])
    assert Run(tmp_path).meta["measured_with"] == {"later": {"kind": "b"}}


def test_an_empty_answer_writes_nothing(tmp_path):
    with trainprobe.watch(_model(), [_Engines(how={})], run_dir=tmp_path) as mon:
        _loop(mon, range(2))
    assert "measured_with" not in Run(tmp_path).meta


def test_measured_with_must_be_a_method():
    probe = _Engines()
    probe.measured_with = {"kind": "a"}
    with pytest.raises(TypeError, match=r"measured_with must be a method"):
        trainprobe.watch(_model(), [probe], run_dir="unused")


def test_a_bad_answer_is_a_probe_error(tmp_path):
    bad = _Engines(how=["graph"])
    with pytest.warns(RuntimeWarning, match=r"must return a dict with string keys"):
        with trainprobe.watch(_model(), [bad], run_dir=tmp_path / "warn") as mon:
            _loop(mon, range(2))
    run = Run(tmp_path / "warn")
    assert "measured_with() must return a dict" in run.meta["disabled_probes"]["engines"]
    with pytest.raises(TypeError, match=r"measured_with\(\) must return a dict with string keys"):
        with trainprobe.watch(
            _model(), [bad], run_dir=tmp_path / "raise", on_probe_error="raise"
        ) as mon:
            _loop(mon, range(1))


# -- under torch.distributed ---------------------------------------------------------------


def _once_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), OnceAct(), nn.Linear(8, 3)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.arange(16) % 3


def _ranks_worker(rank: int, world: int, tmp_path) -> None:
    import warnings

    model = nn.parallel.DistributedDataParallel(_once_model())
    probe = HessianTop(schedule=every(1), max_iter=3)  # on the step's batch: every rank
    x, y = rank_share(rank, world, _batch())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning, on every rank
        with trainprobe.watch(model, [probe], run_dir=tmp_path / "run", loss_fn=LOSS) as mon:
            with mon.step(0, batch=(x, y)):
                LOSS(model, (x, y)).backward()
    report(tmp_path, rank, probe.measured_with())


def test_rank_zero_writes_what_every_rank_measured_with(tmp_path):
    spawn(_ranks_worker, 2, tmp_path)
    measured = reports(tmp_path, 2)
    assert measured[0] == measured[1] and measured[0]["engine"] == "fd"
    how = Run(tmp_path / "run").meta["measured_with"]["hessian"]
    assert how == measured[0] and "OnceTanh" in how["fallback"]


def _fsdp_worker(rank: int, world: int, tmp_path) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    probe = HessianTop(schedule=every(1), max_iter=3)
    x, y = rank_share(rank, world, _batch())
    with trainprobe.watch(model, [probe], run_dir=tmp_path / "run", loss_fn=LOSS) as mon:
        with mon.step(0, batch=(x, y)):
            LOSS(model, (x, y)).backward()
    report(tmp_path, rank, probe.measured_with())


def test_fsdp2_records_finite_differences_through_the_shards(tmp_path):
    spawn(_fsdp_worker, 2, tmp_path)
    measured = reports(tmp_path, 2)
    how = Run(tmp_path / "run").meta["measured_with"]["hessian"]
    assert how == measured[0] == measured[1]
    assert how["engine"] == "fd" and how["attention"] == "math" and "FSDP2" in how["fallback"]
