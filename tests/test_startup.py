"""Fast start: the lazy public API, and commands that read runs never import torch."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import trainprobe
from tests.synth import write_run

_WATCH_TORCH = """
import sys, traceback

class FirstTorchImport:  # records who imports torch first; does not block it
    stack = None

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and FirstTorchImport.stack is None:
            FirstTorchImport.stack = "".join(traceback.format_stack()[:-1])
        return None

sys.meta_path.insert(0, FirstTorchImport())
"""

_REPORT = """
result["torch"] = "torch" in sys.modules
result["stack"] = FirstTorchImport.stack
print("\\n" + json.dumps(result))
"""


def _child(body: str, cwd) -> dict:
    """Run ``body`` in a fresh interpreter; return its last stdout line (JSON), to which
    ``torch`` (imported?) and ``stack`` (where torch was first imported) are added."""
    code = _WATCH_TORCH + textwrap.dedent(body) + _REPORT
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tiny_run(tmp_path):
    steps = np.arange(0, 100, 5)
    loss = 2.0 * np.exp(-steps / 40) + 0.1
    series = {
        "scalars/loss": (steps, loss),
        "norms/grad_total": (steps, np.full(steps.size, 0.5)),
        "norms/grad/fc.weight": (steps, np.linspace(1.0, 0.5, steps.size)),
        "hessian_density/density": (steps[:3], np.ones((3, 4))),  # an array key
    }
    return write_run(tmp_path / "run", series)


def test_help_report_dashboard_export_never_import_torch(tmp_path):
    run_dir = _tiny_run(tmp_path).run_dir
    result = _child(
        f"""
        import json
        from trainprobe.cli.main import main
        from trainprobe.cli.serve import page

        run = {str(run_dir)!r}
        result = {{"codes": [
            main(["report", run]),
            main(["report", run, "--json", "--no-dashboard"]),
            main(["dashboard", run, "-o", "page.html"]),
            main(["export", run, "--out", "series.csv"]),
        ]}}
        result["page"] = len(page(run))
        try:
            main(["--help"])
        except SystemExit as exit_info:
            result["codes"].append(exit_info.code)
        """,
        cwd=tmp_path,
    )
    assert result["codes"] == [0, 0, 0, 0, 0]
    assert result["page"] > 1_000_000
    assert (tmp_path / "page.html").is_file() and (tmp_path / "series.csv").is_file()
    assert not result["torch"], f"torch was imported here:\n{result['stack']}"


def test_importing_trainprobe_imports_nothing_else(tmp_path):
    result = _child(
        """
        import json
        import trainprobe

        result = {"modules": sorted(m for m in sys.modules if m.startswith("trainprobe"))}
        result["numpy"] = "numpy" in sys.modules
        """,
        cwd=tmp_path,
    )
    assert result["modules"] == ["trainprobe", "trainprobe._version"]
    assert not result["numpy"] and not result["torch"]


def test_stored_runs_and_analysis_need_no_torch(tmp_path):
    result = _child(
        """
        import json
        from trainprobe import Finding, Run, RunError, Severity, analyze

        result = {}
        """,
        cwd=tmp_path,
    )
    assert not result["torch"], f"torch was imported here:\n{result['stack']}"


def test_every_public_name_resolves_and_is_listed():
    assert list(trainprobe.__all__) == list(dict.fromkeys(trainprobe.__all__))  # no repeats
    assert set(trainprobe.__all__) == set(trainprobe._PUBLIC)
    assert set(trainprobe.__all__) <= set(dir(trainprobe))
    for name, module_name in trainprobe._PUBLIC.items():
        module = importlib.import_module(module_name)
        value = getattr(trainprobe, name)
        if module_name == f"trainprobe.{name}":
            assert value is module
        else:
            assert value is getattr(module, name), name


def test_public_names_import_as_before():
    from trainprobe import HessianTop, Run, StepHandle, curvature, every, watch

    assert HessianTop.__name__ == "HessianTop" and Run.__name__ == "Run"
    assert StepHandle.__name__ == "StepHandle" and callable(watch) and callable(every)
    assert curvature.__name__ == "trainprobe.curvature"
    namespace: dict = {}
    exec("from trainprobe import *", namespace)
    assert set(trainprobe.__all__) <= set(namespace)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'trainprobe' has no attribute 'Hesian'"):
        trainprobe.Hesian  # noqa: B018
    assert not hasattr(trainprobe, "_no_such_name")
