"""Opening the run directory from ``watch``: run again (overwrite), resume after preemption
(resume_from), a live writer refused by name, a file or read-only directory in our words."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainprobe
from tests.store.helpers import APPEND_SCRIPT, Child, read_only
from trainprobe.probes import LayerNorms, every
from trainprobe.store import Run, RunInUseError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def _train(mon, model, steps, scale: float = 1.0) -> None:
    for step in steps:
        with mon.step(step) as s:
            loss = model(torch.ones(2, 3)).pow(2).mean() * scale
            loss.backward()
            s.log(loss=loss)
        model.zero_grad()


def _watch(model, run_dir, **kwargs):
    return trainprobe.watch(model, [LayerNorms(schedule=every(1))], run_dir=run_dir, **kwargs)


def test_a_preempted_job_resumes_from_its_checkpoint(tmp_path):
    model = _model()
    with _watch(model, tmp_path / "r") as mon:  # checkpoint at step 3, preempted after 5
        _train(mon, model, range(6))
    with pytest.raises(ValueError, match=r"step 3 does not come after step 5"):
        with _watch(model, tmp_path / "r", resume=True) as mon:
            _train(mon, model, [3])
    with _watch(model, tmp_path / "r", resume=True, resume_from=3) as mon:
        _train(mon, model, range(3, 8), scale=10.0)
    with Run(tmp_path / "r") as run:
        loss = run.series("scalars/loss")
        assert loss.steps.tolist() == list(range(8))  # one value per step
        assert loss.values[3] == pytest.approx(10 * loss.values[0])  # the resumed job's
        assert run.series("norms/grad_total").steps.tolist() == list(range(8))
        assert [t["from_step"] for t in run.meta["truncated"]] == [3]
        assert run.state().name == "finished"


def test_resume_from_needs_resume(tmp_path):
    with pytest.raises(ValueError, match=r"resume_from=3 continues an existing run: pass resume"):
        _watch(_model(), tmp_path / "r", resume_from=3)
    with pytest.raises(ValueError, match=r"resume=True and overwrite=True contradict"):
        _watch(_model(), tmp_path / "r", resume=True, overwrite=True)


def test_running_the_example_again(tmp_path):
    model = _model()
    with _watch(model, tmp_path / "r") as mon:
        _train(mon, model, range(4))
    with pytest.raises(FileExistsError, match=r"overwrite=True to replace it"):
        _watch(model, tmp_path / "r").__enter__()
    with _watch(model, tmp_path / "r", overwrite=True) as mon:
        _train(mon, model, range(2))
    with Run(tmp_path / "r") as run:
        assert run.series("scalars/loss").steps.tolist() == [0, 1]


def test_resume_while_the_old_process_still_writes_is_refused(tmp_path):
    child = Child(tmp_path, APPEND_SCRIPT, tmp_path / "r", 1_000_000, 0.02)
    try:
        child.read_until(2)
        monitor = _watch(_model(), tmp_path / "r", resume=True)
        with pytest.raises(RunInUseError, match=rf"by process {child.proc.pid} on host"):
            monitor.__enter__()
        steps = child.read_until(len(child.lines) + 2)
    finally:
        child.close()
    with Run(tmp_path / "r") as run:  # nothing of the refused monitor was merged in
        assert "scalars/loss" not in run and run.series("k/00").steps.tolist()[:3] == steps[:3]


def test_two_monitors_on_one_directory(tmp_path):
    model = _model()
    with _watch(model, tmp_path / "r") as mon:
        with pytest.raises(RunInUseError, match=r"is being written by process \d+ on host"):
            _watch(model, tmp_path / "r").__enter__()
        _train(mon, model, range(2))


def test_a_file_or_a_read_only_directory_as_run_dir(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"is a file, not a directory"):
        _watch(_model(), tmp_path / "f").__enter__()
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"), pytest.raises(PermissionError, match=r"read-only"):
        _watch(_model(), tmp_path / "ro" / "run").__enter__()
