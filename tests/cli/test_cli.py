"""The command line: demo, report (exit codes, JSON), dashboard, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.cli.main import main


def _healthy(tmp_path):
    steps = np.arange(200)
    loss = 2.0 * np.exp(-steps / 80) + 0.05 * np.random.default_rng(0).random(200) + 0.1
    return write_run(tmp_path / "ok", {"scalars/loss": (steps, loss)})


def _broken(tmp_path):
    steps = np.arange(50)
    loss = np.where(steps < 30, 1.0, np.nan)
    bad = (steps >= 30).astype(float)
    return write_run(
        tmp_path / "bad",
        {
            "scalars/loss": (steps, loss),
            "nonfinite/loss": (steps, bad),
            "nonfinite/grad": (steps, 0 * bad),
            "nonfinite/param": (steps, 0 * bad),
        },
    )


def test_report_exit_code_gates_on_critical(tmp_path, capsys):
    ok, bad = _healthy(tmp_path), _broken(tmp_path)
    assert main(["report", str(ok.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "No findings" in out and (ok.run_dir / "dashboard.html").is_file()
    assert main(["report", str(bad.run_dir), "--no-dashboard"]) == 1
    out = capsys.readouterr().out
    assert "CRITICAL" in out and "step 30" in out
    assert not (bad.run_dir / "dashboard.html").exists()
    assert all(len(line) <= 100 for line in out.splitlines() if str(bad.run_dir) not in line)


def test_report_json(tmp_path, capsys):
    bad = _broken(tmp_path)
    assert main(["report", str(bad.run_dir), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["findings"][0]["severity"] == "critical"
    assert payload["findings"][0]["start_step"] == 30
    assert payload["findings"][0]["detector"] == "nonfinite"


def test_dashboard_writes_one_self_contained_file(tmp_path, capsys):
    ok = _healthy(tmp_path)
    out = tmp_path / "sub" / "x.html"
    assert main(["dashboard", str(ok.run_dir), "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert '<script src="http' not in html and "plotly" in html and len(html) > 1_000_000


@pytest.mark.parametrize("command", ["report", "dashboard"])
def test_errors_exit_2_with_a_message(tmp_path, capsys, command):
    assert main([command, str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "run.db").write_bytes(b"not a database" * 100)
    assert main([command, str(tmp_path / "garbage")]) == 2
    assert "cannot be read as a trainprobe run" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("demo", "report", "dashboard"))


def test_short_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "120", "--no-mishap"]) == 0
    text = capsys.readouterr().out
    assert "trainprobe report" in text and (out / "run" / "dashboard.html").is_file()
    assert main(["demo", "--out", str(out), "--steps", "30"]) == 0  # a second demo: run-2
    assert (out / "run-2" / "run.db").is_file()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--threads", "-1", "expected 0 or more, got -1"),
        ("--steps", "0", "expected 1 or more, got 0"),
    ],
)
def test_demo_rejects_bad_numbers(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
