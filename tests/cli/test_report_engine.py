"""`trainprobe report` names the curvature probes whose "auto" engine fell back to finite
differences (from ``meta["measured_with"]``), and stays quiet about exact engines."""

from __future__ import annotations

import numpy as np

from tests.synth import write_run
from trainprobe.cli.main import main
from trainprobe.cli.report import probe_notes

FALLBACK = (
    "the 'graph' HVP engine cannot differentiate this model twice: autograd.Function "
    "OnceTanh (the output of module '1', OnceAct) has no double backward"
)


def _run(run_dir, measured_with):
    steps = np.arange(20)
    return write_run(
        run_dir,
        {"scalars/loss": (steps, 1.0 / (1 + steps)), "hessian/eig_0": (steps, 1 + 0 * steps)},
        meta={"measured_with": measured_with},
    )


def test_a_fallback_to_finite_differences_gets_one_line(tmp_path, capsys):
    fd = {"engine": "fd", "attention": "math", "fallback": FALLBACK, "since_step": 3}
    graph = {"engine": "graph", "attention": "math", "since_step": 0}
    run = _run(tmp_path / "r", {"hessian": fd, "sharpness": graph})
    (note,) = probe_notes(run)
    assert note.startswith("probe 'hessian' ran on finite differences (engine 'fd', attention")
    assert "from step 3: the 'graph' HVP engine cannot" in note and "hessian/fd_error" in note
    assert main(["report", str(tmp_path / "r"), "--no-dashboard"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the note is wrapped at 100 columns
    assert "probe 'hessian' ran on finite differences" in out and "OnceTanh" in out
    assert "'sharpness' ran" not in out


def test_exact_engines_and_a_chosen_fd_engine_say_nothing(tmp_path):
    chosen = {"engine": "fd", "attention": "math", "since_step": 0}  # engine="fd" given
    graph = {"engine": "graph", "attention": "math", "since_step": 0}
    assert probe_notes(_run(tmp_path / "a", {"hessian": chosen, "sharpness": graph})) == []
    assert probe_notes(_run(tmp_path / "b", {})) == []
    assert probe_notes(_run(tmp_path / "c", {"odd": "not a dict"})) == []
