"""Where the NTK probes take their per-example output gradients: a subset of examples frozen
once (``data``, ``max_examples``) and how the gradients are taken (``params``, ``mode``,
``method``, ``max_memory``), declared once in :class:`OutputGradientProbe` and inherited by
:class:`~.ntk.NTKAlignment` and :class:`~.ntk_response.NTKResponse`; and
:func:`check_count`, the integer check of their counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..functional import Mode, ParamSelection, SplitBatch, check_mode, network
from ..gradients import METHODS
from ..gradients.ntk import kernel_blocks, tangent_kernel
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
        max_examples: ``n >= 2`` (default 256), bounded by ``max_memory``: the kernel is
            ``[n, n]`` float64 (``8 n²`` bytes: 2 MiB at ``n = 512``, 8 MiB at 1024).
        params: which parameters (None: all trainable; a regex, names or a module).
        mode: ``"eval"`` (default: BatchNorm running statistics, no dropout) or ``"train"``
            semantics, of the gradients and of the forward passes.
        method: per-example gradients by ``"auto"`` (default: vmap, falling back once, for
            good, to one backward per example where vmap cannot batch the model),
            ``"vmap"`` or ``"loop"``; see :func:`trainprobe.gradients.per_sample_gradients`.
        max_memory: bytes for the ``[n, n]`` float64 kernel and the per-example gradient
            rows held at once (default 256 MiB,
            :data:`~trainprobe.gradients.DEFAULT_MAX_MEMORY`; activations come on top). When
            the ``[n, P]`` Jacobian does not fit beside the kernel, it is taken in blocks of
            rows (later rows' gradients retaken once per block: slower, same kernel); see
            :func:`trainprobe.gradients.ntk.kernel_blocks`. Refused when it cannot hold even
            the kernel of ``max_examples`` examples (at construction) or the kernel and two
            gradient rows of the selected parameters (at the first measurement).

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
        check_count(owner, "max_examples", self.max_examples, 2)
        _check_memory(owner, self.max_examples, self.max_memory)
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
        examples = SplitBatch.of(inputs).size
        try:  # refused before any gradient is taken, under the probe's name
            kernel_blocks(examples, outputs.layout.size, outputs.dtype, self.max_memory)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
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


def _check_memory(owner: str, examples: int, max_memory: object) -> None:
    """``max_memory`` None or a positive integer that holds the ``[n, n]`` float64 kernel."""
    if max_memory is None:
        return
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
        raise ValueError(
            f"{owner}: max_memory must be None or a positive integer (bytes), got {max_memory!r}"
        )
    kernel = 8 * examples**2
    if kernel >= max_memory:
        raise ValueError(
            f"{owner}: max_memory={max_memory} bytes cannot hold the [n, n] float64 kernel of "
            f"n={examples} examples ({kernel} bytes) and its gradient rows; pass a larger "
            "max_memory= or a smaller max_examples="
        )
