"""Which modules a region count can see, and the forward hooks that read (and pin) their
activation patterns.

A ReLU network is piecewise affine in its input: the input space is tiled into convex
"linear regions", one per activation pattern (Montúfar et al. 2014, "On the Number of
Linear Regions of Deep Neural Networks"). The pattern is read where a module can be
hooked: the INPUT of every ``nn.ReLU``, ``nn.LeakyReLU`` and ``nn.PReLU`` (its
pre-activation ``z``; the neuron's state is ``z > 0``) and of every max-pool (its state
is the argmax position within each window). Everything else must be affine in eval mode.
Activations applied functionally (``F.relu`` inside ``forward``) are invisible to module
hooks: they are neither counted nor detected unless no supported module exists at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.padding import (
    _CircularPadNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
)
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd
from torch.utils.hooks import RemovableHandle

#: Piecewise-linear activations whose input sign is a neuron's state.
ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
#: Max-pools: each output element's state is the argmax position within its window.
POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
#: torch.nn modules that are affine in their input in eval mode (or only hold others).
AFFINE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    _ConvNd,
    _BatchNorm,
    _DropoutNd,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
    _CircularPadNd,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Upsample,
    nn.ChannelShuffle,
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
)
SUPPORTED = "nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.MaxPool1d/2d/3d, nn.AdaptiveMaxPool1d/2d/3d"

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_MAX_POOL = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_POOL_DIMS = {
    1: (nn.MaxPool1d, nn.AdaptiveMaxPool1d),
    2: (nn.MaxPool2d, nn.AdaptiveMaxPool2d),
    3: (nn.MaxPool3d, nn.AdaptiveMaxPool3d),
}


def pattern_modules(model: nn.Module, owner: str, *, pools: bool = True) -> dict[str, nn.Module]:
    """The modules whose inputs carry the activation pattern, by name, in model order.

    Built-in ``torch.nn`` modules must be one of :data:`ACTIVATIONS`, :data:`POOLS` (when
    ``pools``) or :data:`AFFINE`; modules defined outside torch are trusted (their own
    ``forward`` cannot be inspected), their children are checked.

    Raises:
        ValueError: a compiled model, a built-in module that is not piecewise linear
            (``Tanh``, ``GELU``, ``LayerNorm``, attention, RNNs, ...), a BatchNorm without
            running statistics, a max-pool when ``pools`` is False, or no supported
            activation module at all (e.g. only ``F.relu`` calls).
    """
    if any(type(m).__name__ == "OptimizedModule" for m in model.modules()):
        raise ValueError(f"{owner} cannot hook a torch.compile'd module; pass model._orig_mod")
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, ACTIVATIONS) or (pools and isinstance(module, POOLS)):
            found[name or "model"] = module
        else:
            _check_affine(name or "model", module, owner, pools)
    if not found:
        raise ValueError(
            f"{owner}: the model has no {SUPPORTED} module, so no neuron can be watched; "
            "activations applied as functions (F.relu, torch.relu) are invisible to module "
            "hooks: use nn.ReLU modules in the model"
        )
    return found


def _check_affine(name: str, module: nn.Module, owner: str, pools: bool) -> None:
    if isinstance(module, POOLS):
        raise ValueError(
            f"{owner}: module {name!r} ({type(module).__name__}) is a max-pool, which the exact "
            "segment walk does not support; use a model without max-pool (or strided "
            "convolutions instead)"
        )
    if isinstance(module, _BatchNorm) and module.running_mean is None:
        raise ValueError(
            f"{owner}: BatchNorm {name!r} has no running statistics (track_running_stats="
            "False), so even in eval mode it normalises with the statistics of the probe's "
            "own batch and is not affine; train it with track_running_stats=True"
        )
    built_in = type(module).__module__.startswith("torch.")
    if built_in and not isinstance(module, AFFINE) and type(module) is not nn.Module:
        raise ValueError(
            f"{owner}: module {name!r} ({type(module).__name__}) is not piecewise linear, or "
            f"not a supported piecewise-linear module; the count needs a network whose only "
            f"nonlinearities are {SUPPORTED} modules (between affine layers, BatchNorm with "
            "running statistics, dropout, average pooling, padding and reshaping)"
        )


def _rows(tensor: Tensor, rows: int, name: str, owner: str) -> Tensor:
    """``[B, F]`` view of a batch-first tensor, or a ValueError naming the module."""
    if tensor.ndim == 0 or tensor.shape[0] != rows:
        raise ValueError(
            f"{owner}: module {name!r} saw a tensor of shape {tuple(tensor.shape)}, expected "
            f"{rows} rows first (one per input): the count needs batch-first activations"
        )
    return tensor.reshape(rows, -1)


def pool_argmax(module: nn.Module, x: Tensor) -> Tensor:
    """The argmax position of every window of a max-pool on ``x`` (same shape as its
    output; ties keep the kernel's first maximum)."""
    dims = next(d for d, types in _POOL_DIMS.items() if isinstance(module, types))
    if isinstance(module, _AdaptiveMaxPoolNd):
        return _ADAPTIVE_MAX_POOL[dims](x, module.output_size, return_indices=True)[1]
    return _MAX_POOL[dims](
        x,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        ceil_mode=module.ceil_mode,
        return_indices=True,
    )[1]


class PatternRecorder:
    """Forward pre-hooks recording each call's neuron states ``[B, F]`` in call order.

    States: ``z > 0`` (bool) for activations, the window argmax (int64) for max-pools.
    A module called several times contributes one entry per call.
    """

    def __init__(self, modules: dict[str, nn.Module], rows: int, owner: str) -> None:
        self.modules, self.rows, self.owner = modules, rows, owner
        self.calls: list[tuple[str, Tensor]] = []  # (module name, [B, F] states)

    def attach(self) -> list[RemovableHandle]:
        handles: list[RemovableHandle] = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(self._hook(name)))
        except BaseException:
            remove(handles)
            raise
        return handles

    def _hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            z = args[0].detach()
            state = pool_argmax(module, z) if isinstance(module, POOLS) else z > 0
            self.calls.append((name, _rows(state, self.rows, name, self.owner)))

        return hook


def negative_slope(module: nn.Module, z: Tensor) -> Tensor | float:
    """The slope of an activation module below zero, broadcastable against ``z``."""
    if isinstance(module, nn.LeakyReLU):
        return module.negative_slope
    if isinstance(module, nn.PReLU):
        weight = module.weight.to(z.dtype)  # [C] or [1]
        shape = [1, -1] + [1] * (z.ndim - 2) if weight.numel() > 1 else [1]
        return weight.reshape(shape)
    return 0.0


class PinnedPatterns:
    """Hooks recording every activation's pre-activation ``z`` ``[B, F]`` in call order;
    while :attr:`masks` is set, the activation's output is replaced by the affine map of
    the pinned pattern, ``where(mask, z, slope · z)``, so the whole network is affine."""

    def __init__(self, modules: dict[str, nn.Module], rows: int, owner: str) -> None:
        self.modules, self.rows, self.owner = modules, rows, owner
        self.values: list[Tensor] = []  # per call [B, F]
        self.masks: list[Tensor] | None = None  # per call [B, F] bool, or None: free

    def attach(self) -> list[RemovableHandle]:
        handles: list[RemovableHandle] = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(self._pre(name)))
                handles.append(module.register_forward_hook(self._post))
        except BaseException:
            remove(handles)
            raise
        return handles

    def _pre(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            z = args[0].detach()
            z = z.clone() if getattr(module, "inplace", False) else z  # in-place ops overwrite
            self.values.append(_rows(z, self.rows, name, self.owner))

        return hook

    def _post(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        if self.masks is None:
            return None
        index = len(self.values) - 1
        z = self.values[index].reshape(output.shape)
        mask = self.masks[index].reshape(output.shape)
        return torch.where(mask, z, negative_slope(module, z) * z)


def remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
