"""The Hessian of an FSDP2 model (``fully_shard``: parameters are ``DTensor`` shards), by
finite differences of the gradients FSDP2 itself computes.

The exact engines evaluate the model as one function of all its parameters, which no
rank holds under FSDP2. Central differences need only gradients, and FSDP2 computes
those with its own collectives: each evaluation writes ``w ± h v`` into this rank's
shards in place, runs the user's loss forward and backward through the sharded model
(all-gathers, reduce-scatters), reads the local shard of every gradient and puts the
shards and the user's ``.grad`` back exactly as they were. Products are then those of
:mod:`.fd` (each with its own error estimate, refused over ``fd_tol``).

Vectors are full ``[P]`` on every rank, in the single-process order of the parameters
(``named_parameters``, each flattened row-major): FSDP2 shards dim 0, so a parameter's
flat vector is its ranks' shards one after another, and one all-gather per gradient
rebuilds it. Every rank thus runs the same Lanczos on the same numbers, and eigenvectors
come out in the usual layout. Memory: the Krylov vectors are ``P`` floats each on every
rank (the products' memory is the sharded model's own). Parameters FSDP2 leaves
replicated (``ignored_params``) enter once, their gradients averaged over the ranks as
the user's loop averages them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..functional import LossFn, Mode, NonFiniteLoss, check_loss_fn, default_batch_size
from ..functional.scopes import evaluation
from ..functional.shards import dtensor_type, local_part
from .fd import FD_TOL, CentralDifferences
from .hvp import sdpa_kernels
from .pieces import _pieces


class Collectives(Protocol):
    """What the operator needs of the process group (``trainprobe``'s ``Ranks`` has it)."""

    rank: int
    world: int

    def mean(self, tensor: Tensor) -> Tensor: ...

    def gather(self, vector: Tensor) -> Tensor: ...

    def gather_objects(self, value: Any) -> list[Any]: ...


class OneRank:
    """A process group of one (FSDP2 at world size 1, where ``watch`` sees no ranks): every
    collective is the identity."""

    rank, world = 0, 1

    def mean(self, tensor: Tensor) -> Tensor:
        return tensor

    def gather(self, vector: Tensor) -> Tensor:
        return vector.detach().to(torch.float64).reshape(1, -1)

    def gather_objects(self, value: Any) -> list[Any]:
        return [value]


class ShardLayout:
    """The flat order of FSDP2 parameters: ``names``, ``size`` (``P``), and ``flatten``
    of tensors shaped like the parameters (``DTensor`` shards or replicated) to ``[P]``."""

    def __init__(self, params: Mapping[str, Tensor], ranks: Collectives) -> None:
        kind = dtensor_type()
        self.names = tuple(params)
        self.ranks = ranks
        self.sharded = [kind is not None and isinstance(p, kind) for p in params.values()]
        for name, p, sharded in zip(self.names, params.values(), self.sharded, strict=True):
            if sharded:
                _check_placement(name, p, ranks.world)
        local = [local_part(p).numel() for p in params.values()]
        #: [world][param] elements each rank holds of each sharded parameter
        self.counts = [list(c) for c in ranks.gather_objects(local)]
        self.numels = [
            sum(row[i] for row in self.counts) if s else local[i]
            for i, s in enumerate(self.sharded)
        ]
        self.size = sum(self.numels)
        starts = [0] * len(self.names)  # where this rank's shard begins in each parameter
        for i, s in enumerate(self.sharded):
            if s:
                starts[i] = sum(self.counts[r][i] for r in range(ranks.rank))
        self.starts = starts

    def local_slices(self, vector: Tensor) -> list[Tensor]:
        """This rank's part of each parameter in ``vector [P]`` (flat views)."""
        out, offset = [], 0
        for i, numel in enumerate(self.numels):
            if self.sharded[i]:
                begin = offset + self.starts[i]
                out.append(vector[begin : begin + self.counts[self.ranks.rank][i]])
            else:
                out.append(vector[offset : offset + numel])
            offset += numel
        return out

    def gather(self, parts: list[Tensor]) -> Tensor:
        """``[P]`` from every rank's flat ``parts`` (one per parameter; replicated ones are
        taken from this rank): one all-gather of the sharded parts."""
        dtype, device = parts[0].dtype, parts[0].device
        mine = [p.reshape(-1) for p, s in zip(parts, self.sharded, strict=True) if s]
        width = max(sum(row[i] for i, s in enumerate(self.sharded) if s) for row in self.counts)
        local = torch.zeros(width, dtype=torch.float64, device=device)
        if mine:
            flat = torch.cat(mine)
            local[: flat.numel()] = flat
        rows = self.ranks.gather(local).to(device)  # [world, width] float64
        cursors = [0] * self.ranks.world
        pieces = []
        for i, part in enumerate(parts):
            if not self.sharded[i]:
                pieces.append(part.reshape(-1).to(torch.float64))
                continue
            for r in range(self.ranks.world):
                n = self.counts[r][i]
                pieces.append(rows[r, cursors[r] : cursors[r] + n])
                cursors[r] += n
        return torch.cat(pieces).to(dtype)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``[P]`` from tensors shaped like the parameters (e.g. Adam's second moments)."""
        return self.gather([local_part(tensors[n]).detach().reshape(-1) for n in self.names])


class ShardedHessian:
    """The Hessian of an FSDP2 model's loss, as an operator (module doc). Attributes as
    :class:`~trainprobe.curvature.HessianOperator`'s; ``engine`` is always ``"fd"``."""

    engine = "fd"
    reduce = None
    fallback = None
    attention = ""  # set by each evaluation (sdpa_kernels in its scope)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: Mapping[str, Tensor],
        pieces: list[tuple[Any, float]],
        ranks: Collectives,
        *,
        mode: Mode,
        fd_tol: float,
    ) -> None:
        self.model, self.loss_fn, self.pieces, self.ranks, self.mode = (
            model,
            loss_fn,
            pieces,
            ranks,
            mode,
        )
        self.params = list(params.values())
        self.layout = ShardLayout(params, ranks)
        self.dim = self.layout.size
        with torch.no_grad():  # views of the shards' storage, written in place
            self.locals = [local_part(p) for p in self.params]
        self.dtype, self.device = self.locals[0].dtype, self.locals[0].device
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"curvature under FSDP2 needs float32 or float64 parameters, got {self.dtype}: "
                "finite differences in half precision have no significant digits left"
            )
        self._saved = [t.detach().clone() for t in self.locals]
        self._buffers = [b.detach().clone() for b in model.buffers()]  # put back after each
        self.point = self.layout.gather([t.reshape(-1) for t in self._saved])  # [P]
        self.matvecs = 0
        loss, self.gradient = self._evaluate(self.point)
        self.loss = ranks.mean(loss)  # 0-d, the global batch's: the same on every rank
        if not bool(torch.isfinite(self.loss)):  # deliberate sync, once; every rank alike
            raise NonFiniteLoss(
                f"the loss combined over the ranks is {float(self.loss)} (at least one rank's "
                "batch gives it): its Hessian is undefined there; fix the NaN/inf in the model "
                "or data if it recurs"
            )
        self._fd = CentralDifferences(lambda w: self._evaluate(w)[1], self.point, tol=fd_tol)
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(self.dim, generator=gen, dtype=torch.float64).to(self.point)
        self._fd.calibrate(probe / probe.norm())
        self.fd_error: float | None = self._fd.error

    def _evaluate(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's loss (0-d) and the gradient ``[P]`` at ``w [P]``, through the
        sharded model; shards, ``.grad`` and buffers are put back as they were."""
        grads = [p.grad for p in self.params]
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        try:
            with torch.no_grad():
                for local, part in zip(self.locals, self.layout.local_slices(w), strict=True):
                    local.copy_(part.reshape(local.shape))
            for p in self.params:
                p.grad = None
            with evaluation(self.model, self.mode, self.device), torch.enable_grad():
                self.attention = sdpa_kernels()  # what the scope allows: "math"
                for batch, weight in self.pieces:
                    loss = weight * self.loss_fn(self.model, batch)
                    loss.backward()
                    total = total + loss.detach().to(self.dtype)
            parts = []
            triples = zip(self.params, self.locals, self.layout.sharded, strict=True)
            for p, local, sharded in triples:
                g = torch.zeros_like(local) if p.grad is None else local_part(p.grad).detach()
                parts.append((g if sharded else self.ranks.mean(g)).reshape(-1))
        finally:
            with torch.no_grad():
                for local, saved in zip(self.locals, self._saved, strict=True):
                    local.copy_(saved)
                for b, saved in zip(self.model.buffers(), self._buffers, strict=True):
                    b.copy_(saved)
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
        return total, self.layout.gather(parts)

    def matmat(self, vs: Tensor) -> Tensor:
        """``H V`` for ``V [P, k]``; the same on every rank (every rank must call it)."""
        if vs.ndim != 2 or vs.shape[0] != self.dim:
            raise ValueError(f"matmat: expected a [{self.dim}, k] matrix, got {tuple(vs.shape)}")
        out = self._fd.products(vs.detach().to(device=self.device, dtype=self.dtype))
        self.fd_error = self._fd.error
        self.matvecs += vs.shape[1]
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v [P]``."""
        if v.ndim != 1 or v.shape[0] != self.dim:
            raise ValueError(f"matvec: expected a [{self.dim}] vector, got {tuple(v.shape)}")
        return self.matmat(v.reshape(-1, 1)).reshape(-1)


def sharded_hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    ranks: Collectives,
    *,
    batch: Any = None,
    batches: Iterable[Any] | None = None,
    mode: Mode = "eval",
    reduction: str = "mean",
    batch_size: Callable[[Any], int] = default_batch_size,
    fd_tol: float = FD_TOL,
) -> ShardedHessian:
    """The Hessian of ``loss_fn`` in ``params`` of an FSDP2 model (module doc).

    Args:
        model: the sharded model (its parameters are not changed; its ``.grad`` is put back).
        loss_fn: ``loss(model, batch) -> scalar``, called through the sharded model on
            every rank.
        params: the trainable parameters by name, ``DTensor`` shards (dim 0, one mesh over
            every rank) or replicated tensors.
        ranks: the process group's collectives; every rank must make the same calls.
        batch, batches: this rank's data (a rank's share of the global batch: FSDP2
            averages the gradients over ranks, so the Hessian is the global batch's).
        mode, reduction, batch_size, fd_tol: as :func:`~trainprobe.curvature.hessian_operator`.
    """
    check_loss_fn(loss_fn)
    if not params:
        raise ValueError("no parameters to take the Hessian in")
    first = local_part(next(iter(params.values())))
    pieces = _pieces(batch, batches, reduction, batch_size, first.device, first.dtype)
    return ShardedHessian(model, loss_fn, params, pieces, ranks, mode=mode, fd_tol=fd_tol)


def _check_placement(name: str, param: Any, world: int) -> None:
    from torch.distributed.tensor import Shard

    mesh = param.device_mesh
    if mesh.ndim != 1 or mesh.size() != world or tuple(param.placements) != (Shard(0),):
        raise ValueError(
            f"curvature under FSDP2 supports parameters sharded on dim 0 over one mesh of "
            f"all {world} ranks (fully_shard's default); '{name}' has placements "
            f"{tuple(param.placements)} on a mesh of shape {tuple(mesh.shape)}: leave the "
            "curvature probes out of this job, or measure saved checkpoints in one process"
        )
