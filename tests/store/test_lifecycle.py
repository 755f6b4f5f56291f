"""One writer per run, and a run's state: finished, failed, running, abandoned (real processes,
SIGKILL included); opening errors in our words; resume_from and overwrite."""

from __future__ import annotations

import json
import os
import socket
import sqlite3

import numpy as np
import pytest

from tests.store.helpers import APPEND_SCRIPT, TRAIN_SCRIPT, Child, read_only
from trainprobe.store import Record, Run, RunError, RunInUseError, RunState, RunWriter
from trainprobe.store import writer as writer_module
from trainprobe.store.lifecycle import LOCK_NAME, live_writer

ME = rf"process {os.getpid()} on host {socket.gethostname()}"


def _write(run_dir, steps, **kwargs) -> None:
    writer = RunWriter(run_dir, **kwargs)
    writer.append(Record(s, {"a": float(s), "b": np.full(2, s)}) for s in steps)
    writer.close()


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    first = RunWriter(tmp_path / "r")
    try:
        with pytest.raises(RunInUseError, match=rf"is being written by {ME}.*wait for it") as info:
            RunWriter(tmp_path / "r")  # two writers racing: not SQLite's "database is locked"
        assert info.value.writer["pid"] == os.getpid()
        with pytest.raises(RunInUseError, match=r"resume=True continues a run only once its"):
            RunWriter(tmp_path / "r", resume=True)
        with Run(tmp_path / "r") as run:
            state = run.state()
            assert state.name == "running" and state.writer["pid"] == os.getpid()
    finally:
        first.close()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["run.db"]  # lock removed
    with Run(tmp_path / "r") as run:
        assert run.state() == RunState("finished", "finished", run.meta["writer"])
    RunWriter(tmp_path / "r", resume=True).close()  # free again


def test_a_live_writer_process_is_running_and_refuses_resume(tmp_path):
    child = Child(tmp_path, APPEND_SCRIPT, tmp_path / "run", 1_000_000, 0.02)
    try:
        child.read_until(2)
        pid = child.proc.pid
        with pytest.raises(RunInUseError, match=rf"by process {pid} on host .*resume=True"):
            RunWriter(tmp_path / "run", resume=True)
        with Run(tmp_path / "run") as run:
            state = run.state()
        assert state.name == "running" and state.writer["pid"] == pid
        assert state.describe().startswith(f"running (written now by process {pid} on host")
    finally:
        child.close()


def test_a_sigkilled_writer_leaves_an_abandoned_run_that_can_be_resumed(tmp_path):
    child = Child(tmp_path, TRAIN_SCRIPT, tmp_path / "run")
    try:
        child.read_until(5)
        pid = child.proc.pid
        child.kill()
    finally:
        child.close()
    assert live_writer(tmp_path / "run")[0] is False  # the kernel dropped the lock
    with Run(tmp_path / "run") as run:
        state = run.state()
        last = run.last_step()
    assert state.name == "abandoned" and state.status == "running"
    assert state.writer["pid"] == pid
    assert f"process {pid} on host" in state.describe() and "killed" in state.describe()
    writer = RunWriter(tmp_path / "run", resume=True)  # nobody holds it: resume is allowed
    writer.append([Record(last + 1, {"scalars/loss": 1.0})])
    writer.close()
    with Run(tmp_path / "run") as run:
        assert run.state().name == "finished"


def test_failed_and_unknown_states(tmp_path):
    writer = RunWriter(tmp_path / "r")
    writer.set_meta({"status": "failed: ValueError: bad"})
    writer.close()  # a failure recorded before closing stays
    with Run(tmp_path / "r") as run:
        assert run.state().name == "failed"
        assert run.state().describe() == "failed (ValueError: bad)"
    db = sqlite3.connect(tmp_path / "r" / "run.db")
    with db:
        db.execute("DELETE FROM meta WHERE key = 'status'")
    db.close()
    with Run(tmp_path / "r") as run:
        assert run.state().name == "unknown"


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"run_dir .*f is a file, not a directory; pass a dir"):
        RunWriter(tmp_path / "f")
    _write(tmp_path / "r", [0])
    with pytest.raises(ValueError, match=r"run.db is a file, not a directory; pass its directory"):
        RunWriter(tmp_path / "r" / "run.db", resume=True)
    with pytest.raises(ValueError, match=r"whose parents are directories"):
        RunWriter(tmp_path / "f" / "sub")


def test_the_reader_accepts_the_database_path(tmp_path):
    _write(tmp_path / "r", [0, 1])
    with Run(tmp_path / "r" / "run.db") as run:
        assert run.run_dir == tmp_path / "r" and run.series("a").values.tolist() == [0.0, 1.0]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RunError, match=r"notes.txt is a file, not a run directory; pass the dir"):
        Run(tmp_path / "notes.txt")


def test_a_read_only_directory_is_named_not_sqlite(tmp_path):
    _write(tmp_path / "r", [0, 1])
    with read_only(tmp_path / "r"):
        with pytest.raises(PermissionError, match=r"cannot write a run in .*r: .*read-only"):
            RunWriter(tmp_path / "r", resume=True)
        with Run(tmp_path / "r") as run:  # reading needs no write access
            assert run.series("a").values.tolist() == [0.0, 1.0]
            assert run.state().name == "finished"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["run.db"]


def test_a_read_only_database_is_named_not_sqlite(tmp_path):
    _write(tmp_path / "r", [0])
    with (
        read_only(tmp_path / "r" / "run.db"),
        pytest.raises(
            PermissionError,
            match=r"cannot write .*run.db \(SQLite: .*\): the run directory or run.db",
        ),
    ):
        RunWriter(tmp_path / "r", resume=True)
    assert not (tmp_path / "r" / LOCK_NAME).exists()  # the failed writer let the lock go


def test_a_database_locked_by_another_program(tmp_path, monkeypatch):
    _write(tmp_path / "r", [0])
    monkeypatch.setattr(writer_module, "BUSY_SECONDS", 0.05)
    other = sqlite3.connect(tmp_path / "r" / "run.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RunInUseError, match=r"run.db is locked by another program"):
            RunWriter(tmp_path / "r", resume=True)
    finally:
        other.close()


def test_a_foreign_file_named_run_db(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.db").write_bytes(b"not a database" * 100)
    with pytest.raises(RunError, match=r"is not a trainprobe run database .*overwrite=True"):
        RunWriter(tmp_path / "r", resume=True)
    RunWriter(tmp_path / "r", overwrite=True).close()
    with Run(tmp_path / "r") as run:
        assert run.keys() == []


# -- resume_from and overwrite -----------------------------------------------------------------


def test_resume_from_drops_the_steps_after_the_checkpoint(tmp_path):
    _write(tmp_path / "r", range(8))
    writer = RunWriter(tmp_path / "r", resume=True)
    writer.append([Record(8, {"late": 1.0})])  # a key only the preempted job wrote
    writer.close()
    writer = RunWriter(tmp_path / "r", resume=True, resume_from=5)
    assert writer.last_step == 4
    writer.append(Record(s, {"a": 10.0 * s}) for s in (5, 6))  # the job again from step 5
    writer.close()
    with Run(tmp_path / "r") as run:
        a = run.series("a")
        assert a.steps.tolist() == [0, 1, 2, 3, 4, 5, 6]
        assert a.values.tolist() == [0, 1, 2, 3, 4, 50, 60]  # one value per step
        assert run.arrays("b")[0].tolist() == [0, 1, 2, 3, 4]
        assert run.keys() == ["a", "b"]  # "late" held only dropped steps
        (entry,) = run.meta["truncated"]
        assert entry["from_step"] == 5 and entry["rows"] == 3 + 3 + 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"resume_from": 3}, ValueError, r"resume_from=3 continues an existing run: pass resume="),
        ({"resume": True, "resume_from": -1}, ValueError, r"resume_from must be a step >= 0"),
        ({"resume": True, "resume_from": 2.0}, TypeError, r"resume_from must be an int step"),
        ({"resume": True, "resume_from": True}, TypeError, r"resume_from must be an int step"),
        ({"resume": True, "overwrite": True}, ValueError, r"contradict each other"),
    ],
)
def test_open_options_are_checked(tmp_path, kwargs, error, match):
    _write(tmp_path / "r", [0])
    with pytest.raises(error, match=match):
        RunWriter(tmp_path / "r", **kwargs)


def test_overwrite_replaces_the_run(tmp_path):
    _write(tmp_path / "r", range(5))
    with pytest.raises(FileExistsError, match=r"resume=True to append to it, overwrite=True"):
        RunWriter(tmp_path / "r")
    _write(tmp_path / "r", [0], overwrite=True)
    with Run(tmp_path / "r") as run:
        assert run.series("a").steps.tolist() == [0] and "truncated" not in run.meta
    _write(tmp_path / "new", [0], overwrite=True)  # nothing to replace: a new run


def test_the_lock_file_names_its_writer(tmp_path):
    writer = RunWriter(tmp_path / "r")
    try:
        data = json.loads((tmp_path / "r" / LOCK_NAME).read_text())
        assert data == writer._writer and live_writer(tmp_path / "r") == (True, data)
    finally:
        writer.close()
    assert live_writer(tmp_path / "r") == (False, None)


def test_a_database_the_reader_cannot_open(tmp_path, monkeypatch):
    _write(tmp_path / "r", [0])
    from trainprobe.store import run as run_module

    def refuse(*args, **kwargs):  # what SQLite says for a file this user may not read
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(run_module.sqlite3, "connect", refuse)
    with pytest.raises(RunError, match=r"cannot open .*run.db \(unable to open database file\): "):
        Run(tmp_path / "r")


def test_state_lines_and_the_fallback_without_flock(tmp_path, monkeypatch):
    from trainprobe.store import lifecycle

    assert RunState("abandoned").describe().startswith("abandoned (its writer stopped without")
    assert RunState("running").describe() == "running"
    assert RunState("finished", "finished").describe() == "finished"
    writer = RunWriter(tmp_path / "r")  # as if on a file system without flock:
    try:
        monkeypatch.setattr(lifecycle, "fcntl", None)  # the pid decides, on this host
        assert live_writer(tmp_path / "r")[0] is True
        (tmp_path / "r" / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 7, "host": "elsewhere"}))
        assert live_writer(tmp_path / "r")[0] is None  # another host: cannot tell
        with Run(tmp_path / "r") as run:
            assert run.state().name == "running"  # never called abandoned by guesswork
    finally:
        monkeypatch.undo()
        writer.close()
