"""Slow: ``examples/ddp.py`` under ``torchrun --nproc_per_node 2`` (gloo, 127.0.0.1).

Both ranks watch with the same run directory; the store must be one (rank 0's), finished,
with every step written once, and record that two ranks trained.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainprobe import Run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_example_under_torchrun_writes_one_finished_store(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "examples/ddp.py",
        "--run-dir",
        str(run_dir),
        "--steps",
        str(STEPS),
    ]
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH")]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert f"trainprobe report {run_dir}" in done.stdout
    assert done.stdout.count("run stored in") == 1  # rank 0 alone summarises

    assert sorted(tmp_path.rglob("run.db")) == [run_dir / "run.db"]  # one store
    run = Run(run_dir)
    assert run.state().name == "finished"
    assert run.meta["ranks"]["world"] == 2
    assert run.series("scalars/loss").steps.tolist() == list(range(STEPS))
    keys = run.keys()  # Run has no __iter__
    for key in keys:
        steps = run.series(key).steps
        assert np.all(np.diff(steps) > 0), f"{key}: a step written twice or out of order"
    sharpness = run.series("sharpness/lambda_max")
    assert sharpness.steps.tolist() == [0, 50, 100, 150]
    assert np.isfinite(sharpness.values).all() and (sharpness.values > 0).all()
