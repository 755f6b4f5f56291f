"""Lanczos with full reorthogonalisation: extreme eigenpairs of a symmetric operator.

Takes an operator, never a model (DESIGN.md rule 1): a dense symmetric ``[n, n]``
tensor or any callable ``v [n] -> A v [n]`` (a Hessian-vector product, say).
The iteration stops as soon as every wanted eigenvalue is known to the accuracy
asked for, each relative to itself (Paige 1971; Golub & Van Loan, *Matrix
Computations*, §10.1; Parlett, *The Symmetric Eigenvalue Problem*, §11.7).

**Precision contract.** Products run in the operator's dtype. The projected matrix
``T``, the scalars ``α``/``β`` and the small eigenproblem are float64 on the host. The
Krylov basis is stored in ``storage`` (float64 for a float64 operator, else float32;
bfloat16 on request), and reorthogonalised in that dtype (float32 for bfloat16 storage,
upcast a slice at a time): one local three-term step, then one projection against the
whole basis as two matrix-vector products, repeated only when it removed over half of
the vector's norm (Kahan–Parlett "twice is enough": it then always is). The out-of-band
part of that projection, ``q_iᵀ (A q_j) − T_ij`` (zero for an exact operator), is the
operator's own rounding as the Krylov space sees it: ``FLOOR_FACTOR`` times its RMS is
the *floor* below which no eigenvalue error can be certified. Where a wanted
eigenvalue's tolerance lies under that floor (float32 products and a small eigenvalue),
the converged Ritz vectors are refined by one Rayleigh–Ritz step with a float64
operator (``refine=``; automatic for dense tensors and
:class:`~.hvp.HessianOperator`), and the result says so. The floor sees rounding noise,
not a consistent difference between precisions: a float32 forward of a ReLU network
can differ from its float64 forward near a kink (measured: 6.6e-6 on one eigenvalue of
a CNN, ``benchmarks/README.md``), and that operator is then solved exactly as given.

**Memory.** The basis holds at most ``m`` vectors; ``max_memory=`` chooses ``m`` and
the storage, and when ``m`` is smaller than the iteration needs, Lanczos restarts
thick (Wu & Simon 2000): it keeps the wanted and guard Ritz vectors and half of the
rest, and goes on from the residual. The bytes it holds, beyond the operator's own::

    n · (m · b + 3 · c)      during the iteration
    n · (k + g) · c          the Ritz vectors returned (k wanted, g guard)

with ``b`` the storage's bytes per element (8, 4 or 2) and ``c`` the reorthogonalisation
dtype's (8 or 4), plus one slice of ``CHUNK`` elements in the compute dtype (16 MiB)
for bfloat16 storage or offloading. With ``offload=True`` the ``m · b`` term lives in
(pinned) host memory and slices stream to the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..notices import warn_user
from .operator import Operator, as_matmat, as_matvec, operator_placement


@dataclass(frozen=True)
class Eigenpairs:
    """Ritz pairs returned by :func:`lanczos`.

    Attributes:
        values: ``[k]`` float64: the wanted eigenvalues, largest first, then the
            most negative ones (``top`` then ``bottom``).
        vectors: ``[n, k]`` unit eigenvectors (sign arbitrary), one column per value, in
            the reorthogonalisation dtype (float64 for a float64 operator, else float32;
            float64 when refined).
        residuals: ``[k]`` ``||A y - θ y||`` of each pair (Lanczos' cheap formula
            ``β_m |s_{m,i}|``; with a float64 operator's products when ``refined``).
        matvecs: operator applications used (the refinement's included).
        converged: whether every wanted pair met the stopping rule.
        guard_vectors: ``[n, g]`` Ritz vectors of the guard pairs (``guard`` beyond each
            wanted end, not returned as values), or None. Pass
            ``torch.cat([vectors, guard_vectors], 1)`` as the next ``start`` when
            tracking: a warm start that already holds the neighbours certifies the
            gap in a few products (a start from the wanted vectors alone must find
            them again first).
        errors: ``[k]`` float64 absolute eigenvalue-error estimates: the larger of
            ``r_i² / δ_i`` (:func:`gap_bounds`) and ``floor``.
        floor: how far the operator's rounding, as the Krylov basis sees it, leaves an
            eigenvalue uncertain (absolute): ``FLOOR_FACTOR`` × the RMS of
            ``q_iᵀ A q_j − T_ij`` over the steps (zero for exact products). After a
            refinement it is still the first run's.
        refined: whether the values come from a float64 Rayleigh–Ritz step (see module doc).
        storage: the dtype the basis was stored in.
        restarts: thick restarts taken (0 when the basis never filled up).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    matvecs: int
    converged: bool
    guard_vectors: Tensor | None = None
    errors: Tensor | None = None
    floor: float = 0.0
    refined: bool = False
    storage: torch.dtype = torch.float64
    restarts: int = 0


WARM_NOISE = 1e-3
"""Share of a random direction mixed into a warm start (so new eigenvectors are found)."""
VALUE_TOL = 1e-6
"""Default eigenvalue tolerance of :func:`lanczos`, relative to each wanted eigenvalue."""
CHUNK = 1 << 22
"""Elements of one streamed slice of the basis (bfloat16 storage, offloading): 16 MiB."""
FLOOR_FACTOR = 8.0
"""The floor is this many times the RMS of the out-of-band projections: the largest
eigenvalue error seen per unit of that RMS was 6.8 (float32 Hessians of an MLP and a CNN,
a float32 dense matrix; ``benchmarks/curvature.py``)."""
AUTO_BUDGET_ABOVE = 1 << 30
"""A basis of every step larger than this (1 GiB) is kept within half the free memory."""
STORAGE_BYTES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 2}


def _start(
    dim: int,
    start: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Unit start vector ``[n]`` in ``dtype``: the given one(s) summed plus a little
    noise, or random."""
    generator = generator if generator is not None else torch.Generator()  # not the global RNG
    noise = torch.randn(dim, generator=generator, dtype=dtype).to(device)
    noise /= torch.linalg.vector_norm(noise)
    if start is None:
        return noise
    if start.shape[0] != dim or start.ndim not in (1, 2):
        raise ValueError(f"start must be [{dim}] or [{dim}, j], got {tuple(start.shape)}")
    guess = start.detach().to(device=device, dtype=dtype).reshape(dim, -1).sum(dim=1)
    norm = torch.linalg.vector_norm(guess)
    if not norm > 0:
        return noise
    # keep a small share of every direction, so an eigenvector new since then is found
    mixed = guess / norm + WARM_NOISE * noise  # [n]
    return mixed / torch.linalg.vector_norm(mixed)


def gap_bounds(theta: np.ndarray, residuals: np.ndarray, wanted: list[int]) -> np.ndarray:
    """Eigenvalue-error estimates ``r_i² / δ_i`` of the wanted Ritz pairs ``[k]``.

    ``δ_i = min_{j≠i} (|θ_i − θ_j| − r_j)``: the distance from ``θ_i`` to the rest of
    the spectrum as far as the Krylov space sees it, shrunk by each neighbour's own
    residual (an eigenvalue lies within ``r_j`` of every ``θ_j``). With ``δ_i`` a
    true gap this is the Kato–Temple bound ``|λ − θ_i| <= r_i² / δ_i`` (Parlett,
    *The Symmetric Eigenvalue Problem*, Thm 11.7.1). ``inf`` where ``δ_i <= 0`` or
    there is no other Ritz value.
    """
    theta, residuals = np.asarray(theta), np.asarray(residuals)
    idx = np.asarray(wanted, dtype=int)
    gaps = np.abs(theta[idx, None] - theta[None, :]) - residuals[None, :]  # [k, m]
    gaps[np.arange(len(idx)), idx] = np.inf  # not against itself
    delta = gaps.min(axis=1) if theta.size > 1 else np.full(len(idx), -1.0)
    with np.errstate(divide="ignore"):
        return np.where(delta > 0, residuals[idx] ** 2 / np.where(delta > 0, delta, 1), np.inf)


class _Basis:
    """The stored Krylov vectors ``Q [m, n]`` and the products against them."""

    def __init__(
        self, dim: int, capacity: int, device: torch.device, storage: torch.dtype, offload: bool
    ):
        self.device, self.storage = device, storage
        self.compute = torch.float64 if storage == torch.float64 else torch.float32
        home = torch.device("cpu") if offload else device
        pin = offload and device.type == "cuda"
        self.q = torch.empty(capacity, dim, dtype=storage, device=home, pin_memory=pin)
        # one matrix product where the basis is on the device in the compute dtype
        self.direct = home == device and storage == self.compute
        self.step = max(1, CHUNK // capacity)  # columns of a streamed slice

    def row(self, i: int) -> Tensor:
        """``q_i`` ``[n]`` on the device, in the compute dtype."""
        return self.q[i].to(device=self.device, dtype=self.compute, non_blocking=True)

    def set(self, i: int, v: Tensor) -> None:
        self.q[i].copy_(v)

    def _ranges(self) -> list[tuple[int, int]]:
        n = self.q.shape[1]
        return [(lo, min(lo + self.step, n)) for lo in range(0, n, self.step)]

    def _slice(self, m: int, lo: int, hi: int) -> Tensor:
        """``Q[:m, lo:hi]`` on the device in the compute dtype (one slice alive at a time)."""
        return self.q[:m, lo:hi].to(device=self.device, dtype=self.compute)

    def project(self, w: Tensor, m: int) -> Tensor:
        """``Q[:m] w`` ``[m]``."""
        if self.direct:
            return self.q[:m] @ w
        out = torch.zeros(m, dtype=self.compute, device=self.device)
        for lo, hi in self._ranges():
            part = self._slice(m, lo, hi)
            out += part @ w[lo:hi]
            del part
        return out

    def subtract(self, w: Tensor, h: Tensor, m: int) -> None:
        """``w -= Q[:m]ᵀ h`` in place."""
        if self.direct:
            w.addmv_(self.q[:m].T, h, alpha=-1)  # no temporary vector
            return
        for lo, hi in self._ranges():
            part = self._slice(m, lo, hi)
            w[lo:hi].sub_(part.T @ h)
            del part

    def combine(self, s: np.ndarray, m: int) -> Tensor:
        """``Q[:m]ᵀ S`` ``[n, l]`` for a float64 ``S [m, l]`` (Ritz vectors)."""
        s = torch.from_numpy(np.ascontiguousarray(s)).to(device=self.device, dtype=self.compute)
        if self.direct:
            return self.q[:m].T @ s
        out = torch.empty(self.q.shape[1], s.shape[1], dtype=self.compute, device=self.device)
        for lo, hi in self._ranges():
            part = self._slice(m, lo, hi)
            out[lo:hi] = part.T @ s
            del part
        return out

    def rotate(self, s: np.ndarray, m: int) -> None:
        """``Q[:l] = Sᵀ Q[:m]`` in place for ``S [m, l]``, ``l < m``, a slice at a time."""
        s = torch.from_numpy(np.ascontiguousarray(s.T)).to(device=self.device, dtype=self.compute)
        kept = s.shape[0]
        for lo, hi in self._ranges():
            part = self._slice(m, lo, hi)
            self.q[:kept, lo:hi] = (s @ part).to(self.q.device)
            del part


class _Krylov:
    """One Lanczos process: stored basis, float64 projected matrix on the host, Ritz pairs
    after each step, thick restarts when the basis is full."""

    def __init__(
        self,
        dim: int,
        steps: int,
        first: Tensor,
        *,
        top: int,
        bottom: int,
        tol: float | None,
        guard: int = 0,
        value_tol: float | None = None,
        storage: torch.dtype | None = None,
        capacity: int | None = None,
        offload: bool = False,
        refinable: bool = False,
    ):
        storage = storage if storage is not None else torch.float64
        self.steps = steps  # products allowed
        self.wanted = top, bottom  # what is returned
        # what must converge: ``guard`` more pairs at each wanted end, where there is room
        self.top = top + (min(guard, dim - top - bottom) if top else 0)
        self.bottom = bottom + (min(guard, dim - self.top - bottom) if bottom else 0)
        capacity = min(steps, dim) if capacity is None else min(capacity, steps, dim)
        if capacity < min(self.top + self.bottom + 2, steps, dim):
            raise ValueError(
                f"a basis of {capacity} vectors cannot hold the {self.top + self.bottom} "
                "wanted and guard pairs and grow: raise max_memory (or lower top, bottom, "
                "guard)"
            )
        self.basis = _Basis(dim, capacity, first.device, storage, offload)
        self.basis.set(0, first)
        self.t = np.zeros((capacity, capacity))  # projected matrix Qᵀ A Q, float64
        self.size = 1  # vectors in the basis; the last one is applied next
        self.products = self.restarts = 0
        self.tol, self.value_tol = tol, value_tol
        self.noise = [0.0, 0]  # sum of squares and count of q_iᵀ A q_j − T_ij
        self.beta = 0.0
        self.refinable = refinable  # a float64 refinement follows: go past the floor
        self._mask = np.zeros(0, dtype=bool)  # see _returned_mask
        self.finished = self.converged = False

    @property
    def vector(self) -> Tensor:
        """The basis vector the operator must be applied to next, ``[n]``."""
        return self.basis.row(self.size - 1)

    @property
    def floor(self) -> float:
        """``FLOOR_FACTOR`` × the RMS of the out-of-band projections: how far the
        operator's rounding leaves an eigenvalue uncertain (absolute)."""
        total, count = self.noise
        return FLOOR_FACTOR * float(np.sqrt(total / count)) if count else 0.0

    def absorb(self, w: Tensor) -> None:
        """Take ``w = A q_j`` ``[n]``: extend T, update the Ritz pairs, stop or go on."""
        basis, j = self.basis, self.size - 1
        w = w.detach().reshape(-1).to(device=basis.device, dtype=basis.compute)
        q = basis.row(j)
        alpha = torch.dot(q, w)
        w = torch.addcmul(w, q, alpha, value=-1)  # a new tensor: the operator's is not touched
        del q  # a copy for bfloat16 or offloaded storage: at most three vectors at a time
        known = np.flatnonzero(self.t[:j, j])  # T_ij already set by symmetry (i < j)
        if len(known) == 1:  # the three-term step
            w.sub_(basis.row(int(known[0])), alpha=float(self.t[known[0], j]))
        elif len(known):  # the first step after a restart: the arrow's column
            coupling = np.zeros(j)
            coupling[known] = self.t[known, j]
            basis.subtract(w, torch.from_numpy(coupling).to(w), j)
        h = basis.project(w, j + 1)  # [j+1]: out of band, the operator's rounding
        basis.subtract(w, h, j + 1)
        after = torch.linalg.vector_norm(w)
        # one host transfer per step: α, β and the projections
        scalars = torch.cat([alpha.reshape(1), after.reshape(1), h]).double().cpu().numpy()
        if np.linalg.norm(scalars[2:]) > scalars[1]:  # w lost over half its norm (Pythagoras)
            again = basis.project(w, j + 1)  # twice is enough (Kahan–Parlett)
            basis.subtract(w, again, j + 1)
            after = torch.linalg.vector_norm(w)
            extra = torch.cat([after.reshape(1), again[j : j + 1]]).double().cpu().numpy()
            scalars[1], scalars[2 + j] = extra[0], scalars[2 + j] + extra[1]
        self.products += 1
        self.t[j, j] = scalars[0] + scalars[2 + j]
        self.beta = beta = float(scalars[1])
        if j:
            self.noise[0] += float(scalars[2 : 2 + j] @ scalars[2 : 2 + j])
            self.noise[1] += j
        self._update(self.size)
        if self.finished:
            return
        if self.size == self.t.shape[0]:  # the basis is full: restart thick
            self._restart(self.size)  # β joins the arrow's border
        else:
            self.t[self.size - 1, self.size] = self.t[self.size, self.size - 1] = beta
        basis.set(self.size, w.div_(beta))
        self.size += 1

    def _ritz(self, m: int):
        theta, s = np.linalg.eigh(self.t[:m, :m])  # ascending
        top, bottom = self.top, self.bottom
        wanted = list(range(m - 1, m - 1 - min(top, m), -1))  # largest first
        wanted += [i for i in range(min(bottom, m)) if i not in wanted]
        return theta, s, wanted

    def _update(self, m: int) -> None:
        theta, s, wanted = self._ritz(m)
        every_residual = np.abs(self.beta * s[-1])  # [m]
        self.every = theta, every_residual
        self.theta, self.residuals, self.s = theta[wanted], every_residual[wanted], s[:, wanted]
        self.wanted_at = wanted
        self.bounds = gap_bounds(theta, every_residual, wanted)
        self.scale = max(float(np.max(np.abs(self.theta))), np.finfo(np.float64).tiny)
        tiny = max(1e-12, 16 * torch.finfo(self.basis.compute).eps) * self.scale
        invariant = self.beta <= tiny  # Krylov space invariant: exact
        # an invariant space holds every eigenvalue the start vector sees: no guard needed
        enough = len(self.theta) >= (sum(self.wanted) if invariant else self.top + self.bottom)
        self.converged = enough and (invariant or self._small())
        self.finished = self.converged or invariant or self.products >= self.steps

    def _restart(self, m: int) -> None:
        """Keep the wanted and guard Ritz vectors and half of the rest (Wu & Simon 2000):
        ``T`` becomes ``diag(θ)`` bordered by the couplings ``β s_{m,i}`` to the residual."""
        theta, s, _ = self._ritz(m)
        need = self.top + self.bottom
        extra = max(0, (m - 1 - need) // 2)
        if self.top and self.bottom:
            n_top = self.top + extra // 2
            keep = [*range(m - n_top, m), *range(self.bottom + extra - extra // 2)]
        elif self.top:
            keep = list(range(m - (self.top + extra), m))
        else:
            keep = list(range(self.bottom + extra))
        keep = sorted(set(keep))[: m - 1]
        self.basis.rotate(s[:, keep], m)
        k = len(keep)
        self.t[:] = 0.0
        self.t[np.arange(k), np.arange(k)] = theta[keep]
        self.t[k, :k] = self.t[:k, k] = self.beta * s[-1, keep]
        self.size = k  # the residual vector goes in at position k
        self.restarts += 1

    def _returned(self) -> list[int]:
        """Positions, among the Ritz pairs kept, of the pairs returned (guards left out)."""
        top, bottom = self.wanted
        found_top = min(self.top, len(self.theta))
        keep = [*range(min(top, found_top)), *range(found_top, found_top + bottom)]
        return [i for i in keep if i < len(self.theta)]

    def _small(self) -> bool:
        """Wanted pairs against ``tol · scale`` (residual) or, with ``value_tol``, their
        error estimate ``r² / δ`` against ``value_tol · |θ_i|``, or the floor where that
        is below it (refinement then takes over: going on cannot help). Guard pairs only
        show that no eigenvalue is missing: residual ``min(sqrt(tol), 1e-2) · scale`` or
        estimate ``max(value_tol, 1e-2) · scale``."""
        returned = self._returned_mask()
        tol = -np.inf if self.tol is None else self.tol  # None: the value rule alone
        loose = (
            1e-2 if self.tol is None else max(self.tol, min(np.sqrt(self.tol), 1e-2))
        ) * self.scale
        small = self.residuals <= np.where(returned, tol * self.scale, loose)
        if self.value_tol is None:
            return bool(small.all())
        floor = 0.0 if self.refinable else self.floor
        value_limits = np.where(
            returned,
            np.maximum(self.value_tol * np.abs(self.theta), floor),
            max(self.value_tol, 1e-2) * self.scale,
        )
        return bool((small | (self.bounds <= value_limits)).all())

    def _returned_mask(self) -> np.ndarray:
        """``[kept]`` bool: which kept pairs are returned (cached: it only depends on
        how many Ritz pairs there are, which stops changing after the first steps)."""
        count = len(self.theta)
        if self._mask.shape[0] != count:
            self._mask = np.zeros(count, dtype=bool)
            self._mask[self._returned()] = True
        return self._mask

    def result(self, name: str = "lanczos") -> Eigenpairs:
        m = self.size
        if not self.converged:
            returned = self._returned()
            if self.value_tol is not None:
                worst = float(np.max(self.bounds[returned] / np.abs(self.theta[returned])))
                how = f"largest relative error estimate {worst:.3g}, wanted <= {self.value_tol:g}"
            else:
                how = (
                    f"largest residual {float(self.residuals.max()):.3g}, "
                    f"wanted <= {self.tol * self.scale:.3g}"
                )
            warn_user(
                f"{name}: not converged after {self.products} steps ({how}, "
                f"{len(self.theta)} of {self.top + self.bottom} pairs (guard included) found); "
                "raise max_iter or loosen tol / value_tol",
                RuntimeWarning,
            )
        keep = self._returned()
        guards = [i for i in range(len(self.theta)) if i not in keep]
        vectors = self.basis.combine(self.s[:, keep + guards], m)  # [n, k + g]
        values = self.theta[keep]
        errors = np.maximum(self.bounds[keep], self.floor)
        return Eigenpairs(
            values=torch.from_numpy(np.ascontiguousarray(values)),
            vectors=vectors[:, : len(keep)],
            residuals=torch.from_numpy(np.ascontiguousarray(self.residuals[keep])),
            matvecs=self.products,
            converged=self.converged,
            guard_vectors=vectors[:, len(keep) :] if guards else None,
            errors=torch.from_numpy(np.ascontiguousarray(errors)),
            floor=self.floor,
            storage=self.basis.storage,
            restarts=self.restarts,
        )


def _check_wanted(top: int, bottom: int, tol: float, dim: int) -> None:
    if top < 0 or bottom < 0 or top + bottom < 1 or top + bottom > dim:
        raise ValueError(f"need 1 <= top + bottom <= {dim} (top, bottom >= 0), got {top}, {bottom}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")


def _steps(dim: int, wanted: int, max_iter: int | None) -> int:
    return min(dim, max(100, 10 * wanted)) if max_iter is None else min(max_iter, dim)


def basis_bytes(dim: int, vectors: int, storage: torch.dtype) -> int:
    """Bytes :func:`lanczos` holds during the iteration with a basis of ``vectors``
    stored in ``storage``, beyond the operator's own: ``n · (m · b + 3 · c)``."""
    compute = 8 if storage == torch.float64 else 4
    return dim * (vectors * STORAGE_BYTES[storage] + 3 * compute)


def _free_memory(device: torch.device) -> int | None:
    """Half the memory free on ``device`` now (None where it cannot be read)."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0] // 2
        if device.type == "cpu":
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError, RuntimeError):
        return None
    return None


def _layout(
    device: torch.device,
    dim: int,
    need: int,
    steps: int,
    compute: torch.dtype,
    storage: torch.dtype | None,
    offload: bool,
    max_basis: int | None,
    max_memory: int | None,
) -> tuple[torch.dtype, int, bool]:
    """Storage dtype, basis capacity (vectors) and whether to offload (module doc).

    Without ``max_memory`` the basis holds every step (or ``max_basis``), unless that
    would take over ``AUTO_BUDGET_ABOVE`` bytes: then the budget is half the memory free
    on the device (CUDA: ``mem_get_info``; CPU: available pages). With it, the
    first of these that fits holds at least ``need + 4`` vectors: the default storage on
    the device (every step, else restarted), bfloat16 on the device, the default storage
    offloaded to host memory."""
    default = storage if storage is not None else compute
    if storage is not None and storage not in STORAGE_BYTES:
        raise ValueError(f"storage must be one of {list(STORAGE_BYTES)}, got {storage!r}")
    cap = steps if max_basis is None else min(max_basis, steps)
    if max_memory is None and basis_bytes(dim, cap, default) > AUTO_BUDGET_ABOVE:
        max_memory = _free_memory(device)  # a large model: keep within what is free
    if max_memory is None:
        return default, cap, offload
    least = min(need + 4, steps)
    tries = [(default, offload)] if storage is not None or offload else []
    tries = tries or [(default, False), (torch.bfloat16, False), (default, True)]
    for kind, off in tries:
        working = 3 * (8 if kind == torch.float64 else 4)
        fits = max_memory // dim - working  # bytes per element left for the basis
        room = cap if off else min(cap, fits // STORAGE_BYTES[kind])
        if fits >= 0 and room >= least:
            return kind, room, off
    kind = tries[-1][0]
    raise ValueError(
        f"max_memory={max_memory} bytes cannot hold Lanczos on {dim} parameters: a basis of "
        f"{least} vectors takes basis_bytes(dim, {least}, torch.bfloat16) = "
        f"{basis_bytes(dim, least, torch.bfloat16)} bytes, and even with the basis offloaded "
        f"the working vectors take {basis_bytes(dim, 0, kind)}; raise max_memory"
        + ("" if offload else ", or pass offload=True")
    )


def _can_refine(operator: Operator, refine: Operator | bool | None) -> bool:
    """Whether :func:`_refinement` would give an operator (without making one)."""
    if refine is False:
        return False
    if refine is not None and refine is not True:
        return True
    if isinstance(operator, Tensor):
        return operator.dtype != torch.float64
    return bool(getattr(operator, "refinable", False))


def _refinement(operator: Operator, refine: Operator | bool | None) -> Operator | None:
    """The float64 operator for refinement, or None (see :func:`lanczos`, ``refine``)."""
    if refine is False:
        return None
    if refine is not None and refine is not True:
        return refine
    if isinstance(operator, Tensor):
        return None if operator.dtype == torch.float64 else operator.double()
    make = getattr(operator, "refinement", None)
    return make() if callable(make) else None


def _refine(
    pairs: Eigenpairs, krylov: _Krylov, operator: Operator, dim: int, value_tol: float
) -> Eigenpairs:
    """One Rayleigh–Ritz step with the float64 ``operator`` on the wanted and guard Ritz
    vectors: the values' error is then ``(floor-sized residual)² / gap``, and the
    residuals are the float64 operator's."""
    cols = [pairs.vectors] + ([] if pairs.guard_vectors is None else [pairs.guard_vectors])
    device = getattr(operator, "device", pairs.vectors.device)
    y = torch.cat(cols, 1).to(device=device, dtype=torch.float64)  # [n, p]
    q, _ = torch.linalg.qr(y)  # orthonormal in float64
    products = as_matmat(operator, dim)(q).to(torch.float64)  # [n, p]
    small = q.T @ products
    theta, s = torch.linalg.eigh((small + small.T) / 2)  # ascending
    p = theta.shape[0]
    top, bottom = krylov.wanted
    found_top = min(krylov.top, len(krylov.theta))
    order = [*range(p - 1, p - 1 - found_top, -1), *range(p - found_top)]  # top, then bottom
    keep = [*order[:top], *order[found_top : found_top + bottom]]
    guards = [i for i in order if i not in keep]
    s = s[:, keep + guards]
    vectors = q @ s
    residuals = torch.linalg.vector_norm(products @ s - vectors * theta[keep + guards], dim=0)
    theta_np, res_np = theta.cpu().numpy(), np.zeros(p)
    res_np[keep + guards] = residuals.cpu().numpy()
    every_theta, every_residual = krylov.every
    others = np.delete(np.arange(len(every_theta)), krylov.wanted_at)
    bounds = gap_bounds(
        np.concatenate([theta_np, every_theta[others]]),
        np.concatenate([res_np, every_residual[others]]),
        keep,
    )
    values = theta_np[keep]
    return Eigenpairs(
        values=torch.from_numpy(np.ascontiguousarray(values)),
        vectors=vectors[:, : len(keep)],
        residuals=residuals[: len(keep)].cpu(),
        matvecs=pairs.matvecs + p,
        converged=pairs.converged and bool(np.all(bounds <= value_tol * np.abs(values))),
        guard_vectors=vectors[:, len(keep) :] if guards else None,
        errors=torch.from_numpy(bounds),
        floor=pairs.floor,
        refined=True,
        storage=pairs.storage,
        restarts=pairs.restarts,
    )


def lanczos(
    operator: Operator,
    dim: int,
    *,
    top: int = 1,
    bottom: int = 0,
    tol: float | None = None,
    value_tol: float | None = None,
    guard: int = 1,
    max_iter: int | None = None,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    storage: torch.dtype | None = None,
    offload: bool = False,
    max_basis: int | None = None,
    max_memory: int | None = None,
    refine: Operator | bool | None = None,
) -> Eigenpairs:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Builds the Krylov basis ``Q = [q_1 .. q_m]`` and ``T = Qᵀ A Q`` (tridiagonal until a
    restart), reorthogonalising every new vector against all previous ones (module doc).
    With ``T = S Θ Sᵀ`` the Ritz pairs are ``(θ_i, Q s_i)`` with residual
    ``||A y_i − θ_i y_i|| = β_m |s_{m,i}|``.

    **Stopping rule.** By default, every wanted eigenvalue to ``1e-6`` relative to
    itself: a pair is done when its error estimate ``r_i² / δ_i`` (:func:`gap_bounds`,
    Kato–Temple with the gap as the Krylov space sees it) is at most
    ``value_tol · |θ_i|``. A top-5 "to 1e-6" is then each of the five to 1e-6, however
    small ``λ_5 / λ_1``. Pass ``tol`` for the residual test instead (``||r_i|| <=
    tol · max |θ|``; the eigenvalue error is then about ``tol² · scale / gap``), or both
    (a pair passes either). Where ``value_tol · |θ_i|`` is below the operator's rounding
    floor (module doc): with a float64 operator at hand (``refine``) the iteration goes
    on until the estimates meet ``value_tol`` (the Ritz vectors are then as good as the
    products allow) and the values are refined in float64; without one it stops at the
    floor, warns, and ``errors`` says how far each value is known. An invariant Krylov
    space (``β_m ≈ 0``) is exact; after ``max_iter`` products ``converged=False`` and a
    warning.

    Args:
        operator: ``[n, n]`` symmetric tensor, callable ``v [n] -> A v [n]``, or an object
            with ``matvec``/``matmat`` (:class:`~.hvp.HessianOperator`).
        dim: ``n``.
        top: how many of the largest (algebraic) eigenvalues.
        bottom: how many of the smallest (most negative) eigenvalues.
        tol: residual tolerance relative to ``max |θ|`` (default None: the value rule).
        value_tol: eigenvalue tolerance relative to each wanted eigenvalue (default
            ``1e-6`` when ``tol`` is None too, else None). On an MLP Hessian whose top
            gap is 13% of λ_max, ``value_tol=1e-6`` stops a top-1 after 10 products
            with error 2e-7, where the residual test must reach 1e-2 on λ₂ (the guard)
            and takes 16.
        guard: this many pairs beyond the wanted ones, at each wanted end, must converge
            too, loosely (residual ``min(sqrt(tol), 1e-2)`` or estimate
            ``max(value_tol, 1e-2)``, relative to ``max |θ|``; they are not returned). A
            residual test cannot see an eigenvalue the Krylov space has not found yet;
            with one guard pair, stopping while a wanted eigenvalue is still missing
            becomes rare (a top-5 at ``tol=1e-3`` on an MLP Hessian: worst error 3e-2
            without, 3.5e-6 with, for 0.2 products more on average).
        max_iter: most products (default ``min(n, max(100, 10 (top + bottom)))``).
        start: warm start: ``[n]`` or previous eigenvectors ``[n, j]`` (summed; when
            tracking, the previous ``vectors`` and ``guard_vectors`` together).
        generator: randomness for the start vector (a CPU generator).
        dtype: dtype the operator takes (default: the operator's ``dtype`` attribute
            (dense tensors, Hessian operators), else float64).
        device: where the basis lives and the operator is called (default: the
            operator's ``device`` attribute, else the CPU). Each step reads ``α``, ``β``
            and the projections on the host: one sync per product (two when the rare
            second projection is needed).
        storage: the basis dtype: ``torch.float64``, ``torch.float32`` (default for
            operators not in float64) or ``torch.bfloat16`` (λ₁ of a 400 × 400 test
            matrix moved by up to 1.2e-4 relative over 5 seeds; the floor and ``errors``
            show it).
        offload: keep the basis in host memory (pinned on CUDA), streaming slices of
            ``CHUNK`` elements to the device for each projection.
        max_basis: most vectors stored; when full, restart thick (module doc).
        max_memory: bytes Lanczos may hold on the device, by the formula in the module
            doc (:func:`basis_bytes`); chooses the storage, ``max_basis`` and
            ``offload`` where they are not given (see :func:`_layout`). Default None: no
            limit while a basis of every step fits in ``AUTO_BUDGET_ABOVE`` (1 GiB), else
            half the memory free on the device.
        refine: a float64 operator (tensor or callable) for the refinement, ``False`` for
            none, or None: the operator's own float64 version where there is one (a
            dense tensor's ``.double()``, ``HessianOperator.refinement()``).

    Returns:
        :class:`Eigenpairs`.

    Examples:
        A dense symmetric matrix with known eigenvalues, ``Q diag(4, 3, 2, 1, 0.5, -1) Qᵀ``
        for a random orthogonal ``Q``: its two largest and its most negative eigenpairs.

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
        >>> eigenvalues = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
        >>> A = q @ torch.diag(eigenvalues) @ q.T
        >>> pairs = lanczos(A, 6, top=2, bottom=1, generator=torch.Generator().manual_seed(1))
        >>> [round(v, 6) for v in pairs.values.tolist()], pairs.converged
        ([4.0, 3.0, -1.0], True)
        >>> round(abs(float(pairs.vectors[:, 0] @ q[:, 0])), 6)  # the top eigenvector (± sign)
        1.0
    """
    matvec = as_matvec(operator, dim)
    if tol is None and value_tol is None:
        value_tol = VALUE_TOL
    _check_wanted(top, bottom, 1.0 if tol is None else tol, dim)
    if value_tol is not None and not value_tol > 0:
        raise ValueError(f"value_tol must be > 0 or None, got {value_tol!r}")
    device, in_dtype = operator_placement(operator, device, dtype)
    compute = torch.float64 if in_dtype == torch.float64 else torch.float32
    steps = _steps(dim, top + bottom, max_iter)
    need = top + bottom + guard * ((top > 0) + (bottom > 0))
    kind, capacity, offload = _layout(
        device, dim, need, steps, compute, storage, offload, max_basis, max_memory
    )
    first = _start(
        dim, start, generator, device, torch.float64 if kind == torch.float64 else compute
    )
    krylov = _Krylov(
        dim,
        steps,
        first,
        top=top,
        bottom=bottom,
        tol=tol,
        guard=guard,
        value_tol=value_tol,
        storage=kind,
        capacity=capacity,
        offload=offload,
        refinable=value_tol is not None and _can_refine(operator, refine),
    )
    del first
    while not krylov.finished:
        krylov.absorb(matvec(krylov.vector.to(in_dtype)).reshape(-1))  # [n]
    pairs = krylov.result()
    if value_tol is None or not _under_floor(pairs, value_tol):
        return pairs
    why = ""
    try:
        exact = _refinement(operator, refine)
        refined = None if exact is None else _refine(pairs, krylov, exact, dim, value_tol)
    except (RuntimeError, TypeError, ValueError) as err:  # a model that will not run in float64
        refined, why = None, f" (the float64 refinement failed: {str(err).splitlines()[0][:120]})"
    if refined is None:
        warn_user(
            f"lanczos: the operator's rounding floor ({pairs.floor:.2e}) is above "
            f"value_tol={value_tol:g} of eigenvalue(s) {_named(pairs, value_tol)}{why}; "
            "their errors are in Eigenpairs.errors. Pass refine= (a float64 operator) or "
            "run the operator in float64 to certify them",
            RuntimeWarning,
        )
        return pairs
    if pairs.converged and not refined.converged:
        worst = float((refined.errors / refined.values.abs()).max())
        warn_user(
            f"lanczos: after the float64 refinement an eigenvalue is known to {worst:.2e} "
            f"relative, not value_tol={value_tol:g}: the float32 Ritz vectors are too "
            "rough; raise max_iter, or run the operator in float64",
            RuntimeWarning,
        )
    return refined


def _under_floor(pairs: Eigenpairs, value_tol: float) -> bool:
    return bool((pairs.floor > value_tol * pairs.values.abs()).any())


def _named(pairs: Eigenpairs, value_tol: float) -> str:
    values = pairs.values.tolist()
    return ", ".join(f"{v:.4g}" for v in values if pairs.floor > value_tol * abs(v))
