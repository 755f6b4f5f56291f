"""Where the NTK probes take their per-example output gradients: a subset of examples frozen
once (``data``, ``max_examples``) and how the gradients are taken (``params``, ``mode``,
``method``, ``max_memory``), declared once in :class:`OutputGradientProbe` and inherited by
:class:`~.ntk.NTKAlignment` and :class:`~.ntk_response.NTKResponse`; and
:func:`check_count`, the integer check of their counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..functional import Mode, ParamSelection, check_mode, network
from ..gradients import METHODS
from ..gradients.ntk import tangent_kernel
from .base import ProbeOptions, StepContext
from .batches import FixedSubset


def check_count(owner: str, name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]``, else a ``ValueError``."""
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low
    if bad or (high is not None and value > high):  # type: ignore[operator]
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{owner}: {name} must be an integer {span}, got {value!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True, eq=False)
class OutputGradientProbe(ProbeOptions):
    """The options of a probe that takes the empirical NTK of the model's outputs on a
    fixed subset of examples (a probe's own options come on top).

    Args:
        data: a fixed batch ``(x, y)``; its first ``max_examples`` examples are the subset.
            Default: the first measured step's ``batch=``, frozen.
        max_examples: ``n``, at most 256 (the kernel is ``[n, n]``).
        params: which parameters (None: all trainable; a regex, names or a module).
        mode: ``"eval"`` (default: BatchNorm running statistics, no dropout) or ``"train"``
            semantics, of the gradients and of the forward passes.
        method: per-example gradients by ``"auto"`` (default: vmap, falling back once, for
            good, to one backward per example where vmap cannot batch the model),
            ``"vmap"`` or ``"loop"``; see :func:`trainprobe.gradients.per_sample_gradients`.
        max_memory: bytes per chunk of per-example gradients.

    State: the subset (frozen from the first measured step's batch without ``data``;
    :meth:`reset` forgets it) and the per-example method after a fallback.
    """

    data: Any = field(default=None, repr=False)
    max_examples: int = 256
    params: ParamSelection = None
    mode: Mode = "eval"
    method: str = "auto"
    max_memory: int | None = None
    _subset: FixedSubset | None = field(default=None, init=False, repr=False)
    _method: str | None = field(default=None, init=False, repr=False)  # "loop" after a fallback

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_count(owner, "max_examples", self.max_examples, 2, 256)
        if self.method not in METHODS:
            raise ValueError(f"{owner}: method must be one of {METHODS}, got {self.method!r}")
        check_mode(self.mode)
        self._keep(_subset=FixedSubset(self.data, self.max_examples, owner))

    def subset(self, ctx: StepContext) -> tuple[Any, Tensor]:
        """The examples ``(x, y)`` every measurement takes (frozen at the first call)."""
        return self._subset.get(ctx.batch)  # type: ignore[union-attr]

    def kernel(self, model: nn.Module, inputs: Any, projections: Tensor) -> Tensor:
        """``K = Σ_j J_j J_jᵀ`` ``[n, n]`` of the outputs ``V``'s columns select (``V``
        ``[C, k]``, see :func:`trainprobe.gradients.ntk.tangent_kernel`) on ``inputs``."""
        outputs = network(model, params=self.params, mode=self.mode)
        kernel, used = tangent_kernel(
            outputs,
            inputs,
            projections,
            method=self._method or self.method,  # type: ignore[arg-type]
            max_memory=self.max_memory,
        )
        if used == "loop":  # "auto" fell back once (with a warning): for good
            self._keep(_method="loop")
        return kernel

    def reset(self) -> None:
        """Forget a subset frozen from a step batch (a given ``data`` is kept)."""
        self._subset.reset()  # type: ignore[union-attr]
