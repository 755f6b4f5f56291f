"""Hessian top eigenvalues and trace on the CPU: trainprobe and its peers side by side.

One run, one model and one batch per case, every configuration on the same float32
model (as users run them), against exact float64 references:

- **cases**: a 64-128-128-10 tanh MLP and a ~27k-parameter ReLU CNN on 8×8 digits
  (scikit-learn's if installed, else the demo's generated digits), each trained 200
  seeded SGD steps so the Hessian is not at initialisation; batch 512.
- **references**: the top eigenvalues from a float64 Lanczos (tol 1e-12) on a float64
  copy, with our own double-backward HVP (independent of ``trainprobe``'s HVP code);
  the exact trace from the exact float64 Hessian diagonal. Both methods are checked in
  this run against dense ``torch.func.hessian`` matrices of small models (to 1e-10).
- **top-k** (k = 1, 5): each peer at its defaults and at its accuracy knob's loosest
  setting (from a short ladder, loose to tight) that reaches 1e-6 relative error on
  every eigenvalue; ``trainprobe``'s Lanczos likewise (its ``value_tol``). HVP count (exact,
  by instrumenting each library), median wall time over interleaved repetitions, and
  the largest relative error.
- **trace** at a 100-HVP budget: Hutchinson and Hutch++ of every library, median and
  max relative error over seeds.
- **engines**: the operator's build against one gradient (the first with a new loss
  closure, and again with the same one, as a probe's next measurement: the determinism
  check is remembered), one HVP against one gradient for each ``trainprobe`` engine, and the
  speed-up of one ``matmat`` of k = 8, 16 columns over k single ``matvec`` calls.
- **targets** of the issue, printed as PASS/MISS lines from the measurements.

Peers (``pip install -e ".[bench]"``; missing ones are skipped with a note):
PyHessian (GPL-3.0: called as a library only), hessian-eigenthings, curvlinops.

Usage::

    python benchmarks/curvature.py                  # full run (see benchmarks/README.md)
    python benchmarks/curvature.py --quick          # smoke run: 1 rep, short ladders
    python benchmarks/curvature.py --out curvature.json --threads 2
    python benchmarks/curvature.py --models mlp     # one case only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import itertools
import json
import math
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from trainprobe.cli.demo import make_digits
from trainprobe.curvature import criterion_loss, hessian_operator, lanczos, trace

Batch = tuple[Tensor, Tensor]
TARGET_REL = 1e-6  # relative error every eigenvalue must reach
TRACE_BUDGET = 100  # HVPs for the trace estimators
TOPS = (1, 5)
ENGINES = ("graph", "jvp", "linearize")
#: peer -> (module imported, distribution name on PyPI)
PEERS = {
    "pyhessian": ("pyhessian.hessian", "pyhessian"),
    "hessian-eigenthings": ("hessian_eigenthings", "hessian-eigenthings"),
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
}


# ---------------------------------------------------------------------------------------
# data and models


def digits(n: int, *, seed: int) -> tuple[Tensor, Tensor, str]:
    """``n`` standardised 8×8 digit images ``[n, 1, 8, 8]`` and labels ``[n]``, and the source.

    scikit-learn's digits (1797 images) when scikit-learn is installed, else the
    prototype-plus-noise digits of ``trainprobe demo`` (``make_digits``).
    """
    gen = torch.Generator().manual_seed(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        x, y = make_digits(n, gen=gen)
        source = "generated digits (trainprobe demo)"
    else:
        data = load_digits()
        order = torch.randperm(len(data.target), generator=gen)[:n]
        x = torch.tensor(data.images, dtype=torch.float32)[order, None]
        y = torch.tensor(data.target, dtype=torch.long)[order]
        source = "scikit-learn digits"
    return (x - x.mean()) / x.std(), y, source


def tanh_mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Flatten, then Linear layers of ``widths`` with tanh between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def small_cnn(hidden: int = 42) -> nn.Sequential:
    """conv 1→16→32 (3×3, ReLU), 2×2 max-pool, linear 512→``hidden``→10: 26,776 parameters.

    No BatchNorm or dropout, so every peer handles it; piecewise linear in each layer's
    parameters (see :func:`piecewise_linear_diagonal`).
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def tiny_cnn() -> nn.Sequential:
    """conv 1→4, ReLU, max-pool, linear 64→10 (690 parameters): the dense check's CNN."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10)
    )


def train(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, seed: int) -> float:
    """``steps`` seeded SGD steps (lr 0.05, momentum 0.9, batches of 64); the last loss."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def dim_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Case:
    """One model and batch every configuration runs on, with its exact references."""

    name: str
    description: str
    model: nn.Module  # float32, trained, eval mode
    batch: Batch
    diagonal: Callable[[nn.Module, Batch], Tensor]  # exact float64 Hessian diagonal
    top_ref: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [max(TOPS)] float64
    trace_ref: float = math.nan
    info: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return dim_of(self.model)


def make_case(
    name: str, model: nn.Module, data: tuple[Tensor, Tensor, str], args: argparse.Namespace
) -> Case:
    """Train ``model`` on the digits and keep the first ``batch_size`` of them as the batch."""
    x, y, source = data
    loss = train(model, x, y, steps=args.train_steps, seed=args.seed)
    model.eval()
    batch = (x[: args.batch_size].contiguous(), y[: args.batch_size].contiguous())
    diagonal = preactivation_diagonal if name == "mlp" else piecewise_linear_diagonal
    description = {"mlp": "64-128-128-10 tanh MLP", "cnn": "ReLU CNN (conv 16, 32; linear 42)"}
    info = {"train_loss": loss, "data": source, "train_steps": args.train_steps}
    return Case(name, description[name], model, batch, diagonal, info=info)


# ---------------------------------------------------------------------------------------
# exact float64 references (our own code: nothing here calls trainprobe's HVP)


class DoubleBackwardHessian:
    """``v [P] -> H v [P]`` in float64: double backward on a cached gradient graph.

    The loss is ``cross_entropy(model(x), y)`` of a float64 copy of ``model``.
    """

    def __init__(self, model: nn.Module, batch: Batch) -> None:
        self.model = copy.deepcopy(model).double()
        self.params = list(self.model.parameters())
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.dtype, self.device = torch.float64, torch.device("cpu")
        x, y = batch
        loss = F.cross_entropy(self.model(x.double()), y)
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)

    def __call__(self, v: Tensor) -> Tensor:
        pieces = [c.view_as(p) for c, p in zip(v.split(self.sizes), self.params, strict=True)]
        out = torch.autograd.grad(
            self.grads, self.params, pieces, retain_graph=True, allow_unused=True
        )
        return torch.cat(
            [
                (torch.zeros_like(p) if o is None else o).reshape(-1)
                for o, p in zip(out, self.params, strict=True)
            ]
        )


def reference_top(hessian: DoubleBackwardHessian, k: int) -> tuple[np.ndarray, dict]:
    """Top-``k`` eigenvalues by float64 Lanczos to residual 1e-12 (relative to λ_max)."""
    gen = torch.Generator().manual_seed(12345)
    pairs = lanczos(
        hessian,
        hessian.dim,
        top=k,
        tol=1e-12,
        max_iter=min(hessian.dim, 600),
        generator=gen,
        dtype=torch.float64,
    )
    if not pairs.converged:
        raise RuntimeError("the float64 reference Lanczos did not converge; raise max_iter")
    info = {"hvps": pairs.matvecs, "max_residual": float(pairs.residuals.max())}
    return pairs.values.numpy(), info


def flat_loss(model64: nn.Module, batch: Batch) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``theta [P] -> loss`` of the float64 ``model64`` on ``batch``, and the current theta."""
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for p in model64.parameters()]
    sizes = [p.numel() for p in model64.parameters()]
    x, y = batch[0].double(), batch[1]

    def loss(theta: Tensor) -> Tensor:
        parts = {n: c.view(s) for n, c, s in zip(names, theta.split(sizes), shapes, strict=True)}
        return F.cross_entropy(functional_call(model64, parts, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])
    return loss, theta


def preactivation_diagonal(model: nn.Module, batch: Batch) -> Tensor:
    """Exact ``diag(H)`` ``[P]`` (float64) of a Sequential of Linear and elementwise layers.

    A Linear layer ``z = W a + b`` enters the loss only through ``z``, linearly, so per
    example ``∂²ℓ/∂W_ij² = a_j² ∂²ℓ/∂z_i²`` and ``∂²ℓ/∂b_i² = ∂²ℓ/∂z_i²`` (residual terms
    included). ``∂²ℓ/∂z²`` is the small per-example Hessian of the network's tail.
    """
    model64 = copy.deepcopy(model).double()
    layers, (x, y) = list(model64), batch
    a, n, parts = x.double(), x.shape[0], []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                d = tail_hessian_diagonal(nn.Sequential(*layers[i + 1 :]), layer(a), y) / n
                parts += [(d.T @ a**2).reshape(-1), d.sum(0)]  # [out, in], [out]
            a = layer(a)
    return torch.cat(parts)


def tail_hessian_diagonal(tail: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    """``[N, d]``: ``∂²ℓ_n/∂z_ni²`` of ``ℓ_n = cross_entropy(tail(z_n), y_n)``."""

    def one(z_n: Tensor, y_n: Tensor) -> Tensor:
        return F.cross_entropy(tail(z_n[None]), y_n[None])

    hess = vmap(torch.func.hessian(one))  # [N, d, d]
    return torch.cat(
        [
            hess(zc, yc).diagonal(dim1=1, dim2=2)
            for zc, yc in zip(z.split(128), y.split(128), strict=True)
        ]
    )


def piecewise_linear_diagonal(model: nn.Module, batch: Batch) -> Tensor:
    """Exact ``diag(H)`` ``[P]`` (float64) of a ReLU/max-pool net of Conv2d and Linear layers.

    With the activation pattern fixed the network is affine in each single layer's
    parameters, so the residual term ``Σ_c ∂ℓ/∂f_c ∇²f_c`` has zero diagonal blocks and
    ``diag(H) = diag(GGN) = (1/N) Σ_n Σ_c (J_nᵀ S_n e_c)²`` with ``S Sᵀ = Λ = diag(p) − p pᵀ``
    (``S = diag(√p) − p √pᵀ``) and ``J_n`` example ``n``'s logit Jacobian: one batched
    backward per class ``c`` gives every example's output gradients ``δ``, and each
    layer's per-example parameter gradients follow from ``δ`` and its input.
    """
    model64 = copy.deepcopy(model).double()
    layers = [m for m in model64.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if sum(p.numel() for m in layers for p in m.parameters()) != dim_of(model64):
        raise ValueError("piecewise_linear_diagonal handles Conv2d and Linear parameters only")
    seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda m, a, out: seen.update({m: (a[0], out)})) for m in layers
    ]
    try:
        logits = model64(batch[0].double())  # [N, C]
    finally:
        for handle in handles:
            handle.remove()
    p = torch.softmax(logits.detach(), dim=1)
    root = torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]  # [N, C, C]
    squares = [torch.zeros_like(q) for q in model64.parameters()]
    for c in range(p.shape[1]):
        deltas = torch.autograd.grad(
            logits, [seen[m][1] for m in layers], root[:, :, c], retain_graph=True
        )
        pairs = zip(layers, deltas, strict=True)
        pieces = [t for m, d in pairs for t in per_example(m, seen[m][0], d)]
        for total, piece in zip(squares, pieces, strict=True):
            total += (piece.detach() ** 2).sum(0)
    return torch.cat([t.reshape(-1) for t in squares]) / p.shape[0]


def per_example(layer: nn.Module, a: Tensor, delta: Tensor) -> list[Tensor]:
    """Per-example gradients ``[N, *shape]`` of ``layer``'s weight and bias from its input
    ``a`` and output gradient ``delta`` (Linear; Conv2d through ``unfold``)."""
    if isinstance(layer, nn.Linear):
        grads = [delta[:, :, None] * a[:, None, :], delta]  # [N, out, in], [N, out]
    else:
        cols = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        flat = delta.flatten(2)  # [N, O, L]
        grads = [(flat @ cols.transpose(1, 2)).reshape(-1, *layer.weight.shape), flat.sum(2)]
    return grads[: 1 + (layer.bias is not None)]


def spot_check_diagonal(hessian: DoubleBackwardHessian, diag: Tensor, count: int) -> float:
    """Largest ``|e_iᵀ H e_i − diag_i| / max|diag|`` over ``count`` random coordinates."""
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for i in torch.randperm(hessian.dim, generator=gen)[:count].tolist():
        e = torch.zeros(hessian.dim, dtype=torch.float64)
        e[i] = 1.0
        worst = max(worst, abs(float(hessian(e)[i] - diag[i])))
    return worst / float(diag.abs().max())


def check_references(data: tuple[Tensor, Tensor, str], args: argparse.Namespace) -> dict:
    """Both reference methods against dense float64 Hessians of small models."""
    x, y, _ = data
    out = {}
    for name, model in (("mlp 64-16-10", tanh_mlp((64, 16, 10))), ("cnn tiny", tiny_cnn())):
        train(model, x, y, steps=args.train_steps, seed=args.seed)
        batch = (x[: args.batch_size], y[: args.batch_size])
        loss, theta = flat_loss(copy.deepcopy(model).double(), batch)
        dense = torch.func.hessian(loss)(theta)  # [P, P]
        exact = torch.linalg.eigvalsh(dense).flip(0)[: max(TOPS)].numpy()
        values, _ = reference_top(DoubleBackwardHessian(model, batch), max(TOPS))
        diagonal = preactivation_diagonal if name.startswith("mlp") else piecewise_linear_diagonal
        diag = diagonal(model, batch)
        out[name] = {
            "dim": theta.numel(),
            "lanczos_vs_eigvalsh": float(np.max(np.abs(values - exact) / np.abs(exact))),
            "diagonal_vs_dense": float(
                (diag - dense.diagonal()).abs().max() / dense.diagonal().abs().max()
            ),
        }
    return out


def build_references(case: Case, args: argparse.Namespace) -> None:
    """Fill ``case.top_ref``, ``case.trace_ref`` and the float32 noise floor into ``info``."""
    hessian = DoubleBackwardHessian(case.model, case.batch)
    start = time.perf_counter()
    case.top_ref, case.info["reference_lanczos"] = reference_top(hessian, max(TOPS))
    diag = case.diagonal(case.model, case.batch)
    case.trace_ref = float(diag.sum())
    case.info["diagonal_spot_check"] = spot_check_diagonal(hessian, diag, args.spot_checks)
    case.info["float32_noise"] = float32_noise(case, hessian)
    case.info["reference_seconds"] = time.perf_counter() - start


def float32_noise(case: Case, hessian: DoubleBackwardHessian) -> dict:
    """What float32 allows: one HVP's relative error, and a float32 Lanczos at tol 1e-10."""
    op = hessian_operator(case.model, criterion_loss(nn.CrossEntropyLoss()), batch=case.batch)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = hessian(v)
    hvp = float((op.matvec(v.float()).double() - exact).norm() / exact.norm())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # it cannot converge to 1e-10
        pairs = lanczos(
            op,
            op.dim,
            top=max(TOPS),
            tol=1e-10,
            max_iter=300,
            generator=torch.Generator().manual_seed(0),
        )
    return {
        "hvp_rel_error": hvp,
        "lanczos_tol": 1e-10,
        "lanczos_max_rel_error": max_rel_error(pairs.values.numpy(), case.top_ref),
    }


def max_rel_error(values: Any, ref: np.ndarray) -> float:
    """Largest ``|λ̂_i − λ_i| / |λ_i|`` after sorting ``values`` largest first (inf if short)."""
    got = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))[::-1]
    if got.size < ref.size:
        return math.inf
    return float(np.max(np.abs(got[: ref.size] - ref) / np.abs(ref)))


# ---------------------------------------------------------------------------------------
# counting each library's HVPs


@contextlib.contextmanager
def counting(owner: Any, name: str, columns: Callable[..., int]) -> Iterator[list[int]]:
    """Wrap ``owner.name`` so every call adds ``columns(*args)`` to the yielded ``[count]``.

    ``owner`` is a module, a class (a method is wrapped for every instance) or an
    instance; the attribute is put back exactly in ``finally``.
    """
    count = [0]
    original = getattr(owner, name)
    own = name in vars(owner)
    saved = vars(owner)[name] if own else None

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        count[0] += columns(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    try:
        yield count
    finally:
        if own:
            setattr(owner, name, saved)
        else:
            delattr(owner, name)


def one(*_: Any, **__: Any) -> int:
    return 1


def peer_status() -> dict[str, str]:
    """``peer -> "ok <version>"`` or why it is skipped."""
    status = {}
    for peer, (module, dist) in PEERS.items():
        try:
            importlib.import_module(module)
            status[peer] = f"ok {version(dist)}"
        except Exception as err:  # any import failure means: skip the peer
            status[peer] = f"skipped: {type(err).__name__}: {err}".splitlines()[0]
    return status


# ---------------------------------------------------------------------------------------
# top-k eigenvalues: one runner per library and algorithm -> (values, HVPs)


def criterion() -> nn.Module:
    return nn.CrossEntropyLoss()


def pyhessian_top(model: nn.Module, batch: Batch, k: int, **knob: Any) -> tuple[Any, int]:
    """PyHessian's deflated power iteration (knob: ``tol`` on the Rayleigh quotient's change,
    ``maxIter`` per eigenvalue). HVPs: calls of its ``hessian_vector_product``."""
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports
    # a class of the same name, which `import pyhessian.hessian as ph` would give)
    torch.manual_seed(0)  # its start vectors come from the global RNG
    with counting(ph, "hessian_vector_product", one) as count:
        values, _ = ph.hessian(model, criterion(), data=batch, cuda=False).eigenvalues(
            top_n=k, **knob
        )
    return values, count[0]


def eigenthings_operator(model: nn.Module, batch: Batch) -> Any:
    from hessian_eigenthings import HessianOperator, supervised_loss

    return HessianOperator(model, [batch], supervised_loss(criterion()))


def eigenthings_lanczos_top(model: nn.Module, batch: Batch, k: int, **knob: Any):
    """hessian-eigenthings ``lanczos`` (knob: ``max_iter``, default 2k). HVPs: its
    per-batch ``_hvp_autograd`` calls."""
    from hessian_eigenthings import lanczos as he_lanczos

    op = eigenthings_operator(model, batch)
    with counting(op, "_hvp_autograd", one) as count:
        result = he_lanczos(op, k=k, seed=0, **knob)
    return result.eigenvalues.numpy(), count[0]


def eigenthings_power_top(model: nn.Module, batch: Batch, k: int, **knob: Any):
    """hessian-eigenthings ``deflated_power_iteration`` (knob: ``tol``, ``max_iter``)."""
    from hessian_eigenthings import deflated_power_iteration

    op = eigenthings_operator(model, batch)
    with counting(op, "_hvp_autograd", one) as count:
        result = deflated_power_iteration(op, k=k, seed=0, **knob)
    return result.eigenvalues.numpy(), count[0]


def matmat_columns(_self: Any, _x: Any, _y: Any, m: list[Tensor]) -> int:
    return int(m[0].shape[-1])  # curvlinops' tensor-list matrices: [*shape, columns]


def curvlinops_operator(model: nn.Module, batch: Batch) -> Any:
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(model, criterion(), params, [batch])


def curvlinops_top(model: nn.Module, batch: Batch, k: int, **knob: Any):
    """curvlinops' Hessian operator through ``scipy.sparse.linalg.eigsh(which="LA")``
    (knob: ARPACK's ``tol``, default 0 = machine precision). HVPs: columns through
    ``_matmat_batch``, the 2 of its determinism check at construction included."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    with counting(HessianLinearOperator, "_matmat_batch", matmat_columns) as count:
        op = curvlinops_operator(model, batch)
        v0 = np.random.default_rng(0).standard_normal(op.shape[0])
        values = eigsh(op.to_scipy(), k=k, which="LA", v0=v0, return_eigenvectors=False, **knob)
    return values, count[0]


def trainprobe_top(model: nn.Module, batch: Batch, k: int, **knob: Any):
    """``trainprobe`` Lanczos on ``hessian_operator(engine="auto")`` (knob: ``value_tol``,
    the eigenvalue tolerance relative to each eigenvalue; default 1e-6). HVPs:
    ``pairs.matvecs`` (a float64 refinement's products included)."""
    op = hessian_operator(model, criterion_loss(criterion()), batch=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged: the error column shows it
        pairs = lanczos(op, op.dim, top=k, generator=torch.Generator().manual_seed(0), **knob)
    return pairs.values.numpy(), pairs.matvecs


@dataclass(frozen=True)
class EigenMethod:
    """A library's top-k algorithm and its accuracy knob's ladder (loose to tight)."""

    library: str  # "trainprobe" or a key of PEERS
    run: Callable[..., tuple[Any, int]]
    knob: str  # what the knob is, for the report
    ladder: Callable[[int, bool], list[dict]]  # (k, quick) -> knob settings to try


HALF_DECADES = tuple(10 ** (-e / 2) for e in range(2, 19))  # 1e-1, 3.2e-2, ..., 1e-9


def _tols(low: float, high: float, quick: bool) -> list[float]:
    """Half-decades from ``high`` down to ``low`` (whole decades with ``--quick``)."""
    steps = HALF_DECADES[::2] if quick else HALF_DECADES
    return [float(f"{t:.1g}") for t in steps if low <= t * (1 + 1e-9) and t <= high * (1 + 1e-9)]


def _power_ladder(iters: str) -> Callable[[int, bool], list[dict]]:
    """Power iteration: ``tol`` 1e-4 .. 1e-8, the iteration cap raised to 500 (200 quick)."""
    return lambda k, quick: [
        {"tol": t, iters: 200 if quick else 500} for t in _tols(1e-8, 1e-4, quick)
    ]


def _lanczos_sizes(k: int, quick: bool) -> list[dict]:
    sizes = (5, 10, 15, 20, 25, 30, 35, 40, 50, 60, 80, 100, 120, 160)
    return [{"max_iter": m, "reorthogonalize": True} for m in sizes if m >= k]


METHODS: dict[str, EigenMethod] = {
    "pyhessian power": EigenMethod(
        "pyhessian", pyhessian_top, "tol, maxIter (defaults 1e-3, 100)", _power_ladder("maxIter")
    ),
    "eigenthings lanczos": EigenMethod(
        "hessian-eigenthings",
        eigenthings_lanczos_top,
        "max_iter (default 2k; full reorthogonalisation kept on)",
        _lanczos_sizes,
    ),
    "eigenthings power": EigenMethod(
        "hessian-eigenthings",
        eigenthings_power_top,
        "tol, max_iter (defaults 1e-4, 100)",
        _power_ladder("max_iter"),
    ),
    "curvlinops eigsh": EigenMethod(
        "curvlinops",
        curvlinops_top,
        "ARPACK tol (default 0: machine precision)",
        lambda k, quick: [{"tol": t} for t in _tols(1e-6, 1e-1, quick)],
    ),
    "trainprobe lanczos": EigenMethod(
        "trainprobe",
        trainprobe_top,
        "value_tol (default 1e-6, relative to each eigenvalue)",
        lambda k, quick: [{"value_tol": t} for t in _tols(1e-8, 1e-3, quick)],
    ),
}


# ---------------------------------------------------------------------------------------
# running configurations: fresh model copy each call, timed, errors kept


@dataclass
class Config:
    """One timed configuration: a method with fixed knob settings."""

    method: str
    setting: str  # "defaults" or "tuned"
    knob: dict
    run: Callable[[nn.Module, Batch], tuple[Any, int]]
    seconds: list[float] = field(default_factory=list)
    hvps: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    error: str | None = None
    max_seconds: float = math.inf  # no 4th or later run once its runs took this long in all


def call(run: Callable[[nn.Module, Batch], tuple[Any, int]], case: Case) -> tuple:
    """``(seconds, values, hvps)`` of ``run`` on a fresh copy of the case's model."""
    model = copy.deepcopy(case.model)
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peers' chatter; accuracy is in the error column
        start = time.perf_counter()
        values, hvps = run(model, case.batch)
        seconds = time.perf_counter() - start
    return seconds, values, hvps


def attempt(config: Config, case: Case) -> None:
    """Run ``config`` once, recording its time, values and HVPs, or its failure."""
    slow = len(config.seconds) >= 3 and sum(config.seconds) > config.max_seconds
    if config.error is not None or slow:
        return  # failed, or slow enough that 3 repetitions must do (the row says how many)
    try:
        seconds, values, hvps = call(config.run, case)
    except Exception as err:  # a peer failing is a result, not a crash
        config.error = f"{type(err).__name__}: {err}".splitlines()[0][:120]
        return
    config.seconds.append(seconds)
    config.hvps.append(hvps)
    config.values.append(values)


def interleave(
    configs: list,
    case: Case,
    reps: int,
    step: Callable[[Any, Case], None],
    shuffler: random.Random | None = None,
) -> None:
    """``reps`` rounds; each round runs every config once, in a fresh shuffled order."""
    order = list(configs)
    shuffler = shuffler or random.Random(0)
    for _ in range(reps):
        shuffler.shuffle(order)
        for config in order:
            step(config, case)


def runner(method: EigenMethod, k: int, knob: dict) -> Callable[[nn.Module, Batch], tuple]:
    return lambda model, batch: method.run(model, batch, k, **dict(knob))


def trial(name: str, k: int, knob: dict, case: Case) -> dict:
    """One untimed run of a setting: its HVPs and error, or why it failed."""
    try:
        _, values, hvps = call(runner(METHODS[name], k, knob), case)
    except Exception as err:  # a failing setting is part of the trail
        return {"knob": knob, "error": f"{type(err).__name__}: {err}".splitlines()[0][:120]}
    return {"knob": knob, "hvps": hvps, "max_rel_error": max_rel_error(values, case.top_ref[:k])}


def calibrate(name: str, k: int, case: Case, quick: bool) -> tuple[dict, list[dict]]:
    """The setting to time as "tuned", and the trail of settings tried.

    The defaults first, then the ladder loose to tight, until a setting reaches
    ``TARGET_REL`` or the error has stalled: two steps running that cost more HVPs than
    the best setting so far without halving its error. Tuned: the cheapest (fewest HVPs)
    setting that reached ``TARGET_REL``, else the most accurate one tried.
    """
    trail, stalls = [trial(name, k, {}, case)], 0
    for knob in METHODS[name].ladder(k, quick):
        best = min(trail[1:], key=lambda t: t.get("max_rel_error", math.inf), default=None)
        trail.append(trial(name, k, knob, case))
        error = trail[-1].get("max_rel_error", math.inf)
        if error <= TARGET_REL:
            break
        stalled = best is not None and "hvps" in best and error > 0.5 * best["max_rel_error"]
        stalls = stalls + 1 if stalled and trail[-1].get("hvps", 0) > best["hvps"] else 0
        if stalls == 2:
            break
    done = [t for t in trail if "hvps" in t]
    accurate = [t for t in done if t["max_rel_error"] <= TARGET_REL]
    if accurate:
        return min(accurate, key=lambda t: t["hvps"])["knob"], trail
    return (min(done, key=lambda t: t["max_rel_error"])["knob"] if done else {}), trail


def eigen_configs(
    case: Case, k: int, peers: dict, args: argparse.Namespace
) -> tuple[list[Config], dict]:
    """Defaults and tuned configurations of every available method, and calibration trails.

    When the defaults are the tuned setting, one configuration carries both labels.
    """
    configs, trails = [], {}
    for name, method in METHODS.items():
        if method.library != "trainprobe" and not peers[method.library].startswith("ok"):
            continue
        tuned, trails[name] = calibrate(name, k, case, args.quick)
        label = "defaults" if tuned else "defaults=tuned"
        configs.append(Config(name, label, {}, runner(method, k, {}), max_seconds=args.max_seconds))
        if tuned:
            configs.append(
                Config(name, "tuned", tuned, runner(method, k, tuned), max_seconds=args.max_seconds)
            )
    return configs, trails


def summarize_eigen(config: Config, ref: np.ndarray) -> dict:
    """Table row: HVPs, median/min/max seconds, worst relative error over repetitions."""
    row = {"method": config.method, "setting": config.setting, "knob": config.knob}
    if config.error is not None or not config.seconds:
        return row | {"error": config.error or "not run"}
    seconds = np.array(config.seconds)
    return row | {
        "hvps": int(np.median(config.hvps)),
        "hvps_range": [min(config.hvps), max(config.hvps)],
        "median_s": float(np.median(seconds)),
        "min_s": float(seconds.min()),
        "max_s": float(seconds.max()),
        "reps": len(seconds),
        "max_rel_error": max(max_rel_error(v, ref) for v in config.values),
    }


def eigen_task(case: Case, k: int, peers: dict, args: argparse.Namespace) -> dict:
    """Calibrate, then time every configuration for the top-``k`` eigenvalues."""
    configs, trails = eigen_configs(case, k, peers, args)
    interleave(configs, case, args.reps, attempt)
    rows = [summarize_eigen(c, case.top_ref[:k]) for c in configs]
    return {"k": k, "rows": rows, "calibration": trails}


# ---------------------------------------------------------------------------------------
# trace at a fixed HVP budget


def pyhessian_trace(model: nn.Module, batch: Batch, seed: int, **knob: Any) -> tuple:
    """PyHessian's Hutchinson, ``maxIter`` = budget; ``tol`` its early stop (default 1e-3)."""
    ph = importlib.import_module("pyhessian.hessian")
    torch.manual_seed(seed)
    with counting(ph, "hessian_vector_product", one) as count:
        samples = ph.hessian(model, criterion(), data=batch, cuda=False).trace(
            maxIter=TRACE_BUDGET, **knob
        )
    return float(np.mean(samples)), count[0]


def eigenthings_trace(model: nn.Module, batch: Batch, seed: int, method: str) -> tuple:
    """hessian-eigenthings ``trace(method=...)`` with ``num_matvecs`` = budget."""
    from hessian_eigenthings import trace as he_trace

    op = eigenthings_operator(model, batch)
    with counting(op, "_hvp_autograd", one) as count:
        result = he_trace(op, num_matvecs=TRACE_BUDGET, method=method, seed=seed)
    return result.estimate, count[0]


def curvlinops_trace(model: nn.Module, batch: Batch, seed: int, method: str) -> tuple:
    """curvlinops ``hutchinson_trace`` (budget) or ``hutchpp_trace`` (budget rounded down
    to a multiple of 3, as it requires); construction's 2 check HVPs counted."""
    from curvlinops import HessianLinearOperator, hutchinson_trace, hutchpp_trace

    torch.manual_seed(seed)  # its probes come from the global RNG
    with counting(HessianLinearOperator, "_matmat_batch", matmat_columns) as count:
        op = curvlinops_operator(model, batch)
        if method == "hutchinson":
            value = hutchinson_trace(op, TRACE_BUDGET)
        else:
            value = hutchpp_trace(op, TRACE_BUDGET - TRACE_BUDGET % 3)
    return float(value), count[0]


def trainprobe_trace(model: nn.Module, batch: Batch, seed: int, method: str) -> tuple:
    """``trainprobe.curvature.trace(method=...)`` with ``matvecs`` = budget."""
    op = hessian_operator(model, criterion_loss(criterion()), batch=batch)
    gen = torch.Generator().manual_seed(seed)
    estimate = trace(op, op.dim, matvecs=TRACE_BUDGET, method=method, generator=gen)
    return estimate.value, op.matvecs


TRACE_METHODS: dict[str, tuple[str, Callable[[nn.Module, Batch, int], tuple]]] = {
    "pyhessian hutchinson (defaults)": ("pyhessian", pyhessian_trace),
    "pyhessian hutchinson (tol=0)": ("pyhessian", partial(pyhessian_trace, tol=0.0)),
    "eigenthings hutchinson": (
        "hessian-eigenthings",
        partial(eigenthings_trace, method="hutchinson"),
    ),
    "eigenthings hutch++": ("hessian-eigenthings", partial(eigenthings_trace, method="hutch++")),
    "curvlinops hutchinson": ("curvlinops", partial(curvlinops_trace, method="hutchinson")),
    "curvlinops hutch++": ("curvlinops", partial(curvlinops_trace, method="hutch++")),
    "trainprobe hutchinson": ("trainprobe", partial(trainprobe_trace, method="hutchinson")),
    "trainprobe hutch++": ("trainprobe", partial(trainprobe_trace, method="hutch++")),
}


def trace_task(case: Case, peers: dict, args: argparse.Namespace) -> list[dict]:
    """Every available estimator over ``args.seeds`` seeds (interleaved): relative errors."""
    configs = [
        Config(name, "budget", {}, run)
        for name, (library, run) in TRACE_METHODS.items()
        if library == "trainprobe" or peers[library].startswith("ok")
    ]
    shuffler = random.Random(0)
    for seed in range(args.seeds):
        for config in configs:
            config.run = _seeded(TRACE_METHODS[config.method][1], seed)
        interleave(configs, case, 1, attempt, shuffler)
    rows = []
    for config in configs:
        if config.error is not None:
            rows.append({"method": config.method, "error": config.error})
            continue
        errors = np.abs(np.array(config.values) - case.trace_ref) / abs(case.trace_ref)
        rows.append(
            {
                "method": config.method,
                "hvps": int(np.median(config.hvps)),
                "hvps_range": [min(config.hvps), max(config.hvps)],
                "median_rel_error": float(np.median(errors)),
                "max_rel_error": float(errors.max()),
                "seeds": len(errors),
                "median_s": float(np.median(config.seconds)),
            }
        )
    return rows


def _seeded(run: Callable, seed: int) -> Callable[[nn.Module, Batch], tuple]:
    return lambda model, batch: run(model, batch, seed)


# ---------------------------------------------------------------------------------------
# engines: one HVP vs one gradient, and batched HVPs


def gradient_seconds(model: nn.Module, batch: Batch) -> float:
    """One plain ``torch.autograd.grad`` of the batch loss (the training step's backward)."""
    x, y = batch
    params = list(model.parameters())
    start = time.perf_counter()
    torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return time.perf_counter() - start


def engine_round(case: Case, engine: str, widths: tuple[int, ...]) -> dict[str, Any]:
    """Seconds to build the operator, of one ``matvec`` and of one ``matmat`` per width
    (each timed after one untimed call of the same shape); a failure ends the round
    and is kept under ``"error"``."""
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _engine_timings(case, engine, widths, gen, out)
    notes = sorted(
        {
            str(w.message).splitlines()[0][:160]
            for w in caught
            if "trainprobe" in w.filename or "curvature.py" in w.filename
        }
    )  # ours only
    if notes:
        out["warning"] = "; ".join(notes)
    return out


def _engine_timings(
    case: Case, engine: str, widths: tuple[int, ...], gen: torch.Generator, out: dict[str, Any]
) -> None:
    """Fill ``out`` with the round's timings (see :func:`engine_round`)."""
    try:
        loss_fn = criterion_loss(criterion())  # a new closure: its first build is checked
        start = time.perf_counter()
        op = hessian_operator(case.model, loss_fn, batch=case.batch, engine=engine)
        out["build"] = time.perf_counter() - start
        start = time.perf_counter()  # the same model and closure again, as a probe's next
        hessian_operator(case.model, loss_fn, batch=case.batch, engine=engine)
        out["rebuild"] = time.perf_counter() - start
        op.batched = True  # time the vmapped matmat itself (the CPU default loops: see hvp.py)
        for k in (1, *widths):
            vs = torch.randn(op.dim, k, generator=gen)
            apply, arg = (op.matvec, vs[:, 0]) if k == 1 else (op.matmat, vs)
            apply(arg)
            start = time.perf_counter()
            apply(arg)
            out["matvec" if k == 1 else f"matmat{k}"] = time.perf_counter() - start
    except Exception as err:  # an engine failing on a model is a result
        out["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:160]


def bookkeeping_round(case: Case, k: int) -> dict[str, float]:
    """One default top-``k`` Lanczos on a built operator: its wall time and the time
    spent inside the operator's products (the rest is the Lanczos bookkeeping)."""
    op = hessian_operator(case.model, criterion_loss(criterion()), batch=case.batch)
    inside = [0.0]
    matmat = op.matmat

    def timed_matmat(vs: Tensor) -> Tensor:
        start = time.perf_counter()
        out = matmat(vs)
        inside[0] += time.perf_counter() - start
        return out

    op.matmat = timed_matmat  # matvec goes through matmat
    start = time.perf_counter()
    pairs = lanczos(op, op.dim, top=k, generator=torch.Generator().manual_seed(0))
    total = time.perf_counter() - start
    return {"total": total, "products": inside[0], "hvps": float(pairs.matvecs)}


def engine_row(rounds: list[dict], grad: float, widths: tuple[int, ...]) -> dict:
    """Medians over rounds and the ratios (those whose timings exist)."""
    keys = [key for key in rounds[0] if key not in ("error", "warning")]
    med = {key: float(np.median([r[key] for r in rounds if key in r])) for key in keys}
    row: dict[str, Any] = {"median_s": med}
    for key in ("error", "warning"):
        seen = sorted({r[key] for r in rounds if key in r})
        if seen:
            row[key] = "; ".join(seen)
    if "build" in med:
        row["build_per_gradient"] = med["build"] / grad
    if "rebuild" in med:
        row["rebuild_per_gradient"] = med["rebuild"] / grad
    if "matvec" in med:
        row["hvp_per_gradient"] = med["matvec"] / grad
        for k in widths:
            if f"matmat{k}" in med:
                row[f"speedup_k{k}"] = k * med["matvec"] / med[f"matmat{k}"]
    return row


def engine_task(case: Case, args: argparse.Namespace) -> dict:
    """Interleaved rounds of the gradient and every engine; medians and ratios."""
    widths = (8, 16)
    samples: dict[str, list[dict]] = {name: [] for name in ("gradient", *ENGINES)}
    order = list(samples)
    shuffler = random.Random(0)
    gradient_seconds(case.model, case.batch)  # warm-up
    for _ in range(args.engine_reps):
        shuffler.shuffle(order)
        for name in order:
            gc.collect()
            samples[name].append(
                {"gradient": gradient_seconds(case.model, case.batch)}
                if name == "gradient"
                else engine_round(case, name, widths)
            )
    grad = float(np.median([s["gradient"] for s in samples["gradient"]]))
    auto = hessian_operator(case.model, criterion_loss(criterion()), batch=case.batch).engine
    rows = {engine: engine_row(samples[engine], grad, widths) for engine in ENGINES}
    books = [bookkeeping_round(case, max(TOPS)) for _ in range(args.engine_reps)]
    share = [(b["total"] - b["products"]) / b["products"] for b in books]
    bookkeeping = {
        "k": max(TOPS),
        "share_of_products": float(np.median(share)),
        "ms_per_step": float(np.median([(b["total"] - b["products"]) / b["hvps"] for b in books]))
        * 1e3,
        "product_ms": float(np.median([b["products"] / b["hvps"] for b in books])) * 1e3,
    }
    return {
        "gradient_s": grad,
        "auto": auto,
        "engines": rows,
        "reps": args.engine_reps,
        "bookkeeping": bookkeeping,
    }


# ---------------------------------------------------------------------------------------
# targets


def defaults_row(task: dict, method: str) -> dict:
    """The row timed as ``method``'s defaults."""
    settings = ("defaults", "defaults=tuned")
    return next((r for r in task["rows"] if r["method"] == method and r["setting"] in settings), {})


def case_targets(name: str, result: dict) -> list[dict]:
    """The issue's targets for one case, from its measurements (``trainprobe`` at its
    defaults; each peer at its fastest setting that reaches ``TARGET_REL``)."""
    out = []
    cap5 = 30 if name == "mlp" else 55
    for task in result["eigen"]:
        k = task["k"]
        ours = defaults_row(task, "trainprobe lanczos")
        cap = 10 if k == 1 else cap5
        out.append(_target(f"{name} top-{k} HVPs <= {cap}", ours.get("hvps"), cap))
        out.append(
            _target(
                f"{name} top-{k} max rel error <= {TARGET_REL:g} (defaults)",
                ours.get("max_rel_error"),
                TARGET_REL,
            )
        )
        accurate = [
            r
            for r in task["rows"]
            if not r["method"].startswith("trainprobe")
            and r.get("max_rel_error", math.inf) <= TARGET_REL
        ]
        best = min(accurate, key=lambda r: r["median_s"], default=None)
        mine = ours.get("median_s")
        ratio = None if best is None or mine is None else mine / best["median_s"]
        ran = any(not r["method"].startswith("trainprobe") and "hvps" in r for r in task["rows"])
        label = (
            f"{best['method']} ({best['setting']})"
            if best is not None
            else "no peer reached 1e-6"
            if ran
            else "no peer ran"
        )
        out.append(
            _target(f"{name} top-{k} time <= 0.5x fastest accurate peer [{label}]", ratio, 0.5)
        )
    engines = result["engines"]
    auto = engines["engines"][engines["auto"]].get("hvp_per_gradient")
    out.append(_target(f"{name} one HVP <= 2x one gradient (auto = {engines['auto']!r})", auto, 2))
    books = engines.get("bookkeeping", {})
    out.append(
        _target(
            f"{name} Lanczos bookkeeping <= 10% of the products' time (top-{books.get('k')})",
            books.get("share_of_products"),
            0.10,
        )
    )
    pp = next((r for r in result["trace"] if r["method"] == "trainprobe hutch++"), {})
    out.append(
        _target(
            f"{name} trace median |rel error| <= 1% at {TRACE_BUDGET} HVPs (hutch++)",
            pp.get("median_rel_error"),
            0.01,
        )
    )
    return out


def _target(what: str, measured: float | None, limit: float) -> dict:
    verdict = "n/a" if measured is None else ("PASS" if measured <= limit else "MISS")
    return {"target": what, "measured": measured, "limit": limit, "verdict": verdict}


# ---------------------------------------------------------------------------------------
# report


def fmt_knob(knob: dict) -> str:
    """``tol=1e-06, maxIter=500``; ``reorthogonalize=True`` shown as ``reorth``."""
    return (
        ", ".join(
            "reorth"
            if k == "reorthogonalize" and v
            else f"{k}={v:g}"
            if isinstance(v, float)
            else f"{k}={v}"
            for k, v in knob.items()
        )
        or "defaults"
    )


def print_case_header(case: Case) -> None:
    info, noise = case.info, case.info["float32_noise"]
    ref = info["reference_lanczos"]
    print(
        f"\n== {case.name}: {case.description}, {case.dim:,} parameters, batch "
        f"{case.batch[0].shape[0]} of {info['data']}, float32 (train loss "
        f"{info['train_loss']:.3f} after {info['train_steps']} SGD steps)"
    )
    print(
        f"reference top-{max(TOPS)} (float64 Lanczos, tol 1e-12, {ref['hvps']} HVPs): "
        + ", ".join(f"{v:.10g}" for v in case.top_ref)
    )
    print(
        f"exact trace (float64 Hessian diagonal, {case.diagonal.__name__}): "
        f"{case.trace_ref:.10g}; diagonal spot check vs HVPs: {info['diagonal_spot_check']:.1e}"
    )
    print(
        f"float32 noise floor: one HVP {noise['hvp_rel_error']:.1e} relative; float32 Lanczos "
        f"at tol 1e-10: max rel error {noise['lanczos_max_rel_error']:.1e} on the top-"
        f"{max(TOPS)}"
    )


def print_eigen(task: dict) -> None:
    print(f"\ntop-{task['k']} eigenvalues")
    print(
        f"  {'method':<20} {'setting':<14} {'knob':<26} {'HVPs':>5} {'reps':>4} "
        f"{'median s':>9} {'min..max s':>15} {'max rel err':>11}"
    )
    for row in task["rows"]:
        head = f"  {row['method']:<20} {row['setting']:<14} {fmt_knob(row['knob']):<26}"
        if "error" in row:
            print(f"{head} failed: {row['error']}")
            continue
        print(
            f"{head} {row['hvps']:>5} {row['reps']:>4} {row['median_s']:>9.3f} "
            f"{row['min_s']:>7.3f}..{row['max_s']:<7.3f} {row['max_rel_error']:>11.1e}"
        )


def print_calibration(task: dict) -> None:
    """One line per method: ``setting HVPs/error`` for every setting tried."""
    print(f"  calibration, top-{task['k']} (setting: HVPs / max rel error):")
    for name, trail in task["calibration"].items():
        steps = [
            f"{fmt_knob(t['knob'])}: "
            + (f"{t['hvps']}/{t['max_rel_error']:.0e}" if "hvps" in t else "failed")
            for t in trail
        ]
        print(f"    {name} [{METHODS[name].knob}]: " + "; ".join(steps))


def print_trace(rows: list[dict], case: Case) -> None:
    print(f"\ntrace at {TRACE_BUDGET} HVPs (exact {case.trace_ref:.6g})")
    print(
        f"  {'method':<34} {'HVPs':>5} {'seeds':>5} {'median |rel err|':>17} {'max':>8} "
        f"{'median s':>9}"
    )
    for row in rows:
        if "error" in row:
            print(f"  {row['method']:<34} failed: {row['error']}")
            continue
        print(
            f"  {row['method']:<34} {row['hvps']:>5} {row['seeds']:>5} "
            f"{row['median_rel_error']:>17.2%} {row['max_rel_error']:>8.2%} "
            f"{row['median_s']:>9.3f}"
        )


def print_engines(result: dict) -> None:
    print(
        f"\nengines (one gradient {result['gradient_s'] * 1e3:.2f} ms; auto picks "
        f"{result['auto']!r}; {result['reps']} interleaved rounds, medians)"
    )
    print(
        f"  {'engine':<10} {'build/grad':>10} {'again/grad':>10} {'HVP/grad':>9} {'HVP ms':>8} "
        f"{'matmat8 speed-up':>17} {'matmat16 speed-up':>18}"
    )

    def cell(row: dict, key: str, width: int, unit: str = "") -> str:
        return f"{row[key]:>{width}.2f}{unit}" if key in row else f"{'-':>{width}}{unit and ' '}"

    for engine, row in result["engines"].items():
        hvp_ms = {"ms": row["median_s"]["matvec"] * 1e3} if "matvec" in row["median_s"] else {}
        print(
            f"  {engine:<10} {cell(row, 'build_per_gradient', 10)} "
            f"{cell(row, 'rebuild_per_gradient', 10)} "
            f"{cell(row, 'hvp_per_gradient', 9)} {cell(hvp_ms, 'ms', 8)} "
            f"{cell(row, 'speedup_k8', 16, 'x')} {cell(row, 'speedup_k16', 17, 'x')}"
            + (f"  failed: {row['error']}" if "error" in row else "")
        )
        if "warning" in row:
            print(f"  {'':<10} warned: {row['warning']}")
    books = result.get("bookkeeping")
    if books:
        print(
            f"  Lanczos top-{books['k']} (defaults): bookkeeping {books['ms_per_step']:.3f} ms a "
            f"step against {books['product_ms']:.3f} ms a product: "
            f"{100 * books['share_of_products']:.1f}% of the products' time"
        )


def print_report(result: dict, cases: list[Case]) -> None:
    for case in cases:
        one_case = result["cases"][case.name]
        print_case_header(case)
        for task in one_case["eigen"]:
            print_eigen(task)
            print_calibration(task)
        print_trace(one_case["trace"], case)
        print_engines(one_case["engines"])
    print("\ntargets")
    for target in result["targets"]:
        value = target["measured"]
        shown = "-" if value is None else f"{value:.3g}"
        print(f"  {target['verdict']:<4}  {target['target']}: {shown}")


# ---------------------------------------------------------------------------------------
# main


def run_case(
    name: str, data: tuple[Tensor, Tensor, str], peers: dict, args: argparse.Namespace
) -> tuple[Case, dict]:
    """Train the case's model, build its references, run every task on it."""
    models = {"mlp": lambda: tanh_mlp((64, 128, 128, 10)), "cnn": small_cnn}
    torch.manual_seed(args.seed)
    case = make_case(name, models[name](), data, args)
    build_references(case, args)
    print(f"{name}: references ready ({case.info['reference_seconds']:.1f} s)", flush=True)
    eigen = []
    for k in TOPS:
        eigen.append(eigen_task(case, k, peers, args))
        print(f"{name}: top-{k} done", flush=True)
    traces = trace_task(case, peers, args)
    print(f"{name}: trace done", flush=True)
    return case, {
        "eigen": eigen,
        "trace": traces,
        "engines": engine_task(case, args),
        "info": case.info,
        "top_ref": case.top_ref.tolist(),
        "trace_ref": case.trace_ref,
    }


def measure(args: argparse.Namespace) -> tuple[dict, list[Case]]:
    """Peers, reference checks, then every case; the result and the cases."""
    peers = peer_status()
    for peer, status in peers.items():
        print(f"peer {peer}: {status}")
    data = digits(args.train_size, seed=args.seed)
    checks = check_references(data, args)
    for name, check in checks.items():
        print(
            f"reference check on {name} ({check['dim']} params, dense torch.func.hessian): "
            f"Lanczos vs eigvalsh {check['lanczos_vs_eigvalsh']:.1e}, exact diagonal vs "
            f"dense {check['diagonal_vs_dense']:.1e}: "
            + (
                "ok (<= 1e-10)"
                if max(check["lanczos_vs_eigvalsh"], check["diagonal_vs_dense"]) <= 1e-10
                else "FAILED (> 1e-10): the references are not exact"
            ),
            flush=True,
        )
    cases, results = [], {}
    for name in args.models:
        case, results[name] = run_case(name, data, peers, args)
        cases.append(case)
    targets = [t for name in args.models for t in case_targets(name, results[name])]
    return {
        "peers": peers,
        "reference_checks": checks,
        "cases": results,
        "targets": targets,
        "settings": vars(args),
        "platform": platform_info(),
    }, cases


def platform_info() -> dict:
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 rep, 3 seeds")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CI has 2 cores)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="no 4th or later repetition of a configuration whose runs took this long in all",
    )
    parser.add_argument("--seeds", type=int, default=None, help="trace seeds (default 10)")
    parser.add_argument("--engine-reps", type=int, default=None, help="default 15")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--spot-checks", type=int, default=None, help="diagonal entries checked")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.reps = args.reps or (1 if quick else 5)
    args.seeds = args.seeds or (3 if quick else 10)
    args.engine_reps = args.engine_reps or (3 if quick else 15)
    args.spot_checks = args.spot_checks or (8 if quick else 32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result, cases = measure(args)
    result["seconds"] = time.perf_counter() - start
    print_report(result, cases)
    print(f"\n{result['seconds']:.0f} s in all")
    if args.out is not None:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
