"""What every curvature probe shares: where its Hessian is taken (data, loss, parameters,
semantics, engine) and how it turns a :class:`~trainprobe.probes.base.StepContext`
into a :class:`~trainprobe.curvature.HessianOperator`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..curvature.hvp import Engine, HessianOperator, hessian_operator
from ..curvature.lanczos import Eigenpairs, lanczos
from ..curvature.operator import Operator
from ..functional import LossFn, Mode, ParamSelection
from .base import StepContext, probe_name, step_source
from .schedules import Schedule, check_schedule, every


class CurvatureProbe:
    """Shared options of the Hessian probes (a probe's own options come on top).

    Args:
        schedule: when to measure (default every 100 steps: each measurement costs
            tens of Hessian-vector products, each about 1.5-2 gradients).
        data: a fixed batch to take the Hessian on (e.g. a held-out or full batch);
            default: the step's ``batch=``.
        batches: a fixed re-iterable collection of batches (a DataLoader or a list,
            not a one-shot generator): the dataset Hessian, each batch weighted by its
            size, re-read at every measurement.
        loss_fn: ``loss(model, batch) -> scalar``; default: the ``loss_fn`` given to
            ``watch`` or ``mon.step``.
        params: which parameters (None: all trainable; a regex, names or a module).
        mode: ``"eval"`` (default) or ``"train"`` forward semantics; see
            :func:`trainprobe.curvature.hessian_operator`.
        engine: the HVP engine (``"auto"``, ``"graph"``, ``"jvp"``, ``"linearize"``).
        dtype: compute dtype (default: the parameters').
        name: the first part of its keys (default the class's, e.g. ``"hessian"``); give two
            instances of one class different names to record both side by side.
        seed: randomness (Lanczos start vectors, trace and density probes) comes from
            ``torch.Generator().manual_seed(seed + step)``; the global RNG is never used.

    Measured at the end of the step block: after the user's backward, before the
    optimizer step, at the parameters that produced this step's gradient. Nothing of
    the model changes (see the curvature module); the probe holds only its own state
    (e.g. eigenvectors for warm starts).
    """

    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        schedule: Schedule | None = None,
        name: str | None = None,
        data: Any = None,
        batches: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        params: ParamSelection = None,
        mode: Mode = "eval",
        engine: Engine = "auto",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        self.schedule = every(100) if schedule is None else schedule
        check_schedule(self.schedule, type(self).__name__)
        self.name = probe_name(self, name)
        if data is not None and batches is not None:
            raise ValueError(f"{type(self).__name__}: pass data= or batches=, not both")
        if isinstance(batches, Iterator):
            raise TypeError(
                f"{type(self).__name__}: batches= is a one-shot iterator, empty after the "
                "first measurement; pass a list of batches or a DataLoader"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"{type(self).__name__}: loss_fn must be callable loss(model, batch)")
        if mode not in ("eval", "train"):
            raise ValueError(f"{type(self).__name__}: mode must be 'eval' or 'train', got {mode!r}")
        self.data, self.batches, self.loss_fn = data, batches, loss_fn
        self.params, self.mode, self.engine, self.dtype = params, mode, engine, dtype
        self.seed = seed
        self._previous: Tensor | None = None  # [P, k] eigenvectors of the last measurement

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def operator(self, ctx: StepContext) -> HessianOperator:
        """The Hessian at this step's parameters, on the probe's data and loss."""
        own = self.data if self.batches is None else self.batches
        loss_fn, batch = step_source(
            ctx, type(self).__name__, self.loss_fn, own, data_hint="data= (or batches=)"
        )
        common = {
            "params": self.params,
            "mode": self.mode,
            "engine": self.engine,
            "dtype": self.dtype,
        }
        if self.batches is not None:
            return hessian_operator(ctx.model, loss_fn, batches=self.batches, **common)
        return hessian_operator(ctx.model, loss_fn, batch=batch, **common)

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
        self._previous = pairs.vectors if guards is None else torch.cat([pairs.vectors, guards], 1)
        return pairs

    def settings(self) -> dict[str, Any]:
        return {
            "data": "fixed batch"
            if self.data is not None
            else ("fixed batches" if self.batches is not None else "step batch"),
            "params": self.params if isinstance(self.params, str | None) else repr(self.params),
            "mode": self.mode,
            "engine": self.engine,
            "dtype": None if self.dtype is None else str(self.dtype),
            "seed": self.seed,
        }
