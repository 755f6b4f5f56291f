"""The probe protocol, what a probe may read (:class:`StepContext`) and return, and the
base of the built-in probes (:class:`ProbeOptions`).

A probe is a small object with one job (DESIGN.md rule 3):

- ``name``: the first part of every key it writes (``name/metric[/layer]``); every
  built-in probe takes ``name=`` (default its class's name), so that two instances of
  one class can record side by side;
- ``schedule``: ``step -> bool`` (see :mod:`.schedules`);
- ``needs``: what the monitor must provide, a subset of :data:`NEEDS`;
- ``keys``: the :class:`~trainprobe.keys.Key` patterns it writes, each starting with its
  class's name (a probe given another ``name`` writes them under that name, see
  :func:`declared_keys`); the monitor refuses any other key;
- ``measure(ctx) -> {key: value}``: device tensors, floats, :class:`PerLayer` or
  :class:`OnHost`;
- optional ``due``: a schedule of when the monitor runs the probe, when that differs
  from when it records (a probe with a running state: ``GradSpectrum``'s EMA needs
  every gradient); default ``schedule``;
- optional ``attach(model) -> list[RemovableHandle]``: hooks for a due step;
- optional ``settings() -> dict``: its options for the run metadata; a built-in probe's
  are its dataclass fields (:func:`probe_settings`);
- optional ``measured_with() -> dict``: how its measurements ran, where that is decided
  at run time (the curvature probes: the HVP engine, an ``"auto"`` fallback to finite
  differences, the attention kernels), JSON-safe, ``{}`` before any; after each
  measurement the monitor stores it in the run metadata as
  ``meta["measured_with"][name]`` when it changed (rank 0 writes under
  ``torch.distributed``; a checkpoint scan stores it alike). Values stay numeric
  records; this is for what is not a number.

Probes never read device values on the host (no sync) and never change
``.grad``, parameters, buffers, train/eval mode or the global RNG: the monitor
moves every value to the host in one transfer per flush.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from ..keys import Key, check_name
from .schedules import Schedule, check_schedule

#: What a probe can ask for (the monitor calls ``attach`` for every due probe).
#: ``grads``: ``.grad`` after the user's backward (the monitor warns once if none has
#: one); ``activations``: the probe hooks module outputs in ``attach``; ``update``:
#: ``ctx.update`` = parameters after the optimizer step minus before (measured when
#: the next step starts); ``optimizer``: ``ctx.optimizer`` not None (else the probe is
#: disabled with a warning); ``logged``: the values given to ``StepHandle.log``.
NEEDS = frozenset({"grads", "activations", "update", "optimizer", "logged", "scaler"})


@dataclass(frozen=True)
class PerLayer:
    """``[L]`` values written as keys ``f"{prefix}/{names[i]}"`` from one tensor.

    Cheaper than ``L`` separate 0-d tensors: one transfer, one conversion.
    """

    names: tuple[str, ...]
    values: Tensor  # [L]


@dataclass(frozen=True)
class OnHost:
    """A device tensor finished on the host at flush: ``finish(array) -> {key: float}``.

    For per-step checks whose bookkeeping (counts, first offender) would cost
    more small device ops than the measurement itself: the probe hands over one
    tensor and a pure function, and the monitor calls it on the host copy. The
    keys it returns must start with the probe's name.

    ``reduce="sum"`` marks ``values`` as sufficient statistics of the rank's own batch
    (sums, sums of squares, counts; NaN and inf propagate): under ``torch.distributed``
    the monitor sums them over ranks before ``finish`` (see
    :mod:`trainprobe.monitor.distributed`). In one process it changes nothing.
    """

    values: Tensor  # [n]
    finish: Callable[[np.ndarray], Mapping[str, float]]
    reduce: str | None = None


Value = Tensor | float | int | PerLayer | OnHost


class Ranks(Protocol):
    """What a probe may use of the process group (implemented by the monitor)."""

    rank: int
    world: int

    def mean(self, tensor: Tensor) -> Tensor:
        """``tensor``'s mean over ranks (a collective every rank must make)."""
        ...

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor``'s sum over ranks (a collective every rank must make)."""
        ...

    def gather(self, vector: Tensor) -> Tensor:
        """``[world, n]``: every rank's ``vector [n]`` (a collective)."""
        ...

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value`` (a collective between this job's ranks)."""
        ...


@dataclass(frozen=True)
class StepContext:
    """Everything a probe may read at a measured step.

    Attributes:
        step: the training step.
        model: the watched module.
        params: trainable parameters by name, in ``named_parameters()`` order.
        batch: what the user passed as ``batch=`` (may be None).
        optimizer: the optimizer passed to ``watch`` or ``step`` (may be None).
        logged: values given to ``StepHandle.log`` at this step (device tensors or floats).
        update: ``{name: [shape] Δw}`` for probes that need ``"update"``, else None.
        params_before: ``{name: w_before}`` (detached copies) with ``update``, else None.
        loss_fn: ``loss(model, batch) -> scalar`` given to ``watch`` or ``step`` (for
            probes that evaluate the loss themselves, e.g. Hessian probes), else None.
        ranks: under ``torch.distributed``, this process's place in the group
            (``rank``, ``world`` and ``mean(tensor)``, an all-reduce); None in one process.
        grad_scale: while an AMP ``GradScaler`` has not unscaled the gradients yet, the
            0-d device tensor ``1 / scale`` that turns ``.grad`` (and any gradient of the
            scaled loss a hook sees) into the true gradient; None when ``.grad`` is it.
        loss_scale: for update probes under a ``GradScaler``: the scale the step used
            and the scale after ``scaler.update()`` (0-d device tensors), else None.
        batches: the micro-batches of an accumulated optimizer step (``batch`` is the
            first), or None for a step of one batch.
    """

    step: int
    model: nn.Module
    params: Mapping[str, nn.Parameter]
    batch: Any = None
    optimizer: torch.optim.Optimizer | None = None
    logged: Mapping[str, Tensor | float] = field(default_factory=dict)
    update: Mapping[str, Tensor] | None = None
    params_before: Mapping[str, Tensor] | None = None
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None
    ranks: Ranks | None = None
    grad_scale: Tensor | None = None
    loss_scale: tuple[Tensor, Tensor] | None = None
    batches: tuple[Any, ...] | list[Any] | None = None

    def unscaled(self, grad: Tensor) -> Tensor:
        """``grad`` of the scaled loss as the true gradient (``grad`` itself without AMP)."""
        if self.grad_scale is None:
            return grad
        return grad * self.grad_scale.to(grad.device, grad.dtype)


@runtime_checkable
class Probe(Protocol):
    """What the monitor calls; see the module docstring (``due``, ``attach``,
    ``settings`` and ``measured_with`` are optional)."""

    name: str
    schedule: Schedule
    needs: frozenset[str]
    keys: tuple[Key, ...]

    def measure(self, ctx: StepContext) -> Mapping[str, Value]: ...


ACROSS_RANKS = {
    "same": "the same on every rank (replicated parameters, all-reduced gradients, the "
    "probe's own fixed data): rank 0's value is stored",
    "combined": "each rank measures its own batch and the ranks' values are combined into "
    "the global batch's (summed sufficient statistics, or products averaged by a collective)",
    "sharded": "the same on every rank under DDP (replicated parameters, all-reduced "
    "gradients: no collective); under FSDP2 each rank's shard statistics are combined",
    "own_data": "the same on every rank with the probe's own fixed data; on the step's batch "
    "only this rank's share, so refused under a process group until data is given",
    "local": "this rank's own forward and backward, with no rule yet to combine ranks: refused "
    "under a process group",
}
"""The values of :attr:`ProbeOptions.across_ranks` and what each means."""


@dataclass(frozen=True, kw_only=True, eq=False)
class ProbeOptions:
    """The base of the built-in probes: a probe *is* its options, a frozen, keyword-only
    dataclass, so the constructor's signature lists them, nothing changes them after
    construction, and the run metadata records exactly them (:func:`probe_settings`).

    A subclass redeclares ``name`` and ``schedule`` with its defaults (``name: str =
    "norms"``, ``schedule: Schedule = every(10)``), declares ``keys`` and ``needs`` as
    class variables, checks its own options in ``__post_init__`` (calling this one first),
    and keeps run-time state (warm starts, fallbacks, frozen subsets) in private fields
    declared with ``field(init=False, repr=False)`` and set by :meth:`_keep`. The name
    and the schedule are checked here, for every built-in probe at once (``watch``
    checks them again for any probe).

    Args:
        name: the first part of its keys (lower_snake; default the class's); give two
            instances of one class different names to record both side by side.
        schedule: when to measure.
    """

    name: str
    schedule: Schedule
    needs: ClassVar[frozenset[str]] = frozenset()
    keys: ClassVar[tuple[Key, ...]] = ()
    #: how its values relate across data-parallel ranks (see ACROSS_RANKS)
    across_ranks: ClassVar[str] = "same"
    #: the option holding the probe's own fixed data (None there: the step's batch)
    own_data: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        check_name(self.name, f"{type(self).__name__}(name=...)")
        check_schedule(self.schedule, type(self).__name__)

    def _keep(self, **state: Any) -> None:
        """Set private run-time state (names starting with ``_``) on the frozen probe."""
        for attr, value in state.items():
            if not attr.startswith("_"):
                raise AttributeError(
                    f"{type(self).__name__}.{attr} is an option and options are frozen; "
                    "run-time state lives in private fields"
                )
            object.__setattr__(self, attr, value)


def probe_settings(probe: object) -> dict[str, Any]:
    """A probe's options for the run metadata, JSON-safe: a built-in probe's constructor
    fields except ``name`` and ``schedule`` (stored beside them), as given or defaulted,
    never its run-time state; another probe's ``settings()`` if it has one, else ``{}``.

    Examples:
        >>> from trainprobe.probes import LayerNorms
        >>> probe_settings(LayerNorms())
        {}
    """
    if is_dataclass(probe) and not isinstance(probe, type):
        return {
            f.name: _describe(getattr(probe, f.name))
            for f in fields(probe)
            if f.init and f.name not in ("name", "schedule")
        }
    settings = getattr(probe, "settings", None)
    return dict(settings()) if callable(settings) else {}


def _describe(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON: scalars as they are; tensors, modules, callables and data by
    what they are (a batch is described, never stored)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, nn.Module):
        return f"module {type(value).__name__}"
    if isinstance(value, tuple | list) and depth < 2 and len(value) <= 16:
        return [_describe(v, depth + 1) for v in value]
    if isinstance(value, Mapping) and depth < 2 and len(value) <= 16:
        return {str(k): _describe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, slice):
        return f"slice({value.start}, {value.stop}, {value.step})"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"function {value.__qualname__}"
    size = f" of {len(value)}" if hasattr(value, "__len__") else ""
    return f"{type(value).__name__}{size}"


def declared_keys(probe: Probe) -> tuple[Key, ...]:
    """The key patterns ``probe`` writes, under its own ``name`` (which may differ from the
    class's default name its ``keys`` are spelled with)."""
    return tuple(key.under(probe.name) for key in probe.keys)


def step_source(
    ctx: StepContext,
    owner: str,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None,
    data: Any,
    *,
    data_hint: str = "data=",
) -> tuple[Callable[[nn.Module, Any], Tensor], Any]:
    """The loss and batch a probe evaluates: its own ``loss_fn``/``data``, else the step's.

    Raises:
        ValueError: no loss closure anywhere, or no batch (the message names ``owner``
            and where to pass them).
    """
    loss_fn = loss_fn or ctx.loss_fn
    if loss_fn is None:
        raise ValueError(
            f"{owner} needs a loss: pass loss_fn= to watch(), mon.step() or the probe, e.g. "
            "trainprobe.curvature.criterion_loss(nn.CrossEntropyLoss())"
        )
    batch = data if data is not None else ctx.batch
    if batch is None:
        raise ValueError(
            f"{owner} needs data: pass batch= to mon.step(), or {data_hint} to the probe"
        )
    return loss_fn, batch


def due_schedule(probe: Probe) -> Schedule:
    """When the monitor runs ``probe``: its ``due`` if it has one, else its ``schedule``."""
    return getattr(probe, "due", probe.schedule)
