"""``benchmarks/gpu.py`` stays runnable: its tiny CPU run fills every section with numbers.

The script is run as on the GPU machine (a new process, ``PYTHONPATH=src``), so its global
settings (deterministic algorithms, threads, dynamo caches) stay out of this test session.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import trainprobe
import trainprobe.probes.transformer as transformer_module
from benchmarks import gpu
from trainprobe.probes import AttentionStats, every

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "environment",
    "hvp_accuracy",
    "lanczos",
    "monitor",
    "mixed_precision",
    "probe_overhead",
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

    overhead = sections["probe_overhead"]  # tiny on the CPU: its ratios mean little
    assert overhead["sync_check"] == "CUDA only" and overhead["sync_free"] is None
    assert overhead["rounds_done"] >= 3 and overhead["steps_each"] >= 40
    rows = overhead["rows"]
    assert list(rows) == list(gpu.OVERHEAD_CONFIGS)
    assert rows["unwatched"]["ratio"] == 1.0 and "verdict" not in rows["unwatched"]
    for name, row in rows.items():
        assert row["ms_per_step"] > 0 and math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["ratio_with_flush"] >= row["ratio"]
        if name != "unwatched":
            assert row["verdict"] == ("pass" if row["ratio"] <= 1.05 else "fail")
            assert row["flush_ms"] > 0
    assert {"attention", "logits", "adam"} <= set(rows["transformer_every_1"]["families"])
    assert "attention" not in rows["default_every_1"]["families"]
    assert overhead["meets_target"] == rows["default_every_1"]["meets_target"]
    assert "| `transformer_every_10` |" in markdown

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


def test_a_sync_under_the_debug_mode_is_recorded_and_training_goes_on(monkeypatch, tmp_path):
    """The CUDA path of ``probe_overhead`` on the CPU: the sync debug mode faked, and a
    trainprobe probe's ``torch.full`` raising as a host sync does under mode "error"."""
    mode = {"value": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["value"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(value=m))

    class Syncing:  # the probes' torch, whose torch.full syncs under mode "error"
        def __getattr__(self, name: str) -> object:
            return getattr(torch, name)

        def full(self, *args: object, **kwargs: object) -> torch.Tensor:
            if mode["value"] == "error":
                raise RuntimeError("called a synchronizing CUDA operation")
            return torch.full(*args, **kwargs)

    monkeypatch.setattr(transformer_module, "torch", Syncing())
    threads = torch.get_num_threads()  # tiny ops: threads only wait for each other
    torch.set_num_threads(1)
    try:
        _strict_blocks(mode, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _strict_blocks(mode: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), types.SimpleNamespace(type="cuda")
    cfg = gpu.Config(cpu, gpu.PRESETS["tiny"], "tiny", 60.0, "aot_eager")
    base, _ = gpu.decoder(cfg, cfg.sizes.probe_gpt, 0)
    vocab, _, _, _, seq, bsz = cfg.sizes.probe_gpt
    tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=torch.Generator().manual_seed(0))
    batches = [(tokens[:, :-1], tokens[:, 1:].reshape(-1))]
    configs = {
        "unwatched": None,
        "logits": lambda: gpu.transformer_probes(1),  # OutputLogits' forward hook syncs
        "attention": lambda: [AttentionStats(schedule=every(1))],  # its measure syncs
        "outside": lambda: gpu.default_probes(every_n=1),  # the loop syncs once, not these
    }
    synced: dict = {}
    with contextlib.ExitStack() as stack:
        trainers = {
            name: gpu._overhead_trainer(name, base, stack, tmp_path, make)
            for name, make in configs.items()
        }
        strict = []  # the outside configuration's forwards under the mode

        def forward(x: torch.Tensor, inner=trainers["outside"].forward) -> torch.Tensor:
            if mode["value"] == "error":
                strict.append(x)
                if len(strict) == 1:
                    raise RuntimeError("called a synchronizing CUDA operation")
            return inner(x)

        trainers["outside"].forward = forward
        for t in trainers.values():
            run = t.run
            monkeypatch.setattr(t, "run", lambda b, n, _d, run=run: run(b, n, cpu))
            for _ in range(2):
                assert gpu._strict_block(t, batches, cuda, synced) > 0
                assert mode["value"] == 0  # restored
        stack.close()
    block = gpu.OVERHEAD_BLOCK
    assert synced["unwatched"] == []
    logits, attention = synced["logits"], synced["attention"]
    assert len(logits) == len(attention) == 1  # a sync from trainprobe: no more checks
    assert logits[0]["step"] == 0 and trainers["logits"].step == 2 * block + 1
    assert logits[0]["trainprobe_frame"].startswith("trainprobe/probes/transformer.py:")
    assert logits[0]["trainprobe_frame"].endswith("(_logit_sums)")
    assert attention[0]["trainprobe_frame"].endswith("(measure)")
    assert "torch.full" in attention[0]["code"]
    outside = synced["outside"]  # one sync from elsewhere: the next block is checked too
    assert len(outside) == 1 and outside[0]["trainprobe_frame"] is None
    assert outside[0]["last_frame"].startswith("test_gpu.py:")
    assert len(strict) == 1 + block and gpu.still_checked(outside)
    assert gpu.first_sync(outside) is outside[0] and gpu.first_sync([]) is None
    for name in ("logits", "attention", "outside"):  # the step that synced is lost, no more
        with trainprobe.Run(tmp_path / name) as run:
            steps = run.series("scalars/loss").steps.tolist()
        assert steps == list(range(1, 2 * block + 1))
    assert "attention" in gpu.recorded_keys(trainers["attention"])["families"]
