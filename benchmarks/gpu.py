"""GPU check and benchmark of trainprobe: accuracy, cost and non-interference on CUDA.

One prepared script for a scarce GPU lease (at most 8 minutes on one H200, compile
warm-up included, of which up to 4 in section 9 and 45 s in section 10; sections stop
early, and later ones are skipped, once ``--budget`` (480) seconds after the imports are
spent). Each section is measured, never assumed, and wrapped: an exception is recorded
with its text in the results and the next section runs.

1. ``environment``: torch, CUDA and cuDNN versions, the device and its memory.
2. ``hvp_accuracy``: ``hessian_operator`` products of every engine in
   ``trainprobe.curvature.ENGINES`` against the dense float64 Hessian of
   ``torch.func.hessian`` (checked against a reverse-over-reverse ``jacrev(jacrev)``
   Hessian), on an MLP and a BatchNorm CNN (eval semantics), in float64 and float32.
3. ``lanczos``: top-5 Lanczos over ``hessian_operator`` of a ~11M-parameter causal
   transformer, batch 256, float32: per engine the time of one HVP per plain gradient
   (``loss.backward()``), HVPs, wall time, eigenvalues against a float64 run of the same
   Lanczos, and the peak memory of one HVP against one gradient.
4. ``monitor``: a BatchNorm CNN trained by AdamW unwatched, watched by
   ``default_probes(every_n=1)``, ``default_probes(every_n=10)`` and ``Sharpness`` every
   20 steps; interleaved repetitions (as ``overhead.py``), median ms per step, and whether
   the parameters are bit-identical to the unwatched run's (deterministic algorithms on,
   after checking that two unwatched runs agree).
5. ``mixed_precision``: the same loop under ``torch.autocast(dtype=torch.bfloat16)``
   (around the forward only, and around the whole step block so that the probes measure
   under autocast too), watched by the default probes every step plus ``GradNoise`` and
   ``GradConflict`` every 10 steps, against unwatched: bit-identical, max |Δw|.
6. ``compile``: a small CNN (SGD) trained eagerly, then ``torch.compile``'d and trained
   unwatched twice, watched by ``GradNoise`` and by ``Sharpness``, and unwatched once
   more: max |Δw| of each against the first compiled run, and whether it equals the eager
   run (seen on the CPU with torch 2.13: once a probe has called the compiled module inside
   a ``torch.func`` transform, dynamo gives up on its frame and the later steps of every
   run ran eagerly, 1 ulp away from the compiled ones). Run last, after section 7.
7. ``per_sample``: ``trainprobe.gradients.per_sample_gradients`` with every method in
   ``METHODS`` at batch 256: time, and max relative error against a loop of one-example
   gradients.
8. ``fsdp2``: a small GELU transformer ``fully_shard``'ed in a process group of one
   (NCCL on CUDA): watched training bit-identical to unwatched, and the curvature probes'
   finite differences through the sharded model against the exact engine unsharded.
9. ``krylov`` (at most ``KRYLOV_S`` = 240 s; parts stop or are skipped, with the reason,
   when time or memory runs out): per engine, one ``matmat`` of 8 columns against 8
   ``matvec`` calls on the ``lanczos`` transformer (speed-up, and the columns' agreement);
   a GPT-2-size decoder (124M parameters, 4 x 1024 random tokens, forward under bf16
   autocast) through ``hessian_operator`` (engine ``"auto"``): top-1 ``lanczos(tol=1e-3)``
   cold, warm from the cold run's vectors and guard vectors after one AdamW step, and of
   Adam's preconditioned Hessian ``P^{-1/2} H P^{-1/2}`` (``stability_rule``) after three:
   λ, HVPs, wall time, peak memory, relative residual; and a 1.01B-parameter one (1 x 1024
   tokens; the first of ``graph`` under autocast, ``jvp``, ``fd`` that takes a product):
   top-5 with the basis in float32, in bfloat16 and offloaded to host memory, each within
   the device memory left (``max_memory``): values, HVPs, time, peak memory, restarts,
   floor, and the largest relative difference of the others' values from float32's.
10. ``probe_overhead`` (at most ``PROBE_OVERHEAD_S`` = 45 s; run after section 5, before
    the others): a GPT-style decoder (124M parameters, 16 x 1024 tokens, bf16 autocast
    around the forward, AdamW) unwatched and watched by ``default_probes(every_n=1)``,
    ``every_n=10``, and the same with ``AttentionStats``, ``OutputLogits`` and
    ``AdamHealth``, every step and every 10; interleaved rounds of 10-step blocks, median
    ms per step, ratio to unwatched against the target 1.05 (pass/fail, no assertion). On
    CUDA the timed steps run under ``torch.cuda.set_sync_debug_mode("error")``: the first
    host sync of a configuration is recorded (the innermost trainprobe frame) and it runs
    on without the mode; ``count_syncs`` then counts syncs per step. The monitor's flush,
    one blocking device-to-host copy by design, is kept out of the timed steps and timed
    apart (``ratio_with_flush`` charges it to the steps it flushed).

Usage (from the repository root; trainprobe need not be installed)::

    PYTHONPATH=src python3 benchmarks/gpu.py --out results/   # CUDA, at most 8 min on an H200
    PYTHONPATH=src python3 benchmarks/gpu.py --sections environment,probe_overhead --out r/
    PYTHONPATH=src python3 benchmarks/gpu.py --device cpu --quick   # tiny sizes, seconds

Writes ``gpu.json`` (every number) and ``gpu.md`` (tables for ``benchmarks/README.md``)
into ``--out`` (default: a new temporary directory) and prints the markdown at the end.
Only trainprobe's public API is used (``trainprobe``, ``trainprobe.curvature``,
``trainprobe.gradients``, ``trainprobe.probes``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import trainprobe
from trainprobe import GradConflict, GradNoise, Sharpness, default_probes, every
from trainprobe.curvature import ENGINES, criterion_loss, hessian_operator, lanczos
from trainprobe.curvature.lanczos import basis_bytes
from trainprobe.functional import Objective, full_float32
from trainprobe.gradients import METHODS, per_sample_gradients
from trainprobe.probes import (
    AdamHealth,
    AttentionStats,
    OutputLogits,
    StabilityRule,
    stability_rule,
)

CE = criterion_loss(nn.CrossEntropyLoss())
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


# -- sizes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one preset (``full`` for the GPU, ``small`` and ``tiny`` for CPUs)."""

    hvp_batch: int  # section 2: MLP 20-h-h-10 and a CNN on small images
    hvp_hidden: int
    hvp_cnn_width: int
    hvp_image: int
    lm: tuple[int, int, int, int, int, int]  # vocab, d_model, heads, layers, seq, batch
    reps: int  # timing repetitions (medians), after warm-ups
    cnn_width: int  # sections 4-6: CNN width, image side, batch
    cnn_image: int
    cnn_batch: int
    train_steps: int  # section 4: steps per repetition (a multiple of 20), repetitions
    train_reps: int
    warmup: int
    amp_steps: int  # section 5
    compile_steps: int  # section 6
    ps_width: int  # section 7: CNN width on cnn_image images, batch
    ps_batch: int
    gpt: tuple[int, int, int, int, int, int]  # section 9: GPT-style decoder (as lm)
    gpt_big: tuple[int, int, int, int, int, int]  # section 9: its ~1B-parameter sibling
    probe_gpt: tuple[int, int, int, int, int, int]  # section 10: GPT-style decoder (as lm)
    probe_rounds: int  # section 10: interleaved rounds of one block per configuration


PRESETS = {
    "full": Sizes(
        hvp_batch=64,
        hvp_hidden=32,
        hvp_cnn_width=4,
        hvp_image=8,
        lm=(1024, 384, 6, 6, 64, 256),
        reps=10,
        cnn_width=64,
        cnn_image=32,
        cnn_batch=256,
        train_steps=20,
        train_reps=10,
        warmup=20,
        amp_steps=100,
        compile_steps=30,
        ps_width=16,
        ps_batch=256,
        gpt=(50304, 768, 12, 12, 1024, 4),  # 124M parameters
        gpt_big=(50304, 2048, 16, 18, 1024, 1),  # 1.11B parameters
        probe_gpt=(50304, 768, 12, 12, 1024, 16),  # 124M parameters, 16k tokens a step
        probe_rounds=12,
    ),
    "small": Sizes(
        hvp_batch=64,
        hvp_hidden=32,
        hvp_cnn_width=4,
        hvp_image=8,
        lm=(128, 64, 4, 2, 16, 32),
        reps=5,
        cnn_width=8,
        cnn_image=16,
        cnn_batch=64,
        train_steps=20,
        train_reps=4,
        warmup=20,
        amp_steps=40,
        compile_steps=20,
        ps_width=8,
        ps_batch=64,
        gpt=(64, 16, 2, 2, 32, 4),
        gpt_big=(64, 32, 4, 2, 32, 1),
        probe_gpt=(64, 32, 4, 2, 32, 8),
        probe_rounds=4,
    ),
    "tiny": Sizes(
        hvp_batch=16,
        hvp_hidden=6,
        hvp_cnn_width=2,
        hvp_image=4,
        lm=(16, 16, 2, 1, 4, 8),
        reps=2,
        cnn_width=4,
        cnn_image=8,
        cnn_batch=16,
        train_steps=20,
        train_reps=2,
        warmup=0,
        amp_steps=10,
        compile_steps=10,
        ps_width=4,
        ps_batch=16,
        gpt=(16, 8, 2, 1, 8, 2),
        gpt_big=(16, 16, 2, 1, 8, 1),
        probe_gpt=(32, 16, 2, 2, 16, 2),
        probe_rounds=3,
    ),
}


@dataclass
class Config:
    device: torch.device
    sizes: Sizes
    preset: str
    budget: float  # seconds for the whole script
    compile_backend: str
    seed: int = 0
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = START + self.budget

    def left(self) -> float:
        return self.deadline - time.perf_counter()


# -- models and data ---------------------------------------------------------------------


class GlobalMean(nn.Module):
    """``[B, C, H, W] -> [B, C]``: mean over space (adaptive pooling's CUDA backward is
    nondeterministic, the mean's is not)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def conv_net(width: int, classes: int = 10) -> nn.Module:
    """Four 3x3 convolutions with BatchNorm and ReLU (two of stride 2), a linear head."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
        nn.BatchNorm2d(4 * w),
        nn.ReLU(),
        GlobalMean(),
        nn.Linear(4 * w, classes),
    )


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, 10),
    )


class Block(nn.Module):
    """Pre-norm causal self-attention and a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: Tensor) -> Tensor:  # [B, T, d]
        b, t, d = h.shape
        qkv = self.qkv(self.ln1(h)).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d/H]
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d/H]
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class TinyGPT(nn.Module):
    """A GPT-style language model: ``[B, T]`` tokens -> ``[B, T, vocab]`` logits
    (``tied``: the output layer shares the token embedding's weight, as GPT-2's)."""

    def __init__(
        self, vocab: int, d: int, heads: int, layers: int, seq: int, tied: bool = False
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tok(idx) + self.pos[: idx.shape[1]]  # [B, T, d]
        return self.head(self.norm(self.blocks(h)))


def token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def images(n: int, side: int, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, side, side, generator=gen)
    return x.to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- measuring ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - begin)
    return float(np.median(seconds))


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before, in MiB."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def rel_err(out: Tensor, ref: Tensor) -> float:
    """Largest column-wise ``‖out − ref‖ / ‖ref‖`` of ``[P, k]`` (or ``[P]``) tensors."""
    out, ref = out.double().reshape(ref.shape[0], -1), ref.double().reshape(ref.shape[0], -1)
    return float(((out - ref).norm(dim=0) / ref.norm(dim=0)).max())


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest ``|a − b|`` over every floating tensor of two state dicts."""
    diffs = [(a[k].double() - b[k].double()).abs().max() for k in a if a[k].is_floating_point()]
    return float(torch.stack(diffs).max())


def identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def attempt(fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"error": text}`` when it raises (the run goes on)."""
    try:
        return fn()
    except Exception as err:
        log(f"  error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        return {"error": f"{type(err).__name__}: {err}"[:2000]}


@contextlib.contextmanager
def recorded_warnings(into: list[str]) -> Iterator[None]:
    """Collect the distinct warning messages raised in the block into ``into``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, DeprecationWarning):  # torch's own, not ours
                    continue
                text = f"{w.category.__name__}: {' '.join(str(w.message).split())[:400]}"
                if text not in into:
                    into.append(text)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic algorithms for the block (``CUBLAS_WORKSPACE_CONFIG`` is set in main)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def without_tf32() -> contextlib.AbstractContextManager:
    """Full float32 matrix products and convolutions on CUDA for the block (trainprobe's
    own scope; it only sets the two TF32 flags, so it needs no GPU to be entered)."""
    return full_float32(torch.device("cuda"))


# -- 1. environment ----------------------------------------------------------------------


def section_environment(cfg: Config) -> dict:
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "trainprobe": trainprobe.__version__,
        "device": str(cfg.device),
        "preset": cfg.preset,
        "cpu_threads": torch.get_num_threads(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        out["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    if cfg.device.type == "cuda":
        props = torch.cuda.get_device_properties(cfg.device)
        free, total = torch.cuda.mem_get_info(cfg.device)
        out |= {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30,
            "free_gib": free / 2**30,
            "total_gib": total / 2**30,
        }
        torch.ones(1, device=cfg.device).matmul(torch.ones(1, 1, device=cfg.device))  # init
    else:
        out["name"] = platform.processor() or platform.machine()
    log(f"  {out.get('name')}, torch {out['torch']}, CUDA {out['cuda']}")
    return out


# -- 2. HVP accuracy ---------------------------------------------------------------------


def dense_hessian(model: nn.Module, batch: tuple[Tensor, Tensor], how: str) -> Tensor:
    """The ``[P, P]`` Hessian of the mean cross-entropy in eval semantics, parameters flattened
    in ``named_parameters`` order: ``"fwdrev"`` is ``torch.func.hessian``, ``"revrev"``
    is ``jacrev(jacrev)``."""
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # [P]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    x, y = batch

    def loss(w: Tensor) -> Tensor:
        parts = torch.split(w, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)

    return (hessian(loss) if how == "fwdrev" else jacrev(jacrev(loss)))(flat)


def engine_errors(
    model: nn.Module, batch: Any, engine: str, vs: Tensor, ref: Tensor, flat: Tensor, norm: float
) -> dict:
    """Relative errors of one engine's ``matvec`` and ``matmat`` against ``ref = H vs``,
    and the largest ``‖Hv − ref‖ / (‖H‖₂ ‖v‖)`` of the ``matmat`` (``norm = ‖H‖₂``): the
    scale the fd engine's own estimate is taken against."""
    op = hessian_operator(model, CE, batch=batch, engine=engine)
    if op.dim != vs.shape[0] or not torch.equal(op.point.double(), flat.to(op.point.device)):
        raise ValueError("the operator's parameter vector is not named_parameters order")
    row: dict[str, Any] = {"engine": op.engine}
    row["matvec"] = attempt(lambda: rel_err(op.matvec(vs[:, 0].to(op.dtype)), ref[:, 0]))
    products = attempt(lambda: op.matmat(vs.to(op.dtype)).double())
    row["matmat"] = products if isinstance(products, dict) else rel_err(products, ref)
    if not isinstance(products, dict):
        row["vs_norm"] = float(((products - ref).norm(dim=0) / (norm * vs.norm(dim=0))).max())
    numbers = [v for v in (row["matvec"], row["matmat"]) if isinstance(v, float)]
    row["max_rel_err"] = max(numbers) if numbers else None
    row["fd_error"] = op.fd_error  # the engine's own estimate (fd only)
    if not numbers and isinstance(row["matvec"], dict):
        row["error"] = row["matvec"]["error"]
    return row


def hvp_case(model32: nn.Module, batch32: tuple[Tensor, Tensor], cfg: Config) -> dict:
    model64 = copy.deepcopy(model32).double()
    batch64 = (batch32[0].double(), batch32[1])
    begin = time.perf_counter()
    dense = dense_hessian(model64, batch64, "fwdrev")  # [P, P]
    sync(cfg.device)
    p = dense.shape[0]
    out: dict[str, Any] = {
        "params": p,
        "dense_seconds": time.perf_counter() - begin,
        "reference_asymmetry": float((dense - dense.T).norm() / dense.norm()),
        "reference_fwdrev_vs_revrev": attempt(
            lambda: float((dense - dense_hessian(model64, batch64, "revrev")).norm() / dense.norm())
        ),
    }
    gen = torch.Generator().manual_seed(cfg.seed)
    vs = torch.randn(p, 4, generator=gen, dtype=torch.float64).to(cfg.device)  # [P, 4]
    ref = dense @ vs  # [P, 4]
    norm = float(torch.linalg.eigvalsh(dense).abs().max())  # ‖H‖₂
    flat = torch.cat([q.detach().reshape(-1) for q in model64.parameters()])  # [P]
    variants = [("float64", model64, batch64), ("float32", model32, batch32)]
    if cfg.device.type == "cuda":
        variants.append(("float32_no_tf32", model32, batch32))
    for label, model, batch in variants:
        for engine in ENGINES:
            with without_tf32() if label.endswith("no_tf32") else contextlib.nullcontext():
                row = attempt(lambda: engine_errors(model, batch, engine, vs, ref, flat, norm))  # noqa: B023
            out[f"{label}/{engine}"] = row
            log(f"    {label:<16} {engine:<10} max rel err {row.get('max_rel_err')}")
    return out


def section_hvp_accuracy(cfg: Config) -> dict:
    s, dev = cfg.sizes, cfg.device
    torch.manual_seed(cfg.seed)
    net = mlp(s.hvp_hidden).to(dev)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(s.hvp_batch, 20, generator=gen)
    batch = (x.to(dev), torch.randint(0, 10, (s.hvp_batch,), generator=gen).to(dev))
    out: dict[str, Any] = {"warnings": []}
    with recorded_warnings(out["warnings"]):
        log("  mlp")
        out["mlp"] = attempt(lambda: hvp_case(net, batch, cfg))
        cnn = conv_net(s.hvp_cnn_width).to(dev)
        with torch.no_grad():  # non-trivial running statistics for eval semantics
            for m in cnn.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        log("  cnn with BatchNorm (eval semantics)")
        out["cnn_bn_eval"] = attempt(
            lambda: hvp_case(cnn, images(s.hvp_batch, s.hvp_image, dev, 2), cfg)
        )
    return out


# -- 3. Lanczos on a mid-size transformer ------------------------------------------------


def plain_gradient(model: nn.Module, loss_fn: Callable, batch: Any) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()


def lanczos_run(op: Any, cfg: Config, **tols: float) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    sync(cfg.device)
    begin = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "not converged" is in the result
        pairs = lanczos(op, op.dim, top=5, generator=gen, **tols)
    sync(cfg.device)
    return {
        "values": pairs.values.tolist(),
        "hvps": pairs.matvecs,
        "converged": pairs.converged,
        "wall_s": time.perf_counter() - begin,
        "tolerances": tols,
    }


def engine_row(
    model: nn.Module, loss_fn: Callable, batch: Any, engine: str, cfg: Config, grad_s: float
) -> dict:
    dev, reps = cfg.device, cfg.sizes.reps
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    sync(dev)
    begin = time.perf_counter()
    op = hessian_operator(model, loss_fn, batch=batch, engine=engine)
    sync(dev)
    row: dict[str, Any] = {"engine": op.engine, "build_s": time.perf_counter() - begin}
    row["build_per_grad"] = row["build_s"] / grad_s
    if dev.type == "cuda":
        row["build_mib"] = (torch.cuda.memory_allocated(dev) - before) / 2**20
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    v = torch.randn(op.dim, generator=gen).to(dev)
    vs = torch.randn(op.dim, 4, generator=gen).to(dev)  # [P, 4]
    row["hvp_ms"] = timed(lambda: op.matvec(v), dev, reps=reps, warmup=2) * 1e3
    row["hvp_per_grad"] = row["hvp_ms"] / 1e3 / grad_s
    row["matmat4_per_hvp_ms"] = timed(lambda: op.matmat(vs), dev, reps=max(reps // 4, 1)) * 250
    row["hvp_peak_mib"] = peak_mib(lambda: op.matvec(v), dev)
    row |= lanczos_run(op, cfg, tol=1e-4)
    row["fd_error"] = op.fd_error  # the engine's own estimate (fd only)
    return row


def section_lanczos(cfg: Config) -> dict:
    dev, (vocab, d, heads, layers, seq, bsz) = cfg.device, cfg.sizes.lm
    torch.manual_seed(cfg.seed)
    model = TinyGPT(vocab, d, heads, layers, seq).to(dev).eval()
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=gen).to(dev)
    batch = (tokens[:, :-1], tokens[:, 1:])  # next-token prediction
    loss_fn = criterion_loss(token_ce)
    out: dict[str, Any] = {
        "params": count(model),
        "batch": bsz,
        "seq": seq,
        "d_model": d,
        "layers": layers,
        "warnings": [],
    }
    grad = lambda: plain_gradient(model, loss_fn, batch)  # noqa: E731
    out["grad_ms"] = timed(grad, dev, reps=cfg.sizes.reps, warmup=2) * 1e3
    with sdpa_kernel(SDPBackend.MATH):
        out["grad_math_attention_ms"] = timed(grad, dev, reps=cfg.sizes.reps) * 1e3
    model.zero_grad(set_to_none=True)
    out["grad_peak_mib"] = peak_mib(grad, dev)
    model.zero_grad(set_to_none=True)
    log(f"  {out['params']:,} parameters, gradient {out['grad_ms']:.2f} ms")
    with recorded_warnings(out["warnings"]):
        for engine in ENGINES:
            if cfg.left() < 60:
                out[engine] = {"skipped": "time budget spent"}
                continue
            grad_s = out["grad_ms"] / 1e3
            row = attempt(lambda: engine_row(model, loss_fn, batch, engine, cfg, grad_s))  # noqa: B023
            out[engine] = row
            log(f"  {engine}: {_brief(row, 'hvp_per_grad', 'hvps', 'wall_s')}")
            _free(dev)
        out["reference"] = (
            attempt(lambda: _reference(model, loss_fn, batch, cfg))
            if cfg.left() > 45
            else {"skipped": "time budget spent"}
        )
        _free(dev)
    ref = out["reference"].get("values")
    for engine in ENGINES:
        if ref is not None and "values" in out[engine]:
            diff = [abs(a - b) / abs(b) for a, b in zip(out[engine]["values"], ref, strict=True)]
            out[engine]["rel_diff_to_reference"] = max(diff)
    return out


def _reference(model: nn.Module, loss_fn: Callable, batch: Any, cfg: Config) -> dict:
    """The same Lanczos in float64 to tight tolerances (graph engine); float32 if that fails."""
    try:
        op = hessian_operator(model, loss_fn, batch=batch, engine="graph", dtype=torch.float64)
        row = {"dtype": "float64"} | lanczos_run(op, cfg, tol=1e-8, value_tol=1e-10)
    except Exception as err:  # fall back, and say why
        log(f"  float64 reference failed ({type(err).__name__}); float32 at tol 1e-6")
        _free(cfg.device)
        op = hessian_operator(model, loss_fn, batch=batch, engine="graph")
        row = {"dtype": "float32", "float64_error": f"{type(err).__name__}: {err}"[:2000]}
        row |= lanczos_run(op, cfg, tol=1e-6)
    log(f"  reference ({row['dtype']}): {row['hvps']} HVPs, {row['wall_s']:.2f} s")
    return row


def _brief(row: dict, *keys: str) -> str:
    if "error" in row:
        return "error"
    return ", ".join(f"{k} {row[k]:.3g}" for k in keys if isinstance(row.get(k), int | float))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- training loops (sections 4-6) -------------------------------------------------------


@dataclass
class Trainer:
    """One configuration's model, optimizer, monitor, step counter and block times."""

    name: str
    model: nn.Module
    forward: Callable[[Tensor], Tensor]
    opt: torch.optim.Optimizer
    mon: trainprobe.Monitor | None
    run_dir: Path | None
    amp: str | None = None  # None, "forward" or "step"
    step: int = 0
    seconds: list[float] = field(default_factory=list)

    def run(self, batches: list, steps: int, device: torch.device) -> float:
        """Train ``steps`` steps; returns the wall time (device synchronised)."""
        sync(device)
        begin = time.perf_counter()
        for _ in range(steps):
            self.one_step(batches[self.step % len(batches)], device)
            self.step += 1
        sync(device)
        return time.perf_counter() - begin

    def one_step(self, batch: tuple[Tensor, Tensor], device: torch.device) -> None:
        x, y = batch
        null = contextlib.nullcontext()
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if self.amp else null
        outer, inner = (amp, null) if self.amp == "step" else (null, amp)
        watched = self.mon.step(self.step, batch=batch) if self.mon else contextlib.nullcontext()
        with outer, watched as s:
            with inner:
                loss = F.cross_entropy(self.forward(x), y)
            loss.backward()
            if s is not None:
                s.log(loss=loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def make_trainer(
    name: str,
    init: dict,
    cfg: Config,
    stack: contextlib.ExitStack,
    root: Path,
    probes: list | None,
    *,
    opt: str = "adamw",
    amp: str | None = None,
    compiled: bool = False,
) -> Trainer:
    model = conv_net(cfg.sizes.cnn_width).to(cfg.device)
    model.load_state_dict(init)  # the same initial weights in every configuration
    model.train()
    forward = torch.compile(model, backend=cfg.compile_backend) if compiled else model
    if opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    mon, run_dir = None, None
    if probes is not None:
        run_dir = root / name
        mon = stack.enter_context(
            trainprobe.watch(forward, probes, run_dir=run_dir, optimizer=optimizer, loss_fn=CE)
        )
    return Trainer(name, model, forward, optimizer, mon, run_dir, amp)


def setup(cfg: Config, seed_offset: int) -> tuple[dict, list]:
    s = cfg.sizes
    torch.manual_seed(cfg.seed)
    init = {k: v.to(cfg.device) for k, v in conv_net(s.cnn_width).state_dict().items()}
    batches = [
        images(s.cnn_batch, s.cnn_image, cfg.device, cfg.seed + seed_offset + i) for i in range(8)
    ]
    return init, batches


def recorded_keys(trainer: Trainer) -> dict:
    """What the watched run stored: the number of keys and the probes' key families."""
    if trainer.run_dir is None:
        return {}
    with trainprobe.Run(trainer.run_dir) as run:
        keys = run.keys()
    return {"keys": len(keys), "families": sorted({k.split("/")[0] for k in keys})}


def state(trainer: Trainer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# -- 4. monitor overhead and non-interference ---------------------------------------------

MONITOR_CONFIGS: dict[str, Callable[[], list] | None] = {
    "unwatched": None,
    "unwatched_again": None,
    "default_every_1": lambda: default_probes(every_n=1),
    "default_every_10": lambda: default_probes(every_n=10),
    "sharpness_every_20": lambda: [Sharpness(schedule=every(20))],
}


def section_monitor(cfg: Config) -> dict:
    s = cfg.sizes
    init, batches = setup(cfg, 10)
    out: dict[str, Any] = {
        "params": count(conv_net(s.cnn_width)),
        "batch": s.cnn_batch,
        "image": s.cnn_image,
        "optimizer": "AdamW(lr=1e-3)",
        "deterministic": True,
        "warnings": [],
    }
    order = list(MONITOR_CONFIGS)
    shuffler = random.Random(cfg.seed)
    stop_at = time.perf_counter() + min(90.0, max(cfg.left() - 100.0, 10.0))
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.ExitStack() as stack,
        deterministic(),
        recorded_warnings(out["warnings"]),
    ):
        trainers = {
            name: make_trainer(name, init, cfg, stack, Path(tmp), make and make())
            for name, make in MONITOR_CONFIGS.items()
        }
        for t in trainers.values():  # warm-up, not timed
            t.run(batches, s.warmup, cfg.device)
        for rep in range(s.train_reps):
            if rep >= 2 and time.perf_counter() > stop_at:
                break
            shuffler.shuffle(order)
            for name in order:
                gc.collect()
                trainers[name].seconds.append(
                    trainers[name].run(batches, s.train_steps, cfg.device) / s.train_steps
                )
        if cfg.device.type == "cuda":  # every trainer, so that the finals stay comparable
            out["syncs"] = attempt(lambda: count_syncs(trainers, batches, cfg.device))
        stack.close()  # flush and close the monitors inside the temporary directory
        finals = {name: state(t) for name, t in trainers.items()}
        out["reps_done"] = len(trainers["unwatched"].seconds)
        out["steps_each"] = trainers["unwatched"].step
        out["rows"] = _monitor_rows(trainers, finals)
    out["unwatched_runs_identical"] = identical(finals["unwatched"], finals["unwatched_again"])
    out["watched_identical"] = all(r["identical"] for r in out["rows"].values())
    return out


SYNC_STEPS = 20


def count_syncs(trainers: dict[str, Trainer], batches: list, device: torch.device) -> dict:
    """Host-device synchronisations per step of each trainer over ``SYNC_STEPS`` steps
    (``torch.cuda.set_sync_debug_mode``), with the five commonest places they come from."""
    out = {}
    for name, trainer in trainers.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.run(batches, SYNC_STEPS, device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        where: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message):
                place = f"{Path(w.filename).name}:{w.lineno}"
                where[place] = where.get(place, 0) + 1
        top = dict(sorted(where.items(), key=lambda kv: -kv[1])[:5])
        out[name] = {"per_step": sum(where.values()) / SYNC_STEPS, "where": top}
    return out


def _monitor_rows(trainers: dict[str, Trainer], finals: dict) -> dict:
    base = np.median(trainers["unwatched"].seconds)
    rows = {}
    for name, t in trainers.items():
        ms = float(np.median(t.seconds) * 1e3)
        rows[name] = {
            "ms_per_step": ms,
            "min_ms": float(np.min(t.seconds) * 1e3),
            "max_ms": float(np.max(t.seconds) * 1e3),
            "ratio": ms / 1e3 / base,
            "overhead_ms": ms - base * 1e3,
            "identical": identical(finals["unwatched"], finals[name]),
            "max_abs_diff": max_abs_diff(finals["unwatched"], finals[name]),
        } | recorded_keys(t)
        log(
            f"  {name:<20} {ms:8.3f} ms/step  x{rows[name]['ratio']:.3f}  "
            f"identical {rows[name]['identical']}"
        )
    return rows


# -- 5. mixed precision ------------------------------------------------------------------


def amp_probes() -> list:
    return [
        *default_probes(every_n=1),
        GradNoise(schedule=every(10)),
        GradConflict(by="class", schedule=every(10)),
    ]


def section_mixed_precision(cfg: Config) -> dict:
    s = cfg.sizes
    init, batches = setup(cfg, 20)
    out: dict[str, Any] = {
        "dtype": "bfloat16",
        "steps": s.amp_steps,
        "optimizer": "AdamW(lr=1e-3)",
        "probes": "default_probes(every_n=1) + GradNoise + GradConflict (every 10)",
        "warnings": [],
    }
    with deterministic(), recorded_warnings(out["warnings"]):
        for amp in ("forward", "step"):
            out[f"autocast_{amp}"] = attempt(lambda: _amp_pair(cfg, init, batches, amp))  # noqa: B023
    return out


def _amp_pair(cfg: Config, init: dict, batches: list, amp: str) -> dict:
    finals, row = {}, {"warnings": []}
    for name, probes in (("unwatched", None), ("watched", amp_probes())):
        with tempfile.TemporaryDirectory() as tmp, recorded_warnings(row["warnings"]):
            with contextlib.ExitStack() as stack:  # the monitor is closed (flushed) after it
                t = make_trainer(name, init, cfg, stack, Path(tmp), probes, amp=amp)
                row[f"{name}_s"] = t.run(batches, cfg.sizes.amp_steps, cfg.device)
            finals[name] = state(t)
            row |= {f"{name}_{k}": v for k, v in recorded_keys(t).items()}
    row["probes_recorded"] = {p.name for p in amp_probes()} <= set(row["watched_families"])
    row["identical"] = identical(finals["unwatched"], finals["watched"])
    row["max_abs_diff"] = max_abs_diff(finals["unwatched"], finals["watched"])
    log(
        f"  autocast around the {amp}: identical {row['identical']}, "
        f"max |dw| {row['max_abs_diff']:.3g}"
    )
    return row


# -- 6. torch.compile --------------------------------------------------------------------

#: run name -> (compiled?, probes or None); run in this order, in one process.
COMPILE_RUNS: dict[str, tuple[bool, Callable[[], list] | None]] = {
    "eager": (False, None),
    "compiled": (True, None),
    "compiled_again": (True, None),
    "grad_noise": (True, lambda: [GradNoise(schedule=every(10))]),
    "sharpness": (True, lambda: [Sharpness(schedule=every(10))]),
    "compiled_after_probes": (True, None),
}


def section_compile(cfg: Config) -> dict:
    if not hasattr(torch, "compile"):
        return {"skipped": "torch.compile is not available in this torch"}
    init, batches = setup(cfg, 30)
    out: dict[str, Any] = {
        "backend": cfg.compile_backend,
        "steps": cfg.sizes.compile_steps,
        "optimizer": "SGD(lr=0.01)",
        "deterministic": True,
        "warnings": [],
    }
    finals = {}
    with deterministic(), recorded_warnings(out["warnings"]):
        for name, (compiled, make) in COMPILE_RUNS.items():
            if cfg.left() < (40 if compiled else 5):  # a compile warm-up may take 30 s
                out[name] = {"skipped": "time budget spent"}
                continue
            row = attempt(lambda: _compiled_run(cfg, init, batches, name, compiled, make))  # noqa: B023
            if "state" in row:
                finals[name] = row.pop("state")
            out[name] = row
    for name, final in finals.items():
        row = out[name]
        if "compiled" in finals:
            row["identical"] = identical(finals["compiled"], final)
            row["max_abs_diff"] = max_abs_diff(finals["compiled"], final)
        if "eager" in finals:
            row["identical_to_eager"] = identical(finals["eager"], final)
            row["max_abs_diff_to_eager"] = max_abs_diff(finals["eager"], final)
        log(
            f"  {name:<22} same as 1st compiled run {row.get('identical')}, "
            f"max |dw| {row.get('max_abs_diff', math.nan):.3g}; same as eager "
            f"{row.get('identical_to_eager')}"
        )
    return out


def _compiled_run(
    cfg: Config,
    init: dict,
    batches: list,
    name: str,
    compiled: bool,
    make: Callable[[], list] | None,
) -> dict:
    steps, probes, caught = cfg.sizes.compile_steps, make and make(), []
    with tempfile.TemporaryDirectory() as tmp, recorded_warnings(caught):
        with contextlib.ExitStack() as stack:  # the monitor is closed (flushed) after it
            t = make_trainer(
                name, init, cfg, stack, Path(tmp), probes, opt="sgd", compiled=compiled
            )
            first = t.run(batches, 1, cfg.device)  # compiles (or finds the compiled code)
            rest = t.run(batches, steps - 1, cfg.device)
        row = {
            "first_step_s": first,
            "ms_per_step_after": rest / (steps - 1) * 1e3,
            "state": state(t),
            "warnings": caught,
        } | recorded_keys(t)
    if probes:  # a probe that raised is disabled with a warning: did it record at all?
        row["probe_recorded"] = probes[0].name in row["families"]
    log(f"  {name}: first step {first:.2f} s, then {row['ms_per_step_after']:.2f} ms/step")
    return row


# -- 7. per-sample gradients -------------------------------------------------------------


def loop_reference(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``[B, P]`` one example's gradient per row, one backward each (eval semantics)."""
    was = model.training
    model.eval()
    params = list(model.parameters())
    x, y = batch
    try:
        rows = []
        for i in range(x.shape[0]):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)
    finally:
        model.train(was)


def section_per_sample(cfg: Config) -> dict:
    s, dev = cfg.sizes, cfg.device
    torch.manual_seed(cfg.seed)
    model = conv_net(s.ps_width).to(dev).train()
    batch = images(s.ps_batch, s.cnn_image, dev, cfg.seed + 40)
    out: dict[str, Any] = {"params": count(model), "batch": s.ps_batch, "warnings": []}
    with without_tf32():  # the measurement runs in full float32 (trainprobe turns TF32 off)
        ref = loop_reference(model, batch)  # [B, P]
    reps = max(s.reps // 3, 2)
    out["reference_loop_ms"] = timed(lambda: loop_reference(model, batch), dev, reps=reps) * 1e3

    def grad() -> None:
        with contextlib.ExitStack() as scope:
            scope.callback(model.train, model.training)
            model.eval()
            plain_gradient(model, CE, batch)

    out["grad_ms"] = timed(grad, dev, reps=s.reps, warmup=2) * 1e3
    model.zero_grad(set_to_none=True)
    with recorded_warnings(out["warnings"]):
        for method in METHODS:
            out[method] = attempt(lambda: _per_sample_row(model, batch, method, ref, cfg, reps))  # noqa: B023
            out[method]["ms_per_grad"] = out[method].get("ms", math.nan) / out["grad_ms"]
            log(f"  {method}: {_brief(out[method], 'ms', 'max_rel_err')}")
    return out


def _per_sample_row(
    model: nn.Module, batch: Any, method: str, ref: Tensor, cfg: Config, reps: int
) -> dict:
    result = per_sample_gradients(Objective(model, CE), batch, method=method)
    err = ((result.grads.double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1)).max()
    ms = (
        timed(
            lambda: per_sample_gradients(Objective(model, CE), batch, method=method),
            cfg.device,
            reps=reps,
        )
        * 1e3
    )
    return {
        "ms": ms,
        "max_rel_err": float(err),
        "ran": result.method,
        "chunk_size": result.chunk_size,
    }


# -- driver ------------------------------------------------------------------------------

# -- 8. FSDP2 (one rank) ------------------------------------------------------------------


def section_fsdp2(cfg: Config) -> dict:
    """A small GELU transformer ``fully_shard``'ed in a process group of one (NCCL on CUDA,
    gloo on the CPU) trains 4 AdamW steps watched by the default probes every step,
    ``HessianTop(top=2)`` and ``Sharpness`` every 2 steps (finite differences through the
    sharded model), and 4 steps unwatched from the same weights: bit-identical, and the
    step-0 eigenvalues against the exact ``graph`` engine on the unsharded model."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from trainprobe import HessianTop

    dev = cfg.device
    vocab, d, heads, layers, seq, bsz = 128, 64, 4, 2, 32, 32
    backend = "nccl" if dev.type == "cuda" else "gloo"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    out: dict[str, Any] = {"backend": backend, "warnings": []}
    try:
        torch.manual_seed(cfg.seed)
        base = TinyGPT(vocab, d, heads, layers, seq).to(dev)
        gen = torch.Generator().manual_seed(cfg.seed + 5)
        batches = []
        for _ in range(4):
            tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=gen).to(dev)
            batches.append((tokens[:, :-1], tokens[:, 1:]))
        loss_fn = criterion_loss(token_ce)
        exact = hessian_operator(base, loss_fn, batch=batches[0], engine="graph")
        out["exact_top2"] = lanczos(exact, exact.dim, top=2, tol=1e-8).values.tolist()
        out["params"] = exact.dim

        def sharded() -> nn.Module:
            model = copy.deepcopy(base)
            for block in model.blocks:
                fully_shard(block)
            return fully_shard(model)

        def train(model: nn.Module, probes: list | None, run_dir: Path | None) -> list[float]:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            mon = (
                trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt, loss_fn=loss_fn)
                if probes is not None
                else None
            )
            seconds = []
            with mon if mon is not None else contextlib.nullcontext():
                for step, batch in enumerate(batches):
                    sync(dev)
                    begin = time.perf_counter()
                    with mon.step(step, batch=batch) if mon else contextlib.nullcontext():
                        loss_fn(model, batch).backward()
                    sync(dev)
                    seconds.append(time.perf_counter() - begin)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            return seconds

        with tempfile.TemporaryDirectory() as tmp, recorded_warnings(out["warnings"]):
            watched, plain = sharded(), sharded()
            probes = [
                *default_probes(every_n=1),
                HessianTop(top=2, schedule=every(2), tol=1e-6),
                Sharpness(schedule=every(2), tol=1e-6),
            ]
            seconds = train(watched, probes, Path(tmp) / "run")
            train(plain, None, None)
            out["identical"] = all(
                torch.equal(a.to_local(), b.to_local())
                for a, b in zip(watched.parameters(), plain.parameters(), strict=True)
            )
            out["measured_step_s"] = seconds[0]
            with trainprobe.Run(Path(tmp) / "run") as run:
                out["fsdp_top2"] = [float(run.series(f"hessian/eig_{i}").values[0]) for i in (0, 1)]
                out["fd_error"] = float(run.series("hessian/fd_error").values[0])
                out["hvps"] = float(run.series("hessian/hvps").values[0])
                out["sharpness"] = run.series("sharpness/lambda_max").values.tolist()
                out["keys"] = len(run.keys())
                out["disabled"] = dict(run.meta.get("disabled_probes", {}))
        out["rel_diff"] = max(
            abs(a - b) / abs(b) for a, b in zip(out["fsdp_top2"], out["exact_top2"], strict=True)
        )
    finally:
        dist.destroy_process_group()
    return out


# -- 9. Krylov: batched products, warm starts and a ~1B-parameter top-5 ----------------

KRYLOV_S = 240.0
"""Seconds the ``krylov`` section may take: its parts stop early or are skipped beyond."""
KRYLOV_SHARES = {"products": (0.0, 0.15), "gpt": (0.1, 0.45), "gpt_big": (0.3, 1.0)}
"""Per part of the section, as shares of its budget: the least time left to start it, and
where it must end."""
K = 8  # columns of the batched product
TOL = 1e-3  # Lanczos residual tolerance, relative to max |θ|
ADAM_LR, ADAM_STEPS = 1e-4, 3  # the small AdamW steps before the warm and Adam's runs
BIG_TOP = 5
OFFLOAD_PROBE_BASIS = 10  # vectors of the offloaded basis whose streaming rate is measured
BIG_ENGINES = (("graph", True), ("jvp", False), ("fd", False))
"""At ~1B the first that builds and takes a product: (engine, bf16 autocast on CUDA).
Forward AD does not run under autocast ("expected m1 and m2 to have the same dtype"),
and finite differences of a bf16 forward are refused (estimated error 0.8): those two
take the float32 forward."""


def decoder(cfg: Config, shape: tuple[int, ...], seed: int) -> tuple[nn.Module, tuple]:
    """A tied-embedding ``TinyGPT`` made on the device (eval mode) and a batch of random
    next-token pairs ``([B, T], [B, T])``."""
    vocab, d, heads, layers, seq, bsz = shape
    torch.manual_seed(seed)
    with cfg.device:  # made in place: a 1B model is not built on the host first
        model = TinyGPT(vocab, d, heads, layers, seq, tied=True).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=gen).to(cfg.device)
    return model, (tokens[:, :-1], tokens[:, 1:])


def decoder_info(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """The row's description of a decoder: parameters, shape, sequence and batch."""
    vocab, d, heads, layers, seq, bsz = shape
    return {
        "params": count(model),
        "shape": {"vocab": vocab, "d_model": d, "heads": heads, "layers": layers},
        "seq": seq,
        "batch": bsz,
    }


def decoder_loss(device: torch.device, amp: bool = True) -> Callable[[nn.Module, Any], Tensor]:
    """Next-token cross-entropy, the forward under bf16 autocast on CUDA (``amp``) as in
    mixed-precision training: the operator's products differentiate that forward."""

    def loss(model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        on = amp and device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext():
            return token_ce(model(x), y)

    return loss


def randn(dim: int, cfg: Config, seed: int, k: int | None = None) -> Tensor:
    """``[dim]`` (or ``[dim, k]``) standard normal made on the device (a host-side 1B
    draw takes seconds)."""
    gen = torch.Generator(device=cfg.device).manual_seed(seed)
    shape = (dim,) if k is None else (dim, k)
    return torch.randn(shape, generator=gen, device=cfg.device)


class Preconditioned:
    """``P^{-1/2} (H + wd I) P^{-1/2}`` for a rule of ``trainprobe.probes.stability_rule``:
    the symmetric form of ``P⁻¹(H + wd I)``, whose ``λ_max`` the ``Sharpness`` probe
    records for Adam (its own wrapper is private; this one does the same products)."""

    def __init__(self, op: Any, rule: StabilityRule) -> None:
        if rule.preconditioner is None:
            raise ValueError(f"no preconditioner: {rule.note or 'not an Adam optimizer'}")
        self.op, self.dim, self.dtype, self.device = op, op.dim, op.dtype, op.device
        wd = rule.weight_decay
        self.wd = wd.to(op.device, op.dtype)[:, None] if isinstance(wd, Tensor) else wd
        self.scale = rule.preconditioner.to(op.device, op.dtype).rsqrt()[:, None]  # [P, 1]

    def matmat(self, vs: Tensor) -> Tensor:
        scaled = vs.to(self.dtype) * self.scale  # [P, k]
        return (self.op.matmat(scaled) + self.wd * scaled) * self.scale

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v.reshape(-1, 1)).reshape(-1)


def krylov_run(op: Any, cfg: Config, **kwargs: Any) -> tuple[dict, Any]:
    """``lanczos(op, op.dim, tol=TOL, refine=False, **kwargs)`` timed, with the peak CUDA
    memory it allocated above what was allocated before: the row and the pairs."""
    dev = cfg.device
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    begin = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "not converged" is in the row
        pairs = lanczos(
            op,
            op.dim,
            tol=TOL,
            refine=False,
            generator=torch.Generator().manual_seed(cfg.seed),
            **kwargs,
        )
    sync(dev)
    wall = time.perf_counter() - begin
    values = pairs.values
    row = {
        "values": values.tolist(),
        "hvps": pairs.matvecs,
        "wall_s": wall,
        "peak_mib": (torch.cuda.max_memory_allocated(dev) - before) / 2**20
        if dev.type == "cuda"
        else None,
        "converged": pairs.converged,
        # the residual test's quantity: ‖A y − θ y‖ / max |θ|
        "rel_residual": float(pairs.residuals.max() / values.abs().max()),
        "rel_error_estimate": float((pairs.errors / values.abs()).max()),
        "floor": pairs.floor,
        "storage": str(pairs.storage).removeprefix("torch."),
        "restarts": pairs.restarts,
        "max_iter": kwargs.get("max_iter"),
    }
    log(
        f"    {row['hvps']} HVPs, {wall:.2f} s, λ {values[0]:.5g}, storage {row['storage']}, "
        f"{row['restarts']} restarts"
    )
    return row, pairs


def steps_within(seconds: float, per_step: Callable[[int], float], least: int) -> int | None:
    """The most Lanczos steps (at most 100) whose estimated time ``per_step(steps)``
    (seconds for that many) fits ``seconds``; None when fewer than ``least`` do."""
    fit = max((s for s in range(1, 101) if 1.3 * per_step(s) <= seconds), default=0)
    return fit if fit >= least else None


def out_of_memory(fn: Callable[[], dict], device: torch.device) -> dict:
    """``fn()``; where CUDA memory runs out, ``{"skipped": "out of memory: ..."}`` after
    freeing what the failed call held (other errors as ``attempt``)."""
    try:
        return fn()
    except torch.OutOfMemoryError as err:
        text = f"out of memory: {str(err).splitlines()[0][:300]}"
    except Exception as err:
        log(f"  error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        return {"error": f"{type(err).__name__}: {err}"[:2000]}
    _free(device)  # outside the except block: its traceback held the failed call's tensors
    log(f"  {text}")
    return {"skipped": text}


def section_krylov(cfg: Config) -> dict:
    begin = time.perf_counter()
    budget = min(KRYLOV_S, cfg.left())
    until = {part: begin + end * budget for part, (_, end) in KRYLOV_SHARES.items()}
    out: dict[str, Any] = {"budget_s": budget, "tol": TOL, "warnings": []}
    with recorded_warnings(out["warnings"]):
        log("  batched products")
        out["products"] = attempt(lambda: _products(cfg, until["products"]))
        _free(cfg.device)
        for part, fn in (("gpt", _gpt), ("gpt_big", _gpt_big)):
            if until[part] - time.perf_counter() < KRYLOV_SHARES[part][0] * budget:
                out[part] = {"skipped": f"time budget spent ({budget:.0f} s for the section)"}
                continue
            log(f"  {part}")
            out[part] = out_of_memory(lambda: fn(cfg, until[part]), cfg.device)  # noqa: B023
            _free(cfg.device)
    return out


def _products(cfg: Config, until: float) -> dict:
    """One ``matmat`` of ``K`` columns against ``K`` ``matvec`` calls, per engine, on the
    ``lm`` transformer (float32)."""
    dev, (vocab, d, heads, layers, seq, bsz) = cfg.device, cfg.sizes.lm
    torch.manual_seed(cfg.seed)
    model = TinyGPT(vocab, d, heads, layers, seq).to(dev).eval()
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=gen).to(dev)
    batch = (tokens[:, :-1], tokens[:, 1:])
    out: dict[str, Any] = {"params": count(model), "batch": bsz, "seq": seq, "k": K}
    vs = randn(out["params"], cfg, cfg.seed + 9, K)  # [P, K]
    reps = max(cfg.sizes.reps // 2, 2)
    for engine in ENGINES:
        if time.perf_counter() > until:
            out[engine] = {"skipped": "time budget spent"}
            continue
        out[engine] = attempt(lambda: _product_row(model, batch, engine, vs, cfg, reps))  # noqa: B023
        log(f"    {engine}: {_brief(out[engine], 'matvecs_ms', 'matmat_ms', 'speedup')}")
        _free(dev)
    return out


def _product_row(
    model: nn.Module, batch: Any, engine: str, vs: Tensor, cfg: Config, reps: int
) -> dict:
    op = hessian_operator(model, criterion_loss(token_ce), batch=batch, engine=engine)
    cols = [vs[:, i].contiguous() for i in range(vs.shape[1])]
    one_by_one = timed(lambda: [op.matvec(c) for c in cols], cfg.device, reps=reps)
    batched = timed(lambda: op.matmat(vs), cfg.device, reps=reps)
    singles = torch.stack([op.matvec(c) for c in cols], 1)  # [P, K]
    return {
        "engine": op.engine,
        "matvecs_ms": one_by_one * 1e3,
        "matmat_ms": batched * 1e3,
        "speedup": one_by_one / batched,
        "max_rel_diff": rel_err(op.matmat(vs), singles),  # matmat's columns vs matvec's
        "fd_error": op.fd_error,
    }


def _gpt(cfg: Config, until: float) -> dict:
    """Top-1 Lanczos of the decoder cold, warm after one AdamW step, and of Adam's
    preconditioned Hessian after ``ADAM_STEPS``."""
    dev = cfg.device
    model, batch = decoder(cfg, cfg.sizes.gpt, cfg.seed + 11)
    loss_fn = decoder_loss(dev)
    out = decoder_info(model, cfg.sizes.gpt)
    out["autocast"] = "bfloat16" if dev.type == "cuda" else None
    op = hessian_operator(model, loss_fn, batch=batch)  # engine "auto"
    out["engine"] = op.engine
    v = randn(op.dim, cfg, cfg.seed + 12)
    hvp_s = timed(lambda: op.matvec(v), dev, reps=2)
    out["hvp_ms"] = hvp_s * 1e3
    log(f"    {out['params']:,} parameters, engine {op.engine}, HVP {out['hvp_ms']:.1f} ms")

    def budgeted(runs_left: int, least: int) -> int | None:
        seconds = (until - time.perf_counter()) / runs_left
        return steps_within(seconds, lambda s: s * hvp_s, least)

    steps = budgeted(3, 20)
    if steps is None:
        return out | {"cold": {"skipped": "time budget spent"}}
    out["cold"], pairs = krylov_run(op, cfg, top=1, max_iter=steps)
    start = pairs.vectors
    if pairs.guard_vectors is not None:
        start = torch.cat([pairs.vectors, pairs.guard_vectors], 1)  # [P, 2]
    del pairs
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM_LR)
    adam_steps(model, loss_fn, batch, opt, 1)
    op = None
    _free(dev)
    steps = budgeted(2, 5)
    if steps is None:
        out["warm"] = {"skipped": "time budget spent"}
    else:
        op = hessian_operator(model, loss_fn, batch=batch)
        out["warm"] = attempt(lambda: krylov_run(op, cfg, top=1, start=start, max_iter=steps)[0])
        if "values" in out["warm"]:
            out["warm"]["lambda_moved"] = abs(
                out["warm"]["values"][0] / out["cold"]["values"][0] - 1
            )
    start = None
    adam_steps(model, loss_fn, batch, opt, ADAM_STEPS - 1)
    op = None
    _free(dev)
    steps = budgeted(1, 20)
    if steps is None:
        out["preconditioned"] = {"skipped": "time budget spent"}
        return out
    out["preconditioned"] = attempt(lambda: _adam_sharpness(model, loss_fn, batch, opt, cfg, steps))
    return out


def adam_steps(
    model: nn.Module, loss_fn: Callable, batch: Any, opt: torch.optim.Optimizer, n: int
) -> None:
    for _ in range(n):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _adam_sharpness(
    model: nn.Module,
    loss_fn: Callable,
    batch: Any,
    opt: torch.optim.Optimizer,
    cfg: Config,
    steps: int,
) -> dict:
    """``λ_max(P⁻¹H)`` of Adam's preconditioner ``P`` as ``stability_rule`` reads it."""
    op = hessian_operator(model, loss_fn, batch=batch)
    params = dict(model.named_parameters())
    rule = stability_rule(opt, {n: params[n] for n in op.layout.names}, op.layout.flatten)
    row, _ = krylov_run(Preconditioned(op, rule), cfg, top=1, max_iter=steps)
    row |= {"adamw_steps": ADAM_STEPS, "lr": rule.lr, "threshold": rule.threshold}
    if rule.threshold:
        row["ratio"] = row["values"][0] / rule.threshold
    return row


def _gpt_big(cfg: Config, until: float) -> dict:
    """Top-5 Lanczos of the ~1B decoder with the basis in float32, bfloat16 and offloaded."""
    dev = cfg.device
    model, batch = decoder(cfg, cfg.sizes.gpt_big, cfg.seed + 13)
    out = decoder_info(model, cfg.sizes.gpt_big)
    out["top"] = BIG_TOP
    log(f"    {out['params']:,} parameters")
    op, hvp_s, hvp_bytes = _big_operator(model, batch, cfg, out)
    dim = op.dim
    # each run draws its start vector on the host (a CPU generator): measured, scaled
    begin = time.perf_counter()
    torch.randn(min(dim, 1 << 24), generator=torch.Generator().manual_seed(0))
    start_s = (time.perf_counter() - begin) * dim / min(dim, 1 << 24)
    out["start_vector_s"] = start_s
    _free(dev)
    ritz = dim * (BIG_TOP + 1) * 4  # the Ritz vectors returned (wanted and guard), float32
    room = _room(dev) - ritz - hvp_bytes
    if dev.type == "cuda":
        room -= 2 * 2**30 + torch.cuda.get_device_properties(dev).total_memory // 20  # margin
    out["room_gib"] = room / 2**30  # what max_memory is given: free, less the above
    host = _host_free()
    out["host_free_gib"] = None if host is None else host / 2**30
    host_basis = 100 if host is None else int(0.5 * host // (dim * 4))  # offloaded, float32
    variants = {
        "float32": {"storage": torch.float32, "max_memory": room},
        "bfloat16": {"storage": torch.bfloat16, "max_memory": room},
        "offloaded": {"offload": True, "max_memory": room, "max_basis": min(host_basis, 100)},
    }
    for i, (name, kwargs) in enumerate(variants.items()):
        seconds = (until - time.perf_counter()) / (len(variants) - i)
        if name == "offloaded":
            out["offload_rate"] = attempt(lambda: offload_rate(min(dim, 1 << 26), cfg))
            rate = out["offload_rate"].get("bytes_per_s")
            basis = kwargs["max_basis"]
            if rate is None or basis < BIG_TOP + 5:
                why = "no streaming rate measured" if rate is None else "host memory"
                out[name] = {"skipped": f"{why}: {basis} vectors fit in half the free host memory"}
                continue
            # what the probe paid once, scaled to this basis (allocation ∝ its bytes)
            fixed = out["offload_rate"]["fixed_s"] * dim / out["offload_rate"]["dim"]
            fixed *= max(1.0, basis / OFFLOAD_PROBE_BASIS)
            per_step = lambda s: (  # noqa: E731
                start_s + fixed + s * hvp_s + offload_seconds(s, basis, dim, rate)  # noqa: B023
            )
        else:
            least = basis_bytes(dim, BIG_TOP + 5, kwargs["storage"])  # lanczos's own least
            if least > room:
                out[name] = {
                    "skipped": f"device memory: {room / 2**30:.1f} GiB left for the basis, "
                    f"{BIG_TOP + 5} vectors in {kwargs['storage']} need {least / 2**30:.1f}"
                }
                log(f"    {name}: {out[name]['skipped']}")
                continue
            per_step = lambda s: start_s + s * hvp_s  # noqa: E731
        steps = steps_within(seconds, per_step, 40 if name == "offloaded" else 20)
        if steps is None:
            estimate = per_step(40)
            out[name] = {
                "skipped": f"time budget: 40 steps estimated at {estimate:.0f} s, "
                f"{seconds:.0f} s left for it"
            }
            log(f"    {name}: {out[name]['skipped']}")
            continue
        log(f"    basis {name}")
        row = out_of_memory(
            lambda: krylov_run(op, cfg, top=BIG_TOP, max_iter=steps, **kwargs)[0],  # noqa: B023
            dev,
        )
        row |= {"max_memory_gib": room / 2**30}
        if "storage" in kwargs:
            b = kwargs["storage"].itemsize
            vectors = min(steps, max(0, (room // dim - 12) // b))
            row["basis_vectors"] = vectors
            row["basis_gib"] = basis_bytes(dim, vectors, kwargs["storage"]) / 2**30
        else:
            row["basis_vectors"] = min(steps, kwargs["max_basis"])
            row["host_gib"] = row["basis_vectors"] * dim * 4 / 2**30
        out[name] = row
        _free(dev)
    ref = out["float32"].get("values")
    for name in ("bfloat16", "offloaded"):
        values = out[name].get("values")
        if ref is not None and values is not None:
            diffs = [abs(a - b) / abs(b) for a, b in zip(values, ref, strict=True)]
            out[name]["rel_diff_to_float32"] = max(diffs)
    return out


def _big_operator(model: nn.Module, batch: Any, cfg: Config, out: dict) -> tuple[Any, float, int]:
    """The first of ``BIG_ENGINES`` that builds and takes a product: the operator, the
    seconds of one product and the bytes it allocated at its peak (recorded in ``out``)."""
    dev, tried = cfg.device, {}
    out["engines_tried"] = tried
    for engine, amp in BIG_ENGINES:
        op = v = None
        try:
            loss_fn = decoder_loss(dev, amp)
            op = hessian_operator(model, loss_fn, batch=batch, engine=engine)
            v = randn(op.dim, cfg, cfg.seed + 14)
            seconds = timed(lambda: op.matvec(v), dev, reps=1)  # noqa: B023
            peak = peak_mib(lambda: op.matvec(v), dev) or 0.0  # noqa: B023
        except Exception as err:  # out of memory, or the engine cannot run this forward
            tried[engine] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        else:
            out |= {
                "engine": op.engine,
                "autocast": "bfloat16" if amp and dev.type == "cuda" else None,
                "hvp_ms": seconds * 1e3,
                "hvp_peak_mib": peak if dev.type == "cuda" else None,
            }
            if dev.type == "cuda":
                out["operator_gib"] = torch.cuda.memory_allocated(dev) / 2**30
            tried[engine] = "used"
            log(f"    engine {op.engine}: HVP {seconds * 1e3:.0f} ms, peak {peak:.0f} MiB")
            return op, seconds, int(peak * 2**20)
        op = v = None
        _free(dev)
        log(f"    engine {engine}: {tried[engine]}")
    raise RuntimeError(f"no engine took a product: {tried}")


def _room(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory and what the caching
    allocator holds unused; on the CPU the free host memory (or 2**40)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    host = _host_free()
    return 2**40 if host is None else host


def _host_free() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


def offload_seconds(steps: int, vectors: int, dim: int, rate: float) -> float:
    """Estimated seconds an offloaded float32 basis of at most ``vectors`` streams in
    ``steps`` steps at ``rate`` bytes/s: each step projects onto the basis and subtracts
    (two passes over it), the pinned allocation and the Ritz vectors one more."""
    passes = sum(2 * min(j, vectors) for j in range(1, steps + 1)) + vectors
    return passes * dim * 4 / rate


def offload_rate(dim: int, cfg: Config) -> dict:
    """The bytes per second an offloaded basis streams at: ``lanczos(offload=True)`` over
    a diagonal operator of ``dim`` (its products are negligible) stopped after 2 and after
    8 steps, the difference in time against the difference in passes over the basis
    (``offload_seconds``), so that what every run pays once (the pinned allocation, the
    start vector, the Ritz vectors) cancels; that is ``fixed_s``."""
    diag = torch.linspace(1.0, 2.0, dim, device=cfg.device)
    walls, passes = [], []
    for steps in (2, 8):
        sync(cfg.device)
        begin = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # stopped early on purpose
            pairs = lanczos(
                lambda v: v * diag,
                dim,
                top=1,
                tol=1e-12,
                max_iter=steps,
                offload=True,
                max_basis=OFFLOAD_PROBE_BASIS,
                dtype=torch.float32,
                device=cfg.device,
                refine=False,
                generator=torch.Generator().manual_seed(cfg.seed),
            )
        sync(cfg.device)
        walls.append(time.perf_counter() - begin)
        basis = min(OFFLOAD_PROBE_BASIS, steps)  # what it allocated
        passes.append(offload_seconds(pairs.matvecs, basis, dim, 1.0))
        del pairs
    rate = (passes[1] - passes[0]) / max(walls[1] - walls[0], 1e-9)
    fixed = max(walls[0] - passes[0] / rate, 0.0)
    log(f"    offloaded basis streams at {rate / 2**30:.1f} GiB/s, {fixed:.2f} s fixed ({dim:,})")
    return {"dim": dim, "wall_s": walls, "bytes_per_s": rate, "fixed_s": fixed}


# -- 10. per-step overhead of the cheap probes on a GPT-style decoder ----------------------

PROBE_OVERHEAD_S = 45.0
"""Seconds the ``probe_overhead`` section may take: its rounds stop beyond (after
``OVERHEAD_MIN_ROUNDS``), keeping time for the sync count."""
OVERHEAD_TARGET = 1.05
"""Issue 16: ``default_probes(every_n=1)`` costs at most 5 % of an unwatched step; the
other configurations are reported against the same ratio."""
OVERHEAD_BLOCK = 10
"""Steps per timed block: a multiple of 10, so that a block of an every-10 configuration
holds one due step wherever it starts."""
OVERHEAD_MIN_ROUNDS = 3
OUTSIDE_SYNCS = 2
"""Syncs from outside trainprobe (torch's own, the loop's) after which a configuration's
blocks stop running under the debug mode; one from trainprobe stops them at once."""
NO_FLUSH = 1e9
"""``flush_seconds`` while timing: the monitor's flush (one blocking device-to-host copy
by design, ``monitor/transfer.py``) is called between blocks and timed on its own."""
PACKAGE = Path(trainprobe.__file__).resolve().parent


def transformer_probes(every_n: int) -> list:
    """``default_probes`` and the cheap transformer ones, all every ``every_n`` steps but
    the guard and the learning rate (every step, as in the defaults)."""
    schedule = every(every_n)
    return [
        *default_probes(every_n=every_n),
        AttentionStats(schedule=schedule),
        OutputLogits(schedule=schedule),
        AdamHealth(schedule=schedule),
    ]


OVERHEAD_CONFIGS: dict[str, Callable[[], list] | None] = {
    "unwatched": None,
    "default_every_1": lambda: default_probes(every_n=1),
    "default_every_10": lambda: default_probes(every_n=10),
    "transformer_every_1": lambda: transformer_probes(1),
    "transformer_every_10": lambda: transformer_probes(10),
}
OVERHEAD_PROBES = {
    "unwatched": "-",
    "default_every_1": "`default_probes(every_n=1)`",
    "default_every_10": "`default_probes(every_n=10)`",
    "transformer_every_1": "defaults + `AttentionStats`, `OutputLogits`, `AdamHealth`, every 1",
    "transformer_every_10": "defaults + `AttentionStats`, `OutputLogits`, `AdamHealth`, every 10",
}


def section_probe_overhead(cfg: Config) -> dict:
    """Median ms per step of a GPT-style decoder (bf16 autocast around the forward, AdamW)
    unwatched and watched by each of ``OVERHEAD_CONFIGS``, in interleaved rounds of one
    block of ``OVERHEAD_BLOCK`` steps per configuration (shuffled order, one warm-up block
    each, not timed): ratios to unwatched against ``OVERHEAD_TARGET``. On CUDA the timed
    blocks run under ``torch.cuda.set_sync_debug_mode("error")`` while ``still_checked``
    (each sync recorded: its step, the innermost trainprobe frame, the last frame), then
    without; ``count_syncs`` counts each one's syncs per step after the rounds. Monitors
    flush between blocks, each flush timed (``flush_ms``) and charged per step flushed in
    ``ratio_with_flush``."""
    s, dev = cfg.sizes, cfg.device
    begin = time.perf_counter()
    until = begin + min(PROBE_OVERHEAD_S, cfg.left())
    base, _ = decoder(cfg, s.probe_gpt, cfg.seed + 21)
    vocab, _, _, _, seq, bsz = s.probe_gpt
    gen = torch.Generator().manual_seed(cfg.seed + 22)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=gen).to(dev)
        batches.append((tokens[:, :-1], tokens[:, 1:].reshape(-1)))  # [B, T], [B·T]
    out: dict[str, Any] = decoder_info(base, s.probe_gpt) | {
        "tied": True,
        "autocast": "bfloat16",
        "optimizer": "AdamW(lr=3e-4, weight_decay=0.1)",
        "block_steps": OVERHEAD_BLOCK,
        "target": OVERHEAD_TARGET,
        "budget_s": until - begin,
        "sync_check": "set_sync_debug_mode('error')" if dev.type == "cuda" else "CUDA only",
        "warnings": [],
    }
    order = list(OVERHEAD_CONFIGS)
    shuffler = random.Random(cfg.seed)
    synced: dict[str, list[dict]] = {}  # configuration -> where its timed steps synced
    flushes: dict[str, list[float]] = {name: [] for name in OVERHEAD_CONFIGS}
    reserve = SYNC_STEPS / OVERHEAD_BLOCK if dev.type == "cuda" else 0.0  # the sync count
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.ExitStack() as stack,
        recorded_warnings(out["warnings"]),
    ):
        trainers = {
            name: _overhead_trainer(name, base, stack, Path(tmp), make)
            for name, make in OVERHEAD_CONFIGS.items()
        }
        del base
        mark = time.perf_counter()
        for t in trainers.values():  # warm-up (allocator, kernels, the first Adam step)
            t.run(batches, OVERHEAD_BLOCK, dev)
            _flush(t, dev)
        round_s = time.perf_counter() - mark
        for rnd in range(s.probe_rounds):
            late = time.perf_counter() + (1.2 + reserve) * round_s > until  # with the count
            if rnd >= OVERHEAD_MIN_ROUNDS and late:
                break
            mark = time.perf_counter()
            shuffler.shuffle(order)
            for name in order:
                t = trainers[name]
                gc.collect()
                t.seconds.append(_strict_block(t, batches, dev, synced) / OVERHEAD_BLOCK)
                if t.mon is not None:
                    flushes[name].append(_flush(t, dev))
            round_s = time.perf_counter() - mark
        if dev.type == "cuda":  # after the rounds: every configuration, flush deferred
            if cfg.left() > reserve * round_s + 5:
                out["syncs"] = attempt(lambda: count_syncs(trainers, batches, dev))
                out["flush_syncs"] = attempt(lambda: _flush_syncs(trainers))
            else:
                out["syncs"] = {"skipped": "time budget spent"}
        stack.close()  # flush and close the monitors inside the temporary directory
        out["rounds_done"] = len(trainers["unwatched"].seconds)
        out["steps_each"] = trainers["unwatched"].step
        out["rows"] = _overhead_rows(trainers, flushes, synced, out.get("syncs"), dev)
    held = out["rows"]["default_every_1"]
    out["meets_target"] = held["meets_target"]  # the issue's target: the defaults every step
    out["sync_free"] = None if dev.type != "cuda" else not any(synced.values())
    return out


def _overhead_trainer(
    name: str,
    base: nn.Module,
    stack: contextlib.ExitStack,
    root: Path,
    make: Callable[[], list] | None,
) -> Trainer:
    """A copy of ``base`` in training mode, its AdamW and (with probes) its monitor, which
    raises a probe's error (a sync under the debug mode must not just disable the probe)
    and flushes only when told to (``NO_FLUSH``)."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    mon, run_dir = None, None
    if make is not None:
        run_dir = root / name
        mon = stack.enter_context(
            trainprobe.watch(
                model,
                make(),
                run_dir=run_dir,
                optimizer=opt,
                flush_seconds=NO_FLUSH,
                on_probe_error="raise",
            )
        )

    def forward(x: Tensor) -> Tensor:  # [B, T] -> [B·T, vocab], as the targets
        return model(x).flatten(0, 1)

    return Trainer(name, model, forward, opt, mon, run_dir, amp="forward")


def _strict_block(t: Trainer, batches: list, device: torch.device, synced: dict) -> float:
    """Seconds of ``OVERHEAD_BLOCK`` steps of ``t``. On CUDA, while ``still_checked``,
    under ``set_sync_debug_mode("error")`` (restored after): a host sync raises, its site
    is appended to ``synced[t.name]`` and the block is run again without the mode."""
    sites = synced.setdefault(t.name, [])
    if device.type == "cuda" and still_checked(sites):
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return t.run(batches, OVERHEAD_BLOCK, device)
        except RuntimeError as err:
            if "synchroniz" not in str(err):
                raise
            site = sync_site(err, t.step)
            sites.append(site)
            log(
                f"  {t.name}: host sync at step {t.step}: "
                f"{site['trainprobe_frame'] or 'outside trainprobe'}, {site['last_frame']}"
            )
            t.step += 1  # the monitor saw this step begin: its number is spent
            t.opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return t.run(batches, OVERHEAD_BLOCK, device)


def still_checked(sites: list[dict]) -> bool:
    """Whether a configuration's next block runs under the debug mode: none of its syncs
    so far came from trainprobe, and fewer than ``OUTSIDE_SYNCS`` from elsewhere."""
    ours = any(site["trainprobe_frame"] for site in sites)
    return not ours and len(sites) < OUTSIDE_SYNCS


def first_sync(sites: list[dict]) -> dict | None:
    """The first sync from trainprobe, else the first at all (None: none)."""
    return next((site for site in sites if site["trainprobe_frame"]), sites[0] if sites else None)


def sync_site(err: BaseException, step: int) -> dict:
    """Where a sync raised under the debug mode: the innermost frame in the trainprobe
    package (``trainprobe/...py:line``, None when the sync came from outside it) and the
    traceback's last frame."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(PACKAGE)]

    def where(frame: traceback.FrameSummary, root: Path | None) -> str:
        path = Path(frame.filename).resolve()
        name = path.relative_to(root).as_posix() if root is not None else path.name
        return f"{name}:{frame.lineno} ({frame.name})"

    return {
        "step": step,
        "trainprobe_frame": where(ours[-1], PACKAGE.parent) if ours else None,
        "code": ours[-1].line if ours else None,
        "last_frame": where(frames[-1], None) if frames else None,
        "error": str(err).splitlines()[0][:300],
    }


def _flush(t: Trainer, device: torch.device) -> float:
    """Seconds of ``t``'s monitor flush (its one device-to-host copy and the commit),
    the device idle before and after."""
    if t.mon is None:
        return 0.0
    sync(device)
    mark = time.perf_counter()
    t.mon.flush()
    sync(device)
    return time.perf_counter() - mark


def _flush_syncs(trainers: dict[str, Trainer]) -> dict:
    """Host syncs of one flush per monitor (the steps of the sync count), under "warn"."""
    out = {}
    for name, t in trainers.items():
        if t.mon is None:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                t.mon.flush()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out[name] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def _overhead_rows(
    trainers: dict[str, Trainer],
    flushes: dict[str, list[float]],
    synced: dict[str, list[dict]],
    syncs: Any,
    device: torch.device,
) -> dict:
    base = float(np.median(trainers["unwatched"].seconds))
    counted = syncs if isinstance(syncs, dict) else {}
    rows = {}
    for name, t in trainers.items():
        ms = float(np.median(t.seconds) * 1e3)
        flush_ms = float(np.median(flushes[name]) * 1e3) if flushes[name] else 0.0
        row: dict[str, Any] = {
            "ms_per_step": ms,
            "min_ms": float(np.min(t.seconds) * 1e3),
            "max_ms": float(np.max(t.seconds) * 1e3),
            "ratio": ms / 1e3 / base,
            "overhead_ms": ms - base * 1e3,
            "flush_ms": flush_ms,  # one flush of OVERHEAD_BLOCK steps' records
            "ratio_with_flush": (ms + flush_ms / OVERHEAD_BLOCK) / 1e3 / base,
            "sync_free": None if device.type != "cuda" else not synced.get(name),
        }
        first = first_sync(synced.get(name, []))
        if first is not None:
            row["synced"] = first  # the one the table shows
            row["sync_sites"] = synced[name]  # every one caught, in order
        if isinstance(counted.get(name), dict):
            row["syncs_per_step"] = counted[name].get("per_step")
            row["sync_places"] = counted[name].get("where")
        if t.mon is not None:
            row["meets_target"] = row["ratio"] <= OVERHEAD_TARGET
            row["verdict"] = "pass" if row["meets_target"] else "fail"
            row |= recorded_keys(t)
        log(
            f"  {name:<22} {ms:9.3f} ms/step  x{row['ratio']:.3f}  flush {flush_ms:.1f} ms  "
            f"{row.get('verdict', '')}"
            + (f"  synced at {first['trainprobe_frame'] or first['last_frame']}" if first else "")
        )
        rows[name] = row
    return rows


SECTIONS: dict[str, Callable[[Config], dict]] = {
    "environment": section_environment,
    "hvp_accuracy": section_hvp_accuracy,
    "lanczos": section_lanczos,
    "monitor": section_monitor,
    "mixed_precision": section_mixed_precision,
    "probe_overhead": section_probe_overhead,  # before krylov, which takes what time is left
    "per_sample": section_per_sample,  # before compile: the one whose warm-up may run long
    "compile": section_compile,
    "fsdp2": section_fsdp2,
    "krylov": section_krylov,
}


def run_section(name: str, fn: Callable[[Config], dict], cfg: Config) -> dict:
    if cfg.left() < 5:
        log(f"section {name}: skipped, time budget spent")
        return {"skipped": f"time budget ({cfg.budget:.0f} s) spent"}
    log(f"section {name}")
    begin = time.perf_counter()
    try:
        result = fn(cfg)
    except Exception as err:  # recorded; the next section runs
        log(f"section {name} failed: {type(err).__name__}: {err}")
        result = {
            "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    finally:
        _free(cfg.device)
    result["seconds"] = time.perf_counter() - begin
    log(f"section {name} done in {result['seconds']:.1f} s")
    return result


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (same as --size tiny)")
    parser.add_argument(
        "--size",
        choices=sorted(PRESETS),
        default=None,
        help="problem sizes (default: full on CUDA, small on the CPU)",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json and gpu.md")
    parser.add_argument(
        "--budget",
        type=float,
        default=480.0,
        help="seconds after the imports; sections stop early or are skipped beyond it",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor; aot_eager with --quick)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "tiny"
    if args.size is None:
        args.size = "full" if args.device.startswith("cuda") else "small"
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.size == "tiny" else "inductor"
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # read by cuBLAS when its first handle is made: before any CUDA work of this process
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.threads:
        torch.set_num_threads(args.threads)
    gc.collect()
    gc.freeze()  # torch's ~10^5 objects: later collections (between timed blocks) skip them
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="trainprobe-gpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"results go to {out_dir}")
    cfg = Config(
        torch.device(args.device), PRESETS[args.size], args.size, args.budget, args.compile_backend
    )
    wanted = args.sections.split(",")
    results = {
        "settings": {"argv": sys.argv[1:], "sizes": asdict(cfg.sizes)}
        | {k: str(v) for k, v in vars(args).items()},
        "sections": {},
    }
    for name, fn in SECTIONS.items():
        if name in wanted:
            results["sections"][name] = run_section(name, fn, cfg)
            write(out_dir, results)  # what is done survives a crash later on
    results["total_s"] = time.perf_counter() - START
    markdown = write(out_dir, results)
    print(markdown, flush=True)
    log(f"wrote {out_dir / 'gpu.json'} and {out_dir / 'gpu.md'}")
    return 0


def write(out_dir: Path, results: dict) -> str:
    (out_dir / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = to_markdown(results)
    (out_dir / "gpu.md").write_text(markdown)
    return markdown


# -- markdown ----------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3g") -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "**no**")
    if isinstance(value, int | float):
        return format(value, spec)
    if isinstance(value, dict) and "error" in value:
        return refused_or_error(value)
    return str(value)


def refused_or_error(row: dict) -> str:
    """``"refused"`` for the fd engine's refusal (its estimate over tolerance), else
    ``"error"``."""
    return "refused" if str(row["error"]).startswith("FiniteDifferenceError") else "error"


def cell(row: Any, key: str, spec: str = ".3g") -> str:
    """``row[key]`` formatted, or why it is missing (an error or a skip)."""
    if not isinstance(row, dict):
        return "-"
    if "error" in row or "skipped" in row:
        return refused_or_error(row) if "error" in row else "skipped"
    return fmt(row.get(key), spec)


def with_estimate(row: Any, text: str) -> str:
    """``text`` and the fd engine's own error estimate, where it has one (after the error
    against ``‖H‖``, its scale, where measured)."""
    estimate = row.get("fd_error") if isinstance(row, dict) else None
    if estimate is None or "error" in row:
        return text
    against = f"vs ‖H‖ {row['vs_norm']:.0e}, " if "vs_norm" in row else ""
    return f"{text} ({against}est. {estimate:.0e})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def failed(name: str, sec: dict) -> list[str]:
    if "error" in sec:
        return [f"{name}: **error** `{sec['error'].splitlines()[0][:300]}`", ""]
    if "skipped" in sec:
        return [f"{name}: skipped ({sec['skipped']})", ""]
    return []


def md_environment(sec: dict) -> list[str]:
    if "name" not in sec:
        return []
    memory = f", {sec['memory_gib']:.0f} GiB" if "memory_gib" in sec else ""
    return [
        f"{sec['name']}{memory}; torch {sec['torch']}, CUDA {sec['cuda']}, cuDNN "
        f"{sec['cudnn']}, Python {sec['python']}; TF32 matmul {sec['tf32_matmul']}, "
        f"cuDNN {sec['tf32_cudnn']}; sizes `{sec['preset']}`.",
        "",
    ]


def md_hvp(sec: dict) -> list[str]:
    rows = []
    for case in ("mlp", "cnn_bn_eval"):
        data = sec.get(case, {})
        labels = sorted(
            {k.split("/")[0] for k in data if "/" in k},
            key=["float64", "float32", "float32_no_tf32"].index,
        )
        for label in labels:
            cells = [
                with_estimate(
                    data[f"{label}/{e}"], cell(data[f"{label}/{e}"], "max_rel_err", ".1e")
                )
                for e in ENGINES
            ]
            rows.append([f"{case} (P={data['params']})", label, *cells])
        if "error" in data:
            rows.append([case, "error", *["-"] * len(ENGINES)])
    head = ["HVP max rel. error vs dense float64", "dtype", *[f"`{e}`" for e in ENGINES]]
    note = [
        f"Dense references: `torch.func.hessian` vs `jacrev(jacrev)` agree to "
        f"{fmt(sec.get('mlp', {}).get('reference_fwdrev_vs_revrev'), '.1e')} (MLP), "
        f"{fmt(sec.get('cnn_bn_eval', {}).get('reference_fwdrev_vs_revrev'), '.1e')} (CNN). "
        "`fd`: the error relative to ‖H‖₂‖v‖ and the engine's own estimate (of the same); "
        "`refused`: its estimate stayed over `fd_tol` (a ReLU kink within the step)."
    ]
    return [*table(head, rows), "", *note, ""]


def md_lanczos(sec: dict) -> list[str]:
    if "grad_ms" not in sec:
        return []
    ref = sec.get("reference", {})
    rows = []
    for engine in ENGINES:
        r = sec.get(engine, {})
        values = ", ".join(f"{v:.4g}" for v in r.get("values", []))
        rows.append(
            [
                f"`{engine}`",
                cell(r, "hvp_ms", ".2f"),
                cell(r, "hvp_per_grad", ".2f"),
                cell(r, "matmat4_per_hvp_ms", ".2f"),
                cell(r, "build_per_grad", ".1f"),
                cell(r, "hvps"),
                cell(r, "wall_s", ".2f"),
                values,
                with_estimate(r, cell(r, "rel_diff_to_reference", ".1e")),
                f"{cell(r, 'hvp_peak_mib', '.0f')} / {fmt(sec.get('grad_peak_mib'), '.0f')}",
            ]
        )
    head = [
        "engine",
        "HVP ms",
        "HVP/grad",
        "ms/HVP in a k=4 `matmat`",
        "build/grad",
        "HVPs",
        "top-5 s",
        "λ1..λ5",
        "rel. diff to ref.",
        "peak MiB HVP / grad",
    ]
    ref_values = ", ".join(f"{v:.4g}" for v in ref.get("values", []))
    note = [
        f"Transformer, {sec['params']:,} parameters, batch {sec['batch']} x {sec['seq']} "
        f"tokens, float32; gradient {sec['grad_ms']:.2f} ms ({sec['grad_math_attention_ms']:.2f}"
        f" ms with the math attention kernel the HVPs use). Reference: {ref.get('dtype')} "
        f"`graph`, {fmt(ref.get('hvps'))} HVPs, {fmt(ref.get('wall_s'), '.1f')} s: "
        f"{ref_values}. float32 runs: `tol=1e-4`. (est.): the `fd` engine's own "
        "estimate, the largest of its products' (relative to the largest ‖Hv‖/‖v‖ seen)."
    ]
    return [*table(head, rows), "", *note, ""]


def md_monitor(sec: dict) -> list[str]:
    if "rows" not in sec:
        return []
    syncs = sec.get("syncs") if isinstance(sec.get("syncs"), dict) else {}
    syncs = {k: v for k, v in syncs.items() if isinstance(v, dict)}
    places = sorted({p for v in syncs.values() for p in v.get("where", {})})
    rows = [
        [
            name,
            fmt(r["ms_per_step"], ".3f"),
            fmt(r["ratio"], ".3f"),
            fmt(r["overhead_ms"], "+.3f"),
            fmt(r["identical"]),
            fmt(syncs.get(name, {}).get("per_step"), ".2f"),
        ]
        for name, r in sec["rows"].items()
    ]
    head = [
        "monitor config",
        "ms/step (median)",
        "ratio",
        "Δ ms/step",
        "bit-identical",
        "host syncs/step",
    ]
    note = [
        f"CNN, {sec['params']:,} parameters, batch {sec['batch']} of {sec['image']}x"
        f"{sec['image']}, {sec['optimizer']}, deterministic algorithms; {sec['reps_done']} "
        f"interleaved reps, {sec['steps_each']} steps per config. Two unwatched runs "
        f"identical: {fmt(sec['unwatched_runs_identical'])}."
        + (
            f" Host syncs: `torch.cuda.set_sync_debug_mode` over {SYNC_STEPS} more steps"
            + (f", from {', '.join(f'`{p}`' for p in places)}." if places else ".")
            if syncs
            else ""
        )
    ]
    return [*table(head, rows), "", *note, ""]


def md_amp(sec: dict) -> list[str]:
    rows = []
    for amp in ("forward", "step"):
        r = sec.get(f"autocast_{amp}", {})
        rows.append(
            [
                f"bf16 autocast around the {amp}",
                cell(r, "identical"),
                cell(r, "max_abs_diff", ".2e"),
                f"{cell(r, 'unwatched_s', '.2f')} / {cell(r, 'watched_s', '.2f')}",
            ]
        )
    head = ["mixed precision, watched vs unwatched", "bit-identical", "max abs Δw", "s (-/+)"]
    note = (
        f"{sec.get('steps')} steps each; (-/+): unwatched / watched; probes: {sec.get('probes')}."
    )
    return [*table(head, rows), "", note, ""]


def md_compile(sec: dict) -> list[str]:
    rows = []
    for name in COMPILE_RUNS:
        r = sec.get(name)
        if isinstance(r, dict):
            rows.append(
                [
                    name,
                    cell(r, "probe_recorded"),
                    cell(r, "first_step_s", ".2f"),
                    cell(r, "ms_per_step_after", ".2f"),
                    cell(r, "identical"),
                    cell(r, "max_abs_diff", ".2e"),
                    cell(r, "identical_to_eager"),
                ]
            )
    head = [
        "run (in this order)",
        "probe recorded",
        "first step s",
        "ms/step after",
        "= `compiled`",
        "max abs Δw to `compiled`",
        "= `eager`",
    ]
    note = f"backend `{sec.get('backend')}`, {sec.get('steps')} steps, {sec.get('optimizer')}."
    return [*table(head, rows), "", note, ""]


def md_probe_overhead(sec: dict) -> list[str]:
    if "rows" not in sec:
        return []
    cuda = sec.get("sync_check") != "CUDA only"
    flush_syncs = sec.get("flush_syncs") if isinstance(sec.get("flush_syncs"), dict) else {}
    rows = []
    for name, r in sec["rows"].items():
        first = r.get("synced", {})
        where = first.get("trainprobe_frame") or f"{first.get('last_frame')}, outside trainprobe"
        rows.append(
            [
                f"`{name}`",
                OVERHEAD_PROBES.get(name, "?"),
                fmt(r["ms_per_step"], ".2f"),
                fmt(r["ratio"], ".3f"),
                fmt(r["ratio_with_flush"], ".3f"),
                "-" if "verdict" not in r else ("pass" if r["meets_target"] else "**fail**"),
                fmt(r.get("syncs_per_step"), ".2f"),
                ("-" if not cuda else "none" if r["sync_free"] else f"**`{where}`**"),
            ]
        )
    head = [
        "configuration",
        "probes",
        "ms/step (median)",
        "ratio",
        "ratio incl. flush",
        f"≤ {sec['target']}×",
        "host syncs/step",
        "first sync (debug mode `error`)",
    ]
    flush = {n: r["flush_ms"] for n, r in sec["rows"].items() if r.get("flush_ms")}
    note = [
        f"GPT-style decoder (pre-LayerNorm, causal SDPA, GELU MLP, tied embeddings), "
        f"{sec['params']:,} parameters, batch {sec['batch']} x {sec['seq']} tokens, "
        f"{sec['autocast']} autocast around the forward, {sec['optimizer']}; "
        f"{sec['rounds_done']} interleaved rounds (shuffled order) of {sec['block_steps']} "
        "steps per configuration after one warm-up block; target: the defaults every step "
        f"at most {sec['target']}× unwatched (issue 16), the others measured against it. "
        "The monitor keeps values on the device and moves them in one blocking copy per "
        "flush (by design; `flush_seconds`, default 2 s): here each monitor flushes "
        f"between blocks, timed apart (ms per flush of {sec['block_steps']} steps: "
        + ", ".join(f"`{n}` {v:.1f}" for n, v in flush.items())
        + "); ratio incl. flush charges that flush to its steps."
        + (
            f" Syncs of one flush: {', '.join(f'`{n}` {v}' for n, v in flush_syncs.items())}."
            if flush_syncs
            else ""
        )
        + (
            " First sync: the innermost trainprobe frame of the error raised by a host sync "
            "in a timed step (else the last frame, outside trainprobe); a configuration runs "
            f"without the mode after one from trainprobe or {OUTSIDE_SYNCS} from elsewhere."
            if cuda
            else " Syncs are checked on CUDA only."
        )
    ]
    return [*table(head, rows), "", *note, ""]


def md_per_sample(sec: dict) -> list[str]:
    if "grad_ms" not in sec:
        return []
    rows = [
        [
            f"`{m}`",
            cell(sec[m], "ran"),
            cell(sec[m], "ms", ".2f"),
            cell(sec[m], "ms_per_grad", ".1f"),
            cell(sec[m], "max_rel_err", ".1e"),
        ]
        for m in METHODS
    ]
    head = ["per_sample_gradients", "ran", "ms", "/ batch grad", "max rel. err vs loop"]
    note = [
        f"CNN, {sec['params']:,} parameters, batch {sec['batch']}; batch gradient "
        f"{sec['grad_ms']:.2f} ms, reference loop {sec['reference_loop_ms']:.1f} ms."
    ]
    return [*table(head, rows), "", *note, ""]


def md_fsdp2(sec: dict) -> list[str]:
    if "rel_diff" not in sec:
        return []
    rows = [
        [
            f"{sec['backend']}, 1 rank",
            f"{sec['params']:,}",
            ", ".join(f"{v:.5g}" for v in sec["fsdp_top2"]),
            ", ".join(f"{v:.5g}" for v in sec["exact_top2"]),
            f"{sec['rel_diff']:.1e} (est. {sec['fd_error']:.0e})",
            fmt(sec["hvps"], ".0f"),
            fmt(sec["measured_step_s"], ".2f"),
            fmt(sec["identical"]),
            fmt(not sec.get("disabled")),
        ]
    ]
    head = [
        "FSDP2",
        "params",
        "λ1, λ2 (sharded fd)",
        "λ1, λ2 (exact, unsharded)",
        "rel. diff",
        "HVPs",
        "measured step s",
        "training bit-identical",
        "no probe disabled",
    ]
    note = [
        "GELU transformer `fully_shard`'ed per block and at the root, AdamW, 4 steps watched "
        "by `default_probes(every_n=1)`, `HessianTop(top=2)` and `Sharpness` every 2 steps."
    ]
    return [*table(head, rows), "", *note, ""]


def md_krylov(sec: dict) -> list[str]:
    lines: list[str] = []
    products = sec.get("products", {})
    if "params" in products:
        rows = [
            [
                f"`{e}`",
                cell(products.get(e), "matvecs_ms", ".2f"),
                cell(products.get(e), "matmat_ms", ".2f"),
                cell(products.get(e), "speedup", ".2f"),
                cell(products.get(e), "max_rel_diff", ".1e"),
            ]
            for e in ENGINES
        ]
        head = [
            f"engine (k = {products['k']})",
            f"{products['k']} × `matvec` ms",
            "`matmat` ms",
            "speed-up",
            "rel. diff",
        ]
        lines += table(head, rows)
        lines += [
            "",
            f"Transformer `lm`, {products['params']:,} parameters, batch {products['batch']} x "
            f"{products['seq']} tokens, float32: one `matmat` of k columns against k `matvec` "
            "calls (target: speed-up ≥ 3 on the GPU); rel. diff: the `matmat` columns against "
            "the `matvec` products.",
            "",
        ]
    elif "error" in products:
        lines += [f"products: **error** `{products['error'].splitlines()[0][:300]}`", ""]
    rows = []
    labels = {
        ("gpt", "cold"): "top 1, cold",
        ("gpt", "warm"): "top 1, warm, after 1 AdamW step",
        ("gpt", "preconditioned"): f"top 1 of P⁻¹H, after {ADAM_STEPS} AdamW steps",
        ("gpt_big", "float32"): f"top {BIG_TOP}, float32 basis",
        ("gpt_big", "bfloat16"): f"top {BIG_TOP}, bfloat16 basis",
        ("gpt_big", "offloaded"): f"top {BIG_TOP}, float32 basis offloaded",
    }
    for (part, run), label in labels.items():
        model = sec.get(part)
        if not isinstance(model, dict):
            continue
        if "params" not in model:  # the part failed or was skipped as a whole
            if run in ("cold", "float32"):
                rows.append(["-", "-", f"{part}: {cell(model, 'params')}", *["-"] * 9])
            continue
        r = model.get(run, {"skipped": "-"})
        values = ", ".join(f"{v:.4g}" for v in r.get("values", []))
        rows.append(
            [
                f"{model['params']:,}",
                str(model.get("engine", "-")),
                label,
                values or cell(r, "values"),
                cell(r, "hvps"),
                cell(r, "wall_s", ".2f"),
                cell(r, "peak_mib", ".0f"),
                cell(r, "rel_residual", ".1e"),
                cell(r, "restarts"),
                cell(r, "floor", ".1e"),
                cell(r, "rel_diff_to_float32", ".1e") if run in ("bfloat16", "offloaded") else "",
                cell(r, "converged"),
            ]
        )
    head = [
        "params",
        "engine",
        "Lanczos",
        "λ",
        "HVPs",
        "s",
        "peak MiB",
        "rel. residual",
        "restarts",
        "floor",
        "rel. diff to float32",
        "converged",
    ]
    lines += table(head, rows)
    gpt = sec.get("gpt") if isinstance(sec.get("gpt"), dict) else {}
    amp = gpt.get("autocast")
    notes = [
        "GPT-style decoders (pre-LayerNorm, causal SDPA, GELU MLP, tied embeddings), random "
        f"tokens, {f'forward under {amp} autocast' if amp else 'float32 forward'}; "
        f"`lanczos(tol={sec.get('tol')}, refine=False)`, rel. residual ‖Hy − θy‖ / max |θ|. "
        "Targets: cold ≤ 20 HVPs, warm ≤ 5, top-5 ≤ 40. Warm: started from the cold run's "
        "vectors and guard vectors, the model one AdamW step on. P⁻¹H: P^{-1/2} H P^{-1/2} "
        "with `stability_rule`'s preconditioner"
        + (
            f" (λ / threshold {gpt['preconditioned']['ratio']:.3g})."
            if "ratio" in gpt.get("preconditioned", {})
            else "."
        )
    ]
    big = sec.get("gpt_big", {})
    if isinstance(big, dict) and "engines_tried" in big:
        tried = "; ".join(f"`{e}`: {why}" for e, why in big["engines_tried"].items())
        notes.append(
            f"{fmt(big.get('params'), ',')} parameters: {big.get('batch')} x {big.get('seq')} "
            f"tokens, autocast {big.get('autocast')}, engines tried: {tried}; HVP "
            f"{fmt(big.get('hvp_ms'), '.0f')} ms; `max_memory` "
            f"{fmt(big.get('room_gib'), '.1f')} GiB (the free device memory less the Ritz "
            "vectors, one HVP's peak and a margin)."
        )
        rate = big.get("offload_rate", {})
        if isinstance(rate, dict) and "bytes_per_s" in rate:
            notes.append(
                f"Offloaded basis streamed at {rate['bytes_per_s'] / 2**30:.1f} GiB/s, "
                f"{rate['fixed_s']:.2f} s fixed (two short runs over {rate['dim']:,} "
                "elements)."
            )
    skipped = [f"- Skipped: {why[:300]}" for why in skips_in(sec)[:6]]
    return [*lines, "", *notes, "", *skipped, *([""] if skipped else [])]


def skips_in(value: Any, path: str = "") -> list[str]:
    """``path: reason`` of every part skipped below a section."""
    if not isinstance(value, dict):
        return []
    found = [f"{path or '.'}: {value['skipped']}"] if "skipped" in value else []
    return found + [s for k, v in value.items() for s in skips_in(v, f"{path}/{k}")]


MARKDOWN = {
    "environment": md_environment,
    "hvp_accuracy": md_hvp,
    "lanczos": md_lanczos,
    "monitor": md_monitor,
    "mixed_precision": md_amp,
    "probe_overhead": md_probe_overhead,
    "per_sample": md_per_sample,
    "compile": md_compile,
    "fsdp2": md_fsdp2,
    "krylov": md_krylov,
}


def warnings_in(value: Any) -> list[str]:
    """Every distinct warning recorded anywhere in a section's results."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += item if key == "warnings" else warnings_in(item)
    return list(dict.fromkeys(found))


def errors_in(value: Any, path: str = "") -> list[str]:
    """``path: first line`` of every error recorded below a section."""
    if not isinstance(value, dict):
        return []
    found = [f"{path or '.'}: {str(value['error']).splitlines()[0]}"] if "error" in value else []
    return found + [e for k, v in value.items() for e in errors_in(v, f"{path}/{k}")]


def to_markdown(results: dict) -> str:
    where = results["sections"].get("environment", {}).get("name", "?")
    lines = [f"### `benchmarks/gpu.py` on {where}", ""]
    for name, sec in results["sections"].items():
        bad = failed(name, sec)
        if bad:
            lines += bad
            continue
        try:
            lines += MARKDOWN[name](sec)
            notes = [f"- Error: {e[:300]}" for e in errors_in(sec)[:4]]
            notes += [f"- Warning: {w[:240]}" for w in warnings_in(sec)[:4]]
            lines += [*notes, ""] if notes else []
        except Exception as err:  # a table must not lose the json
            lines += [f"{name}: table failed ({type(err).__name__}: {err})", ""]
    if "total_s" in results:
        lines.append(f"Whole script: {results['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
