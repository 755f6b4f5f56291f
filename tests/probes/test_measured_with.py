"""What the curvature probes leave in the run metadata about how their products ran:
``run.meta["measured_with"][name]`` = engine, attention kernels, fallback, since_step."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

import trainprobe
from tests.cases import OnceAct
from trainprobe.curvature import criterion_loss
from trainprobe.curvature.hvp import sdpa_kernels
from trainprobe.probes import GradientSubspace, HessianTop, HessianTrace, Sharpness, every
from trainprobe.store import Run

LOSS = criterion_loss(nn.CrossEntropyLoss())


class SdpaBlock(nn.Module):
    """One causal self-attention block on ``F.scaled_dot_product_attention``, then a head."""

    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, D]
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, D/H]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        h = x + self.out(a.transpose(1, 2).reshape(b, t, d))  # [B, T, D]
        return self.head(h.mean(dim=1))  # [B, 3]


def _batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=gen), torch.randint(0, 3, (shape[0],), generator=gen)


def _watch(model: nn.Module, probes: list, run_dir, batch, steps: int = 2) -> Run:
    with trainprobe.watch(model, probes, run_dir=run_dir, loss_fn=LOSS) as mon:
        for step in range(steps):
            with mon.step(step, batch=batch):
                LOSS(model, batch).backward()
            model.zero_grad()
    return Run(run_dir)


def test_a_plain_mlp_records_the_graph_engine(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    probes = [HessianTop(schedule=every(1), max_iter=4), Sharpness(schedule=every(1), lr=0.1)]
    run = _watch(model, probes, tmp_path / "r", _batch((32, 6)))
    for name in ("hessian", "sharpness"):
        assert run.meta["measured_with"][name] == {
            "engine": "graph",
            "attention": "math",
            "since_step": 0,
        }
    assert "hessian/fd_error" not in run


def test_a_layer_without_double_backward_records_the_fd_fallback_and_why(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), OnceAct(), nn.Linear(16, 3))
    probes = [HessianTop(schedule=every(1), max_iter=4), HessianTrace(schedule=every(1), matvecs=4)]
    with pytest.warns(RuntimeWarning, match=r"engine='fd'"):
        run = _watch(model, probes, tmp_path / "r", _batch((32, 6)), steps=1)
    for name in ("hessian", "hessian_trace"):
        how = run.meta["measured_with"][name]
        assert how["engine"] == "fd" and how["attention"] == "math" and how["since_step"] == 0
        assert "OnceTanh" in how["fallback"] and "no double backward" in how["fallback"]
        assert f"{name}/fd_error" in run


def test_an_explicit_engine_records_no_fallback(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), OnceAct(), nn.Linear(16, 3))
    probe = HessianTop(schedule=every(1), engine="fd", max_iter=4)
    run = _watch(model, [probe], tmp_path / "r", _batch((32, 6)), steps=1)
    assert run.meta["measured_with"]["hessian"] == {
        "engine": "fd",
        "attention": "math",
        "since_step": 0,
    }


def _kernels(model: nn.Module, probe, run_dir) -> tuple[set[str], Run]:
    """The attention kernels the probe's products ran (an evaluation step holds nothing
    but the probe's own work), from the profiler."""
    batch = _batch((4, 5, 8))
    with trainprobe.watch(model, [probe], run_dir=run_dir, loss_fn=LOSS) as mon:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with mon.step(0, batch=batch, evaluation=True):
                pass
    names = {e.name for e in prof.events() if "scaled_dot_product" in e.name}
    return names, Run(run_dir)


FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"


@pytest.mark.parametrize("engine", ["auto", "jvp", "fd"])
def test_attention_runs_and_is_recorded_on_the_math_kernel(tmp_path, engine):
    """Training's forward picks the fused CPU kernel; every engine's products (finite
    differences too) run on the math kernel, and the record says so."""
    torch.manual_seed(0)
    model = SdpaBlock()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(_batch((4, 5, 8))[0])
    assert FLASH_CPU in {e.name for e in prof.events()}  # the profiler tells them apart
    names, run = _kernels(
        model, HessianTop(schedule=every(1), engine=engine, max_iter=3), tmp_path / "r"
    )
    assert MATH in names and FLASH_CPU not in names
    how = run.meta["measured_with"]["hessian"]
    assert how["attention"] == "math"
    assert how["engine"] == ("graph" if engine == "auto" else engine)


def test_sdpa_kernels_reads_the_enabled_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        assert sdpa_kernels() == "math"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        assert sdpa_kernels() == "flash+math"
    assert sdpa_kernels().endswith("math")  # torch's defaults: every kernel


def test_a_later_fallback_rewrites_the_entry_with_its_step(tmp_path):
    """The graph engine at step 0, a layer without a double backward from step 1 on."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    once = nn.Sequential(plain[0], OnceAct(), plain[2])
    model = nn.ModuleDict({"plain": plain, "once": once})
    current = {"net": plain}

    def loss(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(current["net"](x), y)

    batch = _batch((32, 6))
    probe = GradientSubspace(schedule=every(1), k=2)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with trainprobe.watch(model, [probe], run_dir=tmp_path / "r", loss_fn=loss) as mon:
            for step in range(3):
                current["net"] = plain if step == 0 else once
                with mon.step(step, batch=batch):
                    loss(model, batch).backward()
                model.zero_grad()
                seen.append(Run(tmp_path / "r").meta["measured_with"]["grad_subspace"])
    assert [s["engine"] for s in seen] == ["graph", "fd", "fd"]
    assert seen[0]["since_step"] == 0 and seen[1]["since_step"] == seen[2]["since_step"] == 1
    assert "fallback" not in seen[0] and "OnceTanh" in seen[2]["fallback"]
