"""What every curvature probe shares: where its Hessian is taken (the loss source, or a
collection of batches, with an engine and a dtype) and how it turns a
:class:`~trainprobe.probes.base.StepContext` into a
:class:`~trainprobe.curvature.HessianOperator`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..curvature.hvp import Engine, HessianOperator, hessian_operator
from ..curvature.lanczos import Eigenpairs, lanczos
from ..curvature.operator import Operator
from ..curvature.sharded import OneRank, ShardedHessian, sharded_hessian_operator
from ..functional.shards import any_sharded
from .base import StepContext, step_source
from .schedules import Schedule, every
from .source import LossProbe

SHARDED_FALLBACK = (
    "under FSDP2 the exact engines cannot run (no rank holds the whole model): finite "
    "differences through the sharded model"
)
"""The ``fallback`` of :meth:`CurvatureProbe.measured_with` under FSDP2 with ``engine="auto"``."""


@dataclass(frozen=True, kw_only=True, eq=False)
class CurvatureProbe(LossProbe):
    """Shared options of the Hessian probes (a probe's own options come on top).

    Args:
        schedule: when to measure (default every 100 steps: each measurement costs
            tens of Hessian-vector products, each about 1.5-2 gradients).
        data, loss_fn, params, mode: where the Hessian is taken; see
            :class:`~trainprobe.probes.source.LossProbe` and
            :func:`trainprobe.curvature.hessian_operator`.
        batches: instead of ``data``, a fixed re-iterable collection of batches (a
            DataLoader or a list, not a one-shot generator): the dataset Hessian, each
            batch weighted by its size, re-read at every measurement.
        engine: the HVP engine (``"auto"``, ``"graph"``, ``"jvp"``, ``"linearize"``).
        dtype: compute dtype (default: the parameters', float32 for half-precision ones).
        seed: randomness (Lanczos start vectors, trace and density probes) comes from
            ``torch.Generator().manual_seed(seed + step)``; the global RNG is never used.
        name: see :class:`~trainprobe.probes.base.ProbeOptions`.

    Measured at the end of the step block: after the user's backward, before the
    optimizer step, at the parameters that produced this step's gradient. Nothing of
    the model changes (see the curvature module); the probe holds only its own state
    (e.g. eigenvectors for warm starts).

    What its products ran on is left in the run metadata (:meth:`measured_with`):
    ``run.meta["measured_with"][name]`` is ``{"engine": ..., "attention": ...,
    "since_step": ...}``, with ``"fallback"`` (why) when ``engine="auto"`` runs on finite
    differences.
    """

    schedule: Schedule = every(100)
    across_ranks = "combined"  # on the step's batch, products averaged over ranks
    forward_through_shards = True  # under FSDP2: every rank runs the sharded model
    batches: Iterable[Any] | None = field(default=None, repr=False)
    engine: Engine = "auto"
    dtype: torch.dtype | None = None
    seed: int = 0
    _previous: Tensor | None = field(default=None, init=False, repr=False)  # [P, k]
    _ran_on: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.data is not None and self.batches is not None:
            raise ValueError(f"{owner}: pass data= or batches=, not both")
        if isinstance(self.batches, Iterator):
            raise TypeError(
                f"{owner}: batches= is a one-shot iterator, empty after the first "
                "measurement; pass a list of batches or a DataLoader"
            )

    def operator(self, ctx: StepContext) -> HessianOperator:
        """The Hessian at this step's parameters, on the probe's data and loss (under
        FSDP2 by finite differences through the sharded model, see
        :mod:`~trainprobe.curvature.sharded`); what it runs on is kept for
        :meth:`measured_with`."""
        own = self.data if self.batches is None else self.batches
        loss_fn, batch = step_source(
            ctx, type(self).__name__, self.loss_fn, own, data_hint="data= (or batches=)"
        )
        data: dict[str, Any]
        if self.batches is not None:
            data = {"batches": self.batches}
        elif own is None and ctx.batches is not None:  # every micro-batch of the step
            data = {"batches": list(ctx.batches)}
        else:
            data = {"batch": batch}
        if any_sharded(ctx.params.values()):  # FSDP2, at any world size
            sharded = self._sharded(ctx, loss_fn, data)
            fallback = SHARDED_FALLBACK if self.engine == "auto" else None
            self._note_engine(sharded, fallback, ctx.step)
            return sharded  # type: ignore[return-value]
        op = hessian_operator(
            ctx.model,
            loss_fn,
            params=self.params,
            mode=self.mode,
            engine=self.engine,
            dtype=self.dtype,
            # the step's batch is this rank's share: products averaged over ranks are the
            # global batch's (data= and batches= are the same on every rank already)
            reduce=ctx.ranks.mean if ctx.ranks is not None and own is None else None,
            **data,
        )
        self._note_engine(op, op.fallback, ctx.step)
        return op

    def _note_engine(
        self, op: HessianOperator | ShardedHessian, fallback: str | None, step: int
    ) -> None:
        """Keep what ``op`` runs on for :meth:`measured_with` (``since_step``: the first
        step measured this way)."""
        ran_on = {"engine": op.engine, "attention": op.attention}
        if fallback is not None:
            ran_on["fallback"] = fallback
        if {k: v for k, v in self._ran_on.items() if k != "since_step"} != ran_on:
            self._keep(_ran_on={**ran_on, "since_step": step})

    def measured_with(self) -> dict[str, Any]:
        """How the last measurement's Hessian-vector products ran, for the run metadata
        (``run.meta["measured_with"][name]``, see :mod:`~trainprobe.probes.base`):

        - ``engine``: ``"graph"``, ``"jvp"``, ``"linearize"`` or ``"fd"`` (finite
          differences; their error is recorded as ``<name>/fd_error``);
        - ``attention``: the scaled-dot-product attention kernels the products could use
          (``"math"``: every engine pins it, finite differences and FSDP2 included);
        - ``fallback``: only when ``engine="auto"`` runs on ``"fd"``: why;
        - ``since_step``: the first step measured this way (a later change, e.g. a
          fallback from a step on, rewrites the entry).

        Empty before the first measurement."""
        return dict(self._ran_on)

    def _sharded(self, ctx: StepContext, loss_fn: Any, data: dict[str, Any]) -> ShardedHessian:
        if self.engine not in ("auto", "fd") or self.params is not None or self.dtype is not None:
            raise ValueError(
                f"{type(self).__name__} under FSDP2 runs finite differences in every trainable "
                "parameter, in their dtype: leave engine= (or pass 'fd'), params= and dtype= unset"
            )
        ranks = OneRank() if ctx.ranks is None else ctx.ranks  # world 1: no group seen
        return sharded_hessian_operator(
            ctx.model, loss_fn, ctx.params, ranks, mode=self.mode, **data
        )

    def engine_record(self, op: HessianOperator) -> dict[str, float]:
        """``{"<name>/fd_error": estimate}`` when ``op`` ran on finite differences (the
        ``"auto"`` engine's fallback for a layer without a double backward), else ``{}``."""
        if op.fd_error is None:
            return {}
        return {f"{self.name}/fd_error": op.fd_error}

    def generator(self, step: int) -> torch.Generator:
        """This measurement's own generator (``seed + step``)."""
        return torch.Generator().manual_seed(self.seed + step)

    def eigenpairs(
        self, operator: Operator, dim: int, step: int, *, warm: bool = True, **options: Any
    ) -> Eigenpairs:
        """:func:`~trainprobe.curvature.lanczos` on ``operator``, started from the last
        measurement's eigenvectors when ``warm`` (and the dimension still matches), and
        keeping this measurement's (guard vectors included: the start then holds the
        neighbours that certify the gap) for the next. ``options``: ``top``, ``tol``, ..."""
        previous = self._previous
        start = previous if warm and previous is not None and previous.shape[0] == dim else None
        pairs = lanczos(operator, dim, start=start, generator=self.generator(step), **options)
        guards = pairs.guard_vectors
        kept = pairs.vectors if guards is None else torch.cat([pairs.vectors, guards], 1)
        self._keep(_previous=kept)
        return pairs
