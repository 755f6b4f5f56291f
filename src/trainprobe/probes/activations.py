"""Activation statistics per module: mean, standard deviation, RMS, fraction of zeros."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..keys import Key
from .base import OnHost, PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .tensors import stack_scalars

#: Modules whose outputs are >= 0 and exactly zero on a region of inputs (dead units).
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Leaf modules skipped by default: they copy, rescale or reshape their input.
SKIPPED: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
)


def _first_tensor(output: Any) -> Tensor | None:
    """The output tensor of a module (first tensor of a tuple, e.g. RNN or attention)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    return None


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) a ``torch.compile`` module."""
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())


def _leading_rows(x: Tensor, max_elements: int | None) -> Tensor:
    """The first rows of ``x`` (dim 0) holding at most ``max_elements`` elements.

    When a single row is larger (batch size 1), its first ``max_elements`` elements.
    """
    if max_elements is None or x.ndim == 0 or x.numel() <= max_elements:
        return x
    rows = max_elements // max(x.numel() // max(x.shape[0], 1), 1)
    return x[:rows] if rows >= 1 else x.reshape(-1)[:max_elements]


class _Moments:
    """Running sums on the device: count, ``Σx``, ``Σx²`` and the count of non-zeros.

    Two fast reductions per call (``sum`` and a ``dot``), merged by addition;
    ``var = Σx²/n − mean²`` is accurate to about ``ε·mean²/var`` (ε the dtype's
    epsilon), ample for activations whose mean is not thousands of standard
    deviations from zero.
    """

    def __init__(self, count_zeros: bool) -> None:
        self.count_zeros = count_zeros
        self.n = 0
        self.total: Tensor | None = None
        self.squares: Tensor | None = None
        self.nonzero: Tensor | None = None

    def add(self, x: Tensor) -> None:
        if not x.is_floating_point() or x.numel() == 0:
            return
        flat = x.detach().reshape(-1)  # [N]
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # half/bfloat16: accumulate in float32
        total, squares = flat.sum(), torch.dot(flat, flat)
        # exact zeros only: a NaN (a broken batch) is not a dead unit
        nonzero = torch.count_nonzero(flat).to(flat.dtype) if self.count_zeros else None
        if self.total is None:
            self.total, self.squares, self.nonzero = total, squares, nonzero
        else:
            self.total, self.squares = self.total + total, self.squares + squares
            if nonzero is not None:
                self.nonzero = self.nonzero + nonzero
        self.n += flat.numel()

    def normalised(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(mean, mean of squares, fraction of zeros or None)`` as 0-d tensors."""
        zero_frac = None if self.nonzero is None else 1 - self.nonzero / self.n
        return self.total / self.n, self.squares / self.n, zero_frac


@dataclass(frozen=True, kw_only=True, eq=False)
class ActivationStats(ProbeOptions):
    """Mean, standard deviation, RMS and zero fraction of module outputs on due steps.

    Forward hooks are attached only for due steps and removed when the step
    ends. A module called several times in one step (shared weights, RNN cells)
    contributes all its calls. Tuple outputs (RNN, attention) use their first
    tensor. Statistics pool batch and features together, over the leading rows
    (first dimension, usually the batch) of each output holding at most
    ``max_elements`` elements — with a shuffled loader a random subset of the
    batch, which keeps the cost per hooked module small and flat; the standard
    error of a zero fraction estimated from 65,536 elements is below 0.002.

    The root mean square ``sqrt(Σx²/n)`` comes from the same running sums as the
    standard deviation (no extra reduction). Rybakov et al. 2024, "Methods of improving
    LLM training stability", watch it on the outputs of each block's attention and MLP
    linear layers: it grows before the loss diverges.

    Keys: see ``keys`` (``zero_frac`` for ReLU-family modules only).

    Args:
        schedule: when to measure (default every 10 steps).
        modules: module names to watch (default: every leaf module except dropout,
            identity and reshaping modules).
        max_elements: elements per output used for the statistics (whole rows, at
            least one); ``None`` uses every element.
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "activations"
    across_ranks = "combined"
    schedule: Schedule = every(10)
    keys = (
        Key(
            "activations/mean/<module>",
            "mean of the module's outputs; drifting far from 0 with depth: a shift that "
            "normalisation would absorb",
        ),
        Key("activations/std/<module>", "standard deviation of the module's outputs"),
        Key(
            "activations/rms/<module>",
            "root mean square of the module's outputs; growing in a block's attention/MLP "
            "linear layers precedes divergence (Rybakov et al. 2024)",
        ),
        Key(
            "activations/zero_frac/<module>",
            "fraction of exactly-zero outputs of a ReLU-family module (dead units)",
        ),
    )
    needs = frozenset({"activations"})

    modules: Iterable[str] | None = None
    max_elements: int | None = 65_536
    _modules: tuple[str, ...] | None = field(default=None, init=False, repr=False)
    _watched_cache: tuple[nn.Module, dict[str, nn.Module]] | None = field(
        default=None, init=False, repr=False
    )
    _moments: dict[str, _Moments] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.modules, str):
            raise TypeError("ActivationStats(modules=...) takes a list of names, not one string")
        m = self.max_elements
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(
                f"ActivationStats(max_elements=...) must be a positive int or None, got {m!r}"
            )
        if self.modules is not None:
            self._keep(_modules=tuple(self.modules))

    def _watched(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules to hook (checked once per model: the result is cached)."""
        if _is_compiled(model):
            raise ValueError(
                "ActivationStats cannot hook a torch.compile'd module: its forward hooks run "
                "only while tracing, so later steps would be silently missing; watch the "
                "uncompiled module (model._orig_mod) or drop ActivationStats"
            )
        named = dict(model.named_modules())
        if self._modules is not None:
            missing = [m for m in self._modules if m not in named]
            if missing:
                raise ValueError(
                    f"ActivationStats: no module named {missing} in the model; "
                    f"choose from {[n for n in named if n][:20]}"
                )
            return {m: named[m] for m in self._modules}
        return {
            name: module
            for name, module in named.items()
            if name and not any(module.children()) and not isinstance(module, SKIPPED)
        }

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        self._moments.clear()
        handles = []
        if self._watched_cache is None or self._watched_cache[0] is not model:
            self._keep(_watched_cache=(model, self._watched(model)))
        try:
            for name, module in self._watched_cache[1].items():
                moments = _Moments(isinstance(module, RELU_FAMILY))
                self._moments[name] = moments

                def hook(_module: nn.Module, _inputs: Any, output: Any, m: _Moments = moments):
                    tensor = _first_tensor(output)
                    if tensor is not None:
                        m.add(_leading_rows(tensor, self.max_elements))

                handles.append(module.register_forward_hook(hook))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if ctx.ranks is not None:  # each rank saw its own batch: combine the sums
            return self._sums()
        called = {name: m.normalised() for name, m in self._moments.items() if m.n}
        self._moments.clear()
        if not called:
            return {}
        names = tuple(called)
        means = stack_scalars([v[0] for v in called.values()])  # [M]
        squares = stack_scalars([v[1] for v in called.values()])  # [M]
        out: dict[str, Value] = {
            f"{self.name}/mean": PerLayer(names, means),
            f"{self.name}/std": PerLayer(names, torch.sqrt(torch.clamp(squares - means**2, min=0))),
            f"{self.name}/rms": PerLayer(names, torch.sqrt(squares)),
        }
        relus = [(n, v[2]) for n, v in called.items() if v[2] is not None]
        if relus:
            out[f"{self.name}/zero_frac"] = PerLayer(
                tuple(n for n, _ in relus), stack_scalars([z for _, z in relus])
            )
        return out

    def _sums(self) -> dict[str, Value]:
        """The running sums ``[M, 4]`` (count, Σx, Σx², non-zeros) as one value the
        monitor sums over ranks, finished on the host into the same keys as in one
        process (the pooled statistics of every rank's elements)."""
        called = {name: m for name, m in self._moments.items() if m.n}
        self._moments.clear()
        if not called:
            return {}
        rows = []
        for m in called.values():
            zero = torch.zeros((), dtype=m.total.dtype, device=m.total.device)
            nonzero = m.nonzero if m.nonzero is not None else zero
            count = torch.full((), float(m.n), dtype=m.total.dtype, device=m.total.device)
            rows.append(torch.stack([count, m.total, m.squares, nonzero]))
        relus = tuple(m.nonzero is not None for m in called.values())
        finish = partial(_pooled, probe=self.name, names=tuple(called), relus=relus)
        return {f"{self.name}/moments": OnHost(torch.stack(rows), finish, reduce="sum")}


def _pooled(
    sums: np.ndarray, *, probe: str, names: tuple[str, ...], relus: tuple[bool, ...]
) -> dict[str, float]:
    """Mean, standard deviation, RMS and zero fraction per module from summed moments."""
    sums = np.asarray(sums, dtype=np.float64).reshape(len(names), 4)
    out = {}
    for (count, total, squares, nonzero), name, relu in zip(sums, names, relus, strict=True):
        mean = total / count
        out[f"{probe}/mean/{name}"] = float(mean)
        out[f"{probe}/std/{name}"] = float(np.sqrt(max(squares / count - mean**2, 0.0)))
        out[f"{probe}/rms/{name}"] = float(np.sqrt(squares / count))
        if relu:
            out[f"{probe}/zero_frac/{name}"] = float(1 - nonzero / count)
    return out
