"""``watch(mirror=...)``: every value committed to the store reaches the trackers, exactly,
with its step; the findings arrive at close; a tracker that raises never fails training.

The reference is always the store itself (``Run.series``): a mirror must receive what was
committed, no more, no less.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import trainprobe
from tests.monitor.ranks import report, reports, spawn
from trainprobe.analysis import analyze
from trainprobe.keys import Key
from trainprobe.monitor.mirror import FINDINGS_TAG, Mirror, finding_text
from trainprobe.probes import default_probes, every
from trainprobe.store import Run

STEPS = 30
NAN_LOSS_AT = 20  # the nonfinite detector reports it: one finding at least
INF_AT = 5


class _Spread:
    """A probe with an array value (one entry NaN): TensorBoard gets its histogram."""

    name = "spread"
    needs = frozenset()
    keys = (Key("spread/values", "three numbers, the last NaN"),)
    schedule = every(5)

    def attach(self, model):
        return []

    def measure(self, ctx):
        return {"spread/values": torch.tensor([1.0, float(ctx.step), float("nan")])}

    def settings(self):
        return {}


class Collect:
    """A :class:`Mirror` that keeps what it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.found: list | None = None

    def write(self, step, values):
        self.rows.append((step, dict(values)))

    def findings(self, findings):
        self.found = findings

    def series(self) -> dict[str, tuple[list[int], list[float]]]:
        out: dict[str, tuple[list[int], list[float]]] = {}
        for step, values in self.rows:
            for key, value in values.items():
                steps, numbers = out.setdefault(key, ([], []))
                steps.append(step)
                numbers.append(value)
        return out


class FakeWandbRun:
    """What the W&B adapter uses of a ``wandb`` run: ``log(dict, step=)`` and ``summary``."""

    def __init__(self) -> None:
        self.history: list[tuple[int, dict[str, float]]] = []
        self.summary: dict[str, str] = {}

    def log(self, data, step=None, commit=None):
        self.history.append((step, dict(data)))


class Raises:
    """A tracker that breaks on its second write (and at close)."""

    def __init__(self) -> None:
        self.calls = 0

    def write(self, step, values):
        self.calls += 1
        if self.calls >= 2:
            raise ConnectionError("tracker offline")

    def findings(self, findings):
        raise ConnectionError("tracker offline")


def _train(run_dir, mirror, *, probes=None, flush_seconds=0.0) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    chosen = [*default_probes(every_n=3), _Spread()] if probes is None else probes
    gen = torch.Generator().manual_seed(1)
    with trainprobe.watch(
        model, chosen, run_dir=run_dir, optimizer=opt, mirror=mirror, flush_seconds=flush_seconds
    ) as mon:
        for step in range(STEPS):
            x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            with mon.step(step, batch=(x, y)) as s:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                shown = torch.tensor(math.nan) if step == NAN_LOSS_AT else loss
                s.log(loss=shown, acc=math.inf if step == INF_AT else 0.5)
            opt.step()
            opt.zero_grad()
            if step % 7 == 0:  # after the block: may land in a later flush than the step
                mon.log(evaluated=float(step))


def _stored(run_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar key of the run: (steps, values)."""
    with Run(run_dir) as run:
        series = [run.series(k) for k in run.keys(prefix="")]
    return {s.key: (s.steps, s.values) for s in series if s.values.ndim == 1}


def _findings(run_dir) -> list:
    with Run(run_dir) as run:
        return analyze(run)


def _assert_same(got: dict, stored: dict, *, rtol: float = 0.0) -> None:
    assert sorted(got) == sorted(stored)
    for key, (steps, values) in stored.items():
        got_steps, got_values = got[key]
        assert list(got_steps) == steps.tolist(), key
        np.testing.assert_allclose(got_values, values, rtol=rtol, atol=0, err_msg=key)


def test_a_write_mirror_gets_exactly_the_stored_values_and_steps(tmp_path):
    mirror = Collect()
    _train(tmp_path / "run", mirror)
    stored = _stored(tmp_path / "run")
    _assert_same(mirror.series(), stored)  # exact, nan and inf included
    assert all(type(v) is float for _, row in mirror.rows for v in row.values())
    assert math.isnan(mirror.series()["scalars/loss"][1][NAN_LOSS_AT])
    assert mirror.series()["scalars/acc"][1][INF_AT] == math.inf
    assert "spread/values" not in mirror.series()  # arrays are not scalars
    assert isinstance(mirror, Mirror)


def test_findings_are_delivered_at_close(tmp_path):
    mirror = Collect()
    _train(tmp_path / "run", mirror)
    expected = _findings(tmp_path / "run")
    assert any(f.detector == "nonfinite" for f in expected)
    assert mirror.found == expected


def test_values_buffered_over_several_steps_arrive_in_step_order(tmp_path):
    mirror = Collect()
    _train(tmp_path / "run", mirror, flush_seconds=3600)  # one flush, at close
    _assert_same(mirror.series(), _stored(tmp_path / "run"))


def test_tensorboard_event_file_holds_every_committed_scalar_and_the_findings(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    _train(tmp_path / "run", writer)
    writer.close()
    events = ea.EventAccumulator(
        str(tmp_path / "tb"), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0}
    ).Reload()
    got = {
        tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
        for tag in events.Tags()["scalars"]
    }
    _assert_same(got, _stored(tmp_path / "run"), rtol=1e-6)  # TensorBoard keeps float32
    histograms = events.Histograms("spread/values")
    assert [h.step for h in histograms] == list(range(0, STEPS, 5))
    assert [h.histogram_value.num for h in histograms] == [2.0] * len(histograms)  # finite
    assert histograms[-1].histogram_value.max == 25.0
    shown = events.Tensors(f"{FINDINGS_TAG}/text_summary")  # torch's add_text adds the suffix
    texts = [t.tensor_proto.string_val[0].decode() for t in shown]
    assert [t.step for t in shown] == list(range(len(texts)))
    assert texts == [finding_text(f) for f in _findings(tmp_path / "run")]


class ScalarWriter:
    """A SummaryWriter look-alike that is not torch's (tensorboardX, a wrapper): the
    mirror calls ``add_scalar`` once per value."""

    def __init__(self) -> None:
        self.scalars: dict[str, tuple[list[int], list[float]]] = {}
        self.histograms: list[tuple[str, list[float], int]] = []
        self.texts: list[tuple[str, str, int]] = []
        self.flushed = False

    def add_scalar(self, tag, scalar_value, global_step=None):
        steps, values = self.scalars.setdefault(tag, ([], []))
        steps.append(global_step)
        values.append(scalar_value)

    def add_histogram(self, tag, values, global_step=None):
        self.histograms.append((tag, values.tolist(), global_step))

    def add_text(self, tag, text_string, global_step=None):
        self.texts.append((tag, text_string, global_step))

    def flush(self):
        self.flushed = True


def test_another_summary_writer_gets_add_scalar_per_value_and_add_text_per_finding(tmp_path):
    writer = ScalarWriter()
    _train(tmp_path / "run", writer)
    _assert_same(writer.scalars, _stored(tmp_path / "run"))  # exact: no float32 here
    assert writer.histograms == [
        ("spread/values", [1.0, float(step)], step) for step in range(0, STEPS, 5)
    ]
    texts = [finding_text(f) for f in _findings(tmp_path / "run")]
    assert writer.texts == [(FINDINGS_TAG, t, i) for i, t in enumerate(texts)]
    assert writer.flushed


def test_a_wandb_run_gets_log_per_record_and_the_findings_in_its_summary(tmp_path):
    run = FakeWandbRun()
    _train(tmp_path / "run", run)
    got: dict = {}
    for step, values in run.history:
        for key, value in values.items():
            got.setdefault(key, ([], []))
            got[key][0].append(step)
            got[key][1].append(value)
    _assert_same(got, _stored(tmp_path / "run"))
    texts = [finding_text(f) for f in _findings(tmp_path / "run")]
    assert run.summary == {f"{FINDINGS_TAG}/{i}": t for i, t in enumerate(texts)}


def test_a_lightning_logger_gets_the_metrics_and_the_findings_as_hyperparameters(tmp_path):
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    logger = loggers.CSVLogger(str(tmp_path / "csv"), name="run")
    _train(tmp_path / "run", logger)  # the monitor's close saves the buffering CSVLogger
    got: dict = {}
    with open(logger.experiment.metrics_file_path, newline="") as file:
        for row in csv.DictReader(file):
            for key, cell in row.items():
                if key != "step" and cell != "":
                    got.setdefault(key, ([], []))
                    got[key][0].append(int(row["step"]))
                    got[key][1].append(float(cell))
    _assert_same(got, _stored(tmp_path / "run"))
    hparams = (tmp_path / "csv" / "run" / "version_0" / "hparams.yaml").read_text()
    assert f"{FINDINGS_TAG}/0" in hparams and "nonfinite" in hparams


def test_a_raising_tracker_warns_once_and_training_completes(tmp_path):
    broken, healthy = Raises(), Collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path / "run", [broken, healthy])
    told = [str(w.message) for w in caught if "mirroring to" in str(w.message)]
    assert len(told) == 1
    assert "Raises" in told[0] and "ConnectionError: tracker offline" in told[0]
    assert broken.calls == 2  # left out after its failure, findings included
    with Run(tmp_path / "run") as run:
        assert run.state().name == "finished"
    _assert_same(healthy.series(), _stored(tmp_path / "run"))  # the others carry on
    assert healthy.found == _findings(tmp_path / "run")


def test_an_analysis_that_fails_at_close_warns_and_closes_the_run(tmp_path, monkeypatch):
    from trainprobe.monitor import mirror as mirror_module

    def fails(run_dir):
        raise RuntimeError("detector bug")

    monkeypatch.setattr(mirror_module, "_analyze", fails)
    mirror = Collect()
    with pytest.warns(RuntimeWarning, match="findings were not mirrored.*detector bug"):
        _train(tmp_path / "run", mirror)
    assert mirror.found is None
    _assert_same(mirror.series(), _stored(tmp_path / "run"))


@pytest.mark.parametrize(
    "bad",
    [object(), io.StringIO(), logging.getLogger("trainprobe-test"), "tensorboard", [Collect(), 3]],
    ids=["object", "file", "logging", "str", "list-with-int"],
)
def test_a_mirror_of_no_known_kind_is_refused_naming_the_accepted_ones(tmp_path, bad):
    model = nn.Linear(2, 1)
    accepted = r"mirror=\.\.\.\) takes a Mirror \(write\(step, values\)\), a TensorBoard "
    with pytest.raises(TypeError, match=accepted + r".*Lightning logger.*W&B run.*got "):
        trainprobe.watch(model, run_dir=tmp_path / "r", mirror=bad)
    assert not (tmp_path / "r").exists()  # refused before anything is written


def _ddp_worker(rank: int, world: int, tmp_path) -> None:
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mirror = Collect()
    with trainprobe.watch(
        model, run_dir=tmp_path / "run", optimizer=opt, mirror=mirror, flush_seconds=0
    ) as mon:
        for step in range(4):
            gen = torch.Generator().manual_seed(step * world + rank)
            x = torch.randn(4, 4, generator=gen)
            with mon.step(step, batch=(x,)) as s:
                loss = model(x).pow(2).mean()
                loss.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad()
    report(tmp_path, rank, {"series": mirror.series(), "findings": mirror.found is not None})


@pytest.mark.slow  # two spawned processes: about 10 s
def test_under_ddp_rank_0_alone_mirrors_the_global_values(tmp_path):
    spawn(partial(_ddp_worker), 2, tmp_path, deadline=90)
    seen = reports(tmp_path, 2)
    got = {k: tuple(v) for k, v in seen[0]["series"].items()}
    _assert_same(got, _stored(tmp_path / "run"))
    assert seen[0]["findings"] is True
    assert seen[1] == {"series": {}, "findings": False}
