"""`trainprobe report` on runs that finished, failed, were killed or still run; read-only
directories, the database path, a closed pipe, an empty run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import trainprobe
from tests.store.helpers import APPEND_SCRIPT, TRAIN_SCRIPT, Child, read_only
from tests.synth import write_run
from trainprobe.cli.main import main
from trainprobe.cli.report_cli import EXIT_CODES
from trainprobe.probes import LayerNorms, NonFiniteGuard, every
from trainprobe.store import RunWriter


def _healthy(run_dir):
    steps = np.arange(100)
    return write_run(run_dir, {"scalars/loss": (steps, 2.0 * np.exp(-steps / 40) + 0.1)})


def _train_and_raise(run_dir, *, nan: bool = False) -> None:
    model = nn.Linear(3, 1)
    probes = [LayerNorms(schedule=every(1)), NonFiniteGuard()]
    with pytest.raises(RuntimeError, match="out of memory"):
        with trainprobe.watch(model, probes, run_dir=run_dir) as mon:
            for step in range(20):
                with mon.step(step) as s:
                    loss = model(torch.ones(2, 3)).pow(2).mean()
                    loss.backward()
                    s.log(loss=float("nan") if nan and step >= 10 else loss)
                model.zero_grad()
            raise RuntimeError("CUDA out of memory (simulated)")


def test_a_run_whose_training_raised_exits_3(tmp_path, capsys):
    _train_and_raise(tmp_path / "r")
    assert main(["report", str(tmp_path / "r"), "--no-dashboard"]) == 3
    out = capsys.readouterr().out
    assert "status: failed (RuntimeError: CUDA out of memory (simulated))" in out
    _train_and_raise(tmp_path / "nan", nan=True)  # a critical finding too: 3 wins
    assert main(["report", str(tmp_path / "nan"), "--no-dashboard"]) == 3
    assert "CRITICAL" in capsys.readouterr().out


def test_a_sigkilled_run_is_abandoned_and_exits_4(tmp_path, capsys):
    child = Child(tmp_path, TRAIN_SCRIPT, tmp_path / "run")
    try:
        child.read_until(5)
        pid = child.proc.pid
        child.kill()
    finally:
        child.close()
    assert main(["report", str(tmp_path / "run"), "--no-dashboard"]) == 4
    out = capsys.readouterr().out
    assert f"status: abandoned (its writer, process {pid} on host" in out
    assert main(["report", str(tmp_path / "run"), "--json", "--no-dashboard"]) == 4
    payload = json.loads(capsys.readouterr().out)
    assert payload["state"] == "abandoned" and payload["status"] == "running"
    assert payload["writer"]["pid"] == pid


def test_a_run_still_written_by_a_live_process_is_running(tmp_path, capsys):
    child = Child(tmp_path, APPEND_SCRIPT, tmp_path / "run", 1_000_000, 0.02)
    try:
        child.read_until(3)
        code = main(["report", str(tmp_path / "run"), "--json", "--no-dashboard"])
        payload = json.loads(capsys.readouterr().out)
        assert code == 0 and payload["state"] == "running"
        assert payload["writer"]["pid"] == child.proc.pid
    finally:
        child.close()
    assert main(["report", str(tmp_path / "run"), "--no-dashboard"]) == 4  # killed now
    capsys.readouterr()


def test_a_finished_run_exits_0_and_the_codes_are_in_the_help(tmp_path, capsys):
    _healthy(tmp_path / "r")
    assert main(["report", str(tmp_path / "r"), "--no-dashboard"]) == 0
    assert "last step 99, status: finished" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {' '.join(meaning.split())}" in text
    assert "141 the output pipe closed early" in text


def test_a_read_only_run_directory_still_reports(tmp_path, capsys):
    _healthy(tmp_path / "r")
    with read_only(tmp_path / "r"):
        assert main(["report", str(tmp_path / "r")]) == 0
        captured = capsys.readouterr()
        assert "No findings" in captured.out and "Series:" in captured.out
        (note,) = captured.err.strip().splitlines()
        assert note.startswith("trainprobe report: dashboard not written: cannot write the ")
        assert "dashboard.html: " in note and "pass --dashboard-out PATH" in note
        elsewhere = tmp_path / "pages" / "r.html"
        code = main(["report", str(tmp_path / "r"), "--dashboard-out", str(elsewhere)])
        assert code == 0 and elsewhere.is_file()
        assert f"dashboard: {elsewhere}" in capsys.readouterr().out
    assert not (tmp_path / "r" / "dashboard.html").exists()


def test_an_unwritable_dashboard_out_is_a_usage_error(tmp_path, capsys):
    _healthy(tmp_path / "r")
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        code = main(["report", str(tmp_path / "r"), "--dashboard-out", str(tmp_path / "ro/x.html")])
    err = capsys.readouterr().err
    assert code == 2 and "trainprobe report: error: cannot write the dashboard to " in err
    with read_only(tmp_path / "r"):
        assert main(["dashboard", str(tmp_path / "r")]) == 2
    assert "dashboard.html: " in (err := capsys.readouterr().err)
    assert "pass -o PATH to write it elsewhere" in err


@pytest.mark.parametrize("command", ["report", "dashboard", "export"])
def test_the_database_path_is_accepted(tmp_path, capsys, command):
    _healthy(tmp_path / "r")
    assert main([command, str(tmp_path / "r" / "run.db")]) == 0
    written = {"report": "dashboard.html", "dashboard": "dashboard.html", "export": "series.csv"}
    assert (tmp_path / "r" / written[command]).is_file()
    (tmp_path / "x.txt").write_text("")
    assert main([command, str(tmp_path / "x.txt")]) == 2
    assert "is a file, not a run directory; pass the directory" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path):
    steps = np.arange(50)
    run = write_run(tmp_path / "r", {f"k{i}/x": (steps, steps * 1.0) for i in range(300)})
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as `| head` soon is
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trainprobe.cli.main", "report", str(run.run_dir)],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == b""


def test_a_run_with_no_records_says_so(tmp_path, capsys):
    RunWriter(tmp_path / "r").close()
    assert main(["report", str(tmp_path / "r"), "--no-dashboard"]) == 0
    out = capsys.readouterr().out
    assert "No records: the run holds no recorded step yet" in out and "None" not in out
    assert "Series: none recorded yet." in out


def test_an_internal_error_is_not_the_critical_code(tmp_path, capsys, monkeypatch):
    _healthy(tmp_path / "r")
    from trainprobe.cli import report

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(report, "format_findings", broken)
    assert main(["report", str(tmp_path / "r"), "--no-dashboard"]) == 70
    assert "internal error (exit 70)" in capsys.readouterr().err
