"""Activation statistics per module: mean, standard deviation, fraction of zeros."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .base import StepContext, Value
from .schedules import Schedule, check_schedule, every

#: Modules whose outputs are exactly zero on a region of inputs (dead-unit fraction).
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Threshold)
#: Leaf modules skipped by default: they copy, rescale or reshape their input.
SKIPPED: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Identity, nn.Flatten, nn.Unflatten,
)  # fmt: skip


def _first_tensor(output: Any) -> Tensor | None:
    """The output tensor of a module (first tensor of a tuple, e.g. RNN or attention)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    return None


class _Moments:
    """Running count/mean/M2 (Chan et al. 1979 merge) and zero count, on device."""

    def __init__(self, count_zeros: bool) -> None:
        self.count_zeros = count_zeros
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.zeros: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach()
        if not x.is_floating_point() or x.numel() == 0:
            return
        var, mean = torch.var_mean(x, correction=0)
        n_b = x.numel()
        zeros = (x == 0).sum() if self.count_zeros else None
        if self.mean is None:
            self.n, self.mean, self.m2, self.zeros = n_b, mean, var * n_b, zeros
            return
        n = self.n + n_b
        delta = mean - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + var * n_b + delta * delta * (self.n * n_b / n)
        if zeros is not None:
            self.zeros = self.zeros + zeros
        self.n = n


class ActivationStats:
    """Mean, standard deviation and zero fraction of module outputs on due steps.

    Forward hooks are attached only for due steps and removed when the step
    ends. A module called several times in one step (shared weights, RNN cells)
    contributes all its calls. Statistics are over every element of the output
    (batch and features together); tuple outputs (RNN, attention) use their
    first tensor.

    Keys:
        ``activations/mean/<module>``, ``activations/std/<module>``,
        ``activations/zero_frac/<module>`` (ReLU-family modules only: the fraction
        of exactly-zero outputs, a dead-unit signal).

    Args:
        schedule: when to measure (default every 10 steps).
        modules: module names to watch (default: every leaf module except dropout,
            identity and reshaping modules).
    """

    name = "activations"
    needs = frozenset({"activations"})

    def __init__(
        self, *, schedule: Schedule | None = None, modules: Iterable[str] | None = None
    ) -> None:
        self.schedule = every(10) if schedule is None else schedule
        check_schedule(self.schedule, "ActivationStats")
        if isinstance(modules, str):
            raise TypeError("ActivationStats(modules=...) takes a list of names, not one string")
        self.modules = None if modules is None else tuple(modules)
        self._moments: dict[str, _Moments] = {}

    def _watched(self, model: nn.Module) -> dict[str, nn.Module]:
        named = dict(model.named_modules())
        if self.modules is not None:
            missing = [m for m in self.modules if m not in named]
            if missing:
                raise ValueError(
                    f"ActivationStats: no module named {missing} in the model; "
                    f"choose from {[n for n in named if n][:20]}"
                )
            return {m: named[m] for m in self.modules}
        return {
            name: module
            for name, module in named.items()
            if name and not any(module.children()) and not isinstance(module, SKIPPED)
        }

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        self._moments = {}
        handles = []
        for name, module in self._watched(model).items():
            moments = _Moments(isinstance(module, RELU_FAMILY))
            self._moments[name] = moments

            def hook(_module: nn.Module, _inputs: Any, output: Any, m: _Moments = moments):
                tensor = _first_tensor(output)
                if tensor is not None:
                    m.add(tensor)

            handles.append(module.register_forward_hook(hook))
        return handles

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        out: dict[str, Value] = {}
        for name, m in self._moments.items():
            if m.mean is None:
                continue  # not called this step
            out[f"activations/mean/{name}"] = m.mean
            out[f"activations/std/{name}"] = torch.sqrt(m.m2 / m.n)
            if m.zeros is not None:
                out[f"activations/zero_frac/{name}"] = m.zeros.to(m.mean.dtype) / m.n
        self._moments = {}
        return out

    def settings(self) -> dict[str, Any]:
        return {"modules": list(self.modules) if self.modules is not None else "leaf modules"}
