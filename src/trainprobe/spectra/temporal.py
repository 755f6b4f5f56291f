"""The slow and fast parts of a gradient sequence: an exponential moving average split.

Grokfast (Lee et al. 2024, "Grokfast: accelerated grokking by amplifying slow
gradients") treats the gradients of one parameter over training steps as a signal
and low-pass filters it: ``ema_t = α·ema_{t−1} + (1 − α)·g_t`` (started at the
first gradient) is the slow component and ``g_t − ema_t`` the fast one. These
kernels run on the device in fused calls and never read values on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_alpha(alpha: object, owner: str) -> float:
    """``alpha`` as a float if it is a number in ``(0, 1)``; else TypeError/ValueError."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{owner}: alpha must be a float in (0, 1), got {alpha!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{owner}: alpha must be in (0, 1) (Grokfast uses 0.98), got {alpha!r}")
    return float(alpha)


def ema_update_(emas: Sequence[Tensor], values: Sequence[Tensor], alpha: float) -> None:
    """In place, for every pair: ``ema ← α·ema + (1 − α)·value`` (one fused call).

    Computed as ``ema += (1 − α)(value − ema)`` (``torch._foreach_lerp_``); ``values``
    are only read (cast to each ``ema``'s dtype, a copy only where they differ).

    Args:
        emas: running averages, updated in place.
        values: this step's tensors, one per ``ema`` and of its shape and device.
        alpha: decay in ``(0, 1)``: the average's memory is about ``1/(1 − α)`` steps.

    Raises:
        TypeError: ``alpha`` is not a number.
        ValueError: ``alpha`` is outside ``(0, 1)`` or the sequences differ in length.
    """
    alpha = check_alpha(alpha, "ema_update_")
    if len(emas) != len(values):
        raise ValueError(
            f"ema_update_: {len(emas)} averages but {len(values)} values; give one value each"
        )
    if emas:
        news = [v.detach().to(e.dtype) for e, v in zip(emas, values, strict=True)]
        torch._foreach_lerp_(list(emas), news, 1.0 - alpha)


def slow_ratio(emas: Sequence[Tensor], values: Sequence[Tensor]) -> Tensor:
    """Share of the slow part in the energy of ``g = ema + (g − ema)``, per tensor:
    ``ρ = ||ema||² / (||ema||² + ||g − ema||²)``, ``[L]``.

    In ``[0, 1]``: 1 when ``g`` is constant in time (all slow), near 0 when it
    oscillates around a zero mean. Unlike ``||ema||² / ||g||²`` it is bounded, and it
    needs no cross term. For stationary gradients ``μ + ξ_t`` (independent noise of
    energy ``E||ξ||² = s²``), with ``c = (1 − α)/(1 + α)``,
    ``E||ema||² → ||μ||² + c s²`` and ``E||g − ema||² → 2α² s²/(1 + α)``, so ``ρ``
    tends to ``(||μ||² + c s²) / (||μ||² + c s² + 2α² s²/(1 + α))``: from the
    pure-noise floor ``(1 − α)/(1 − α + 2α²)`` (0.0103 at α = 0.98) up to 1.
    NaN where both parts are zero.

    Args:
        emas: slow parts, after this step's update (as Grokfast uses them).
        values: this step's tensors ``g``, one per ``ema``.

    Returns:
        ``[L]`` on the first ``ema``'s device, float32 (float64 if an ``ema`` is).

    Raises:
        ValueError: no tensors, or the sequences differ in length.
    """
    if not emas or len(emas) != len(values):
        raise ValueError(
            f"slow_ratio takes as many values as averages (at least one), got "
            f"{len(emas)} and {len(values)}"
        )
    news = [v.detach().to(e.dtype) for e, v in zip(emas, values, strict=True)]
    slow_sq = _squared_norms(list(emas))  # [L]
    fast_sq = _squared_norms(torch._foreach_sub(news, list(emas)))  # [L]  ||g − ema||²
    return slow_sq / (slow_sq + fast_sq)


def _squared_norms(tensors: list[Tensor]) -> Tensor:
    """``[L]`` squared L2 norms (at least float32) on the first tensor's device."""
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device
    norms = [torch.linalg.vector_norm(t, dtype=wide).to(device) for t in tensors]
    return torch.stack(norms) ** 2  # [L]
