"""GPU check and benchmark of trainprobe: accuracy, cost and non-interference on CUDA.

One prepared script for a scarce GPU lease (about 2-3 minutes on one H200, compile
warm-up included; sections stop early, and later ones are skipped, once ``--budget``
seconds after the imports are spent). Each section is measured, never assumed, and wrapped: an
exception is recorded with its text in the results and the next section runs.

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

Usage (from the repository root; trainprobe need not be installed)::

    PYTHONPATH=src python3 benchmarks/gpu.py --out results/   # CUDA, 2-3 min on an H200
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
from trainprobe.functional import Objective, full_float32
from trainprobe.gradients import METHODS, per_sample_gradients

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
    """A GPT-style language model: ``[B, T]`` tokens -> ``[B, T, vocab]`` logits."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

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


SECTIONS: dict[str, Callable[[Config], dict]] = {
    "environment": section_environment,
    "hvp_accuracy": section_hvp_accuracy,
    "lanczos": section_lanczos,
    "monitor": section_monitor,
    "mixed_precision": section_mixed_precision,
    "per_sample": section_per_sample,  # before compile: the one whose warm-up may run long
    "compile": section_compile,
    "fsdp2": section_fsdp2,
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
        default=195.0,
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


MARKDOWN = {
    "environment": md_environment,
    "hvp_accuracy": md_hvp,
    "lanczos": md_lanczos,
    "monitor": md_monitor,
    "mixed_precision": md_amp,
    "per_sample": md_per_sample,
    "compile": md_compile,
    "fsdp2": md_fsdp2,
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
