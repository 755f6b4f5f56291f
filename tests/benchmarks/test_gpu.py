"""``benchmarks/gpu.py`` stays runnable: its tiny CPU run fills every section with numbers.

The script is run as on the GPU machine (a new process, ``PYTHONPATH=src``), so its global
settings (deterministic algorithms, threads, dynamo caches) stay out of this test session.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "environment",
    "hvp_accuracy",
    "lanczos",
    "monitor",
    "mixed_precision",
    "per_sample",
    "compile",
    "fsdp2",
    "krylov",
)


def _problems(value: object, path: str = "") -> list[str]:
    """Paths of every recorded error or skip, anywhere in the results."""
    if isinstance(value, dict):
        found = [f"{path}: {value[k]}" for k in ("error", "skipped") if k in value]
        return found + [p for k, v in value.items() for p in _problems(v, f"{path}/{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _problems(v, f"{path}[{i}]")]
    return []


def _numbers(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return 1
    if isinstance(value, dict):
        return sum(_numbers(v) for v in value.values())
    if isinstance(value, list):
        return sum(_numbers(v) for v in value)
    return 0


def test_quick_cpu_run_fills_every_section(tmp_path):
    paths = [os.environ.get("PYTHONPATH"), str(ROOT / "src")]  # as on the GPU machine
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [
        sys.executable,
        "benchmarks/gpu.py",
        "--device",
        "cpu",
        "--quick",
        "--threads",
        "1",
        "--budget",
        "120",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    markdown = (tmp_path / "gpu.md").read_text()
    sections = results["sections"]

    assert set(sections) == set(SECTIONS)
    assert _problems(sections) == []
    assert all(_numbers(sections[name]) >= 2 for name in SECTIONS)
    assert "| `graph` |" in markdown and markdown in done.stdout

    hvp = sections["hvp_accuracy"]
    for case in ("mlp", "cnn_bn_eval"):
        assert hvp[case]["reference_fwdrev_vs_revrev"] < 1e-12
        for engine in ("graph", "jvp", "linearize"):
            assert hvp[case][f"float64/{engine}"]["max_rel_err"] < 1e-8
            assert hvp[case][f"float32/{engine}"]["max_rel_err"] < 1e-4

    lanczos = sections["lanczos"]
    assert lanczos["reference"]["dtype"] == "float64"
    assert all(lanczos[e]["rel_diff_to_reference"] < 1e-4 for e in ("graph", "jvp", "linearize"))

    monitor = sections["monitor"]
    assert monitor["unwatched_runs_identical"] is True
    assert monitor["watched_identical"] is True
    assert "sharpness" in monitor["rows"]["sharpness_every_20"]["families"]

    amp = sections["mixed_precision"]
    for variant in ("autocast_forward", "autocast_step"):
        assert amp[variant]["identical"] is True
        assert amp[variant]["probes_recorded"] is True

    compiled = sections["compile"]  # aot_eager on the CPU: every run trains alike
    for run in ("compiled_again", "grad_noise", "sharpness", "compiled_after_probes"):
        assert compiled[run]["identical"] is True
        assert compiled[run]["max_abs_diff"] == 0.0
    assert compiled["grad_noise"]["probe_recorded"] is True
    assert compiled["sharpness"]["probe_recorded"] is True

    per_sample = sections["per_sample"]
    assert all(per_sample[m]["max_rel_err"] < 1e-5 for m in ("vmap", "loop", "auto"))

    fsdp2 = sections["fsdp2"]  # gloo, one rank, on the CPU
    assert fsdp2["identical"] is True and not fsdp2["disabled"]
    assert fsdp2["rel_diff"] < 1e-4 and fsdp2["fd_error"] < 1e-2
    assert "| gloo, 1 rank |" in markdown

    krylov = sections["krylov"]  # tiny decoders on the CPU: every part runs
    products = krylov["products"]
    for engine in ("graph", "jvp", "linearize", "fd"):
        assert math.isfinite(products[engine]["speedup"]) and products[engine]["speedup"] > 0
        assert products[engine]["max_rel_diff"] < (1e-2 if engine == "fd" else 1e-5)
    gpt = krylov["gpt"]
    assert gpt["engine"] == "graph" and gpt["autocast"] is None
    for run in ("cold", "warm", "preconditioned"):
        assert gpt[run]["converged"] is True and gpt[run]["hvps"] > 0
        assert math.isfinite(gpt[run]["values"][0]) and gpt[run]["values"][0] > 0
        assert gpt[run]["rel_residual"] <= 1e-3
    assert gpt["warm"]["hvps"] < gpt["cold"]["hvps"]  # the warm start saves products
    assert gpt["preconditioned"]["threshold"] > 0 and gpt["preconditioned"]["ratio"] > 0
    big = krylov["gpt_big"]
    assert big["engine"] == "graph" and big["engines_tried"] == {"graph": "used"}
    for basis in ("float32", "bfloat16", "offloaded"):
        row = big[basis]
        assert len(row["values"]) == 5 and all(math.isfinite(v) for v in row["values"])
        assert row["converged"] is True and 0 < row["hvps"] <= 100
        assert row["rel_residual"] <= 1e-3
    assert big["bfloat16"]["storage"] == "bfloat16" and big["offloaded"]["storage"] == "float32"
    assert big["bfloat16"]["rel_diff_to_float32"] < 1e-2
    assert big["offloaded"]["rel_diff_to_float32"] < 1e-6  # the same arithmetic, elsewhere
    assert "| top 1, cold |" in markdown and "| top 5, bfloat16 basis |" in markdown
