"""Singular values of the weight matrices (and of recurrent gates), per tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import spectra
from ..keys import Key
from ..spectra.matrix import check_int, compute_dtype
from .base import PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .spectra import _sigmas
from .tensors import stack_scalars, stacked_norms


@dataclass(frozen=True, kw_only=True, eq=False)
class WeightSpectrum(ProbeOptions):
    """Spectral norm and stable rank of each weight matrix, by warm-started power iteration.

    Two signals. *Exploding recurrent dynamics* (Pascanu, Mikolov & Bengio 2013, "On
    the difficulty of training recurrent neural networks"): back-propagation through
    time multiplies by the recurrent matrix at every step; with activation
    derivatives bounded by ``γ`` (1 for tanh), a largest singular value below ``1/γ``
    makes gradients vanish and one above it is needed for them to explode, so a
    recurrent spectral norm growing far past 1 is the warning. ``nn.GRU``/``nn.LSTM``
    stack gate blocks in ``weight_hh_l*`` as ``[gates·H, H]`` (GRU ``r, z, n``; LSTM
    ``i, f, g, o``, PyTorch's order) whose roles differ (sigmoid gates saturate, the
    candidate feeds the state): each block's spectral norm is recorded too. ``nn.RNN``
    has one block, its ``spectral_norm``. *Rank collapse*: a stable rank
    ``||W||_F² / ||W||_2²`` falling towards 1 means the layer maps everything onto a
    few directions (the low-rank bias of deep networks, Huh et al. 2023).

    Each measurement runs ``iters`` power iterations on ``WᵀW`` per matrix from the
    vector the last one left (``cold_iters`` the first time; ``2·iters`` products;
    :func:`~trainprobe.spectra.spectral_norm`): never above ``||W||_2``, and the error
    shrinks by ``(σ_1/σ_0)²`` per iteration, so a near-degenerate top that rotates
    fast stays a few percent low (σ_1/σ_0 = 0.96, Adam at lr 1e-2: 3%); ``residual``
    shows it, raise ``iters``. Those vectors, one per matrix and gate block, are the
    only state kept. No sync, except the optional exact singular values on CUDA.

    Keys: see ``keys`` (``gate_<gate>``: ``r z n`` or ``i f g o``; ``sigma_<i>`` with
    ``k > 0``, for ``i < k`` and ``i < min(rows, cols)``). Stable rank and residual are
    NaN for an all-zero matrix.

    Args:
        k: exact singular values per matrix (a full SVD, ``O(rows·cols·min(rows, cols))``,
            hence off by default).
        iters: power iterations per measurement, warm-started.
        cold_iters: power iterations of a matrix's first measurement.
        schedule: when to measure (default every 10 steps).
        seed: first start vectors from ``torch.Generator(device).manual_seed(seed)``.
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "weight_spectrum"
    schedule: Schedule = every(10)
    keys = (
        Key("weight_spectrum/spectral_norm/<param>", "σ̂_0, a lower bound of ‖W‖_2"),
        Key(
            "weight_spectrum/stable_rank/<param>",
            "‖W‖_F² / σ̂_0² (exact ‖W‖_F); falling: a few directions dominate",
        ),
        Key(
            "weight_spectrum/residual/<param>",
            "‖WᵀW v − σ̂_0² v‖ / σ̂_0²: small when the power iteration converged",
        ),
        Key(
            "weight_spectrum/gate_<gate>/<param>",
            "the spectral norm of a GRU/LSTM gate block of the recurrent matrix: that gate's "
            "recurrent gain",
        ),
        Key("weight_spectrum/sigma_<i>/<param>", "the exact i-th largest singular value"),
    )
    k: int = 0
    iters: int = 4
    cold_iters: int = 30
    seed: int = 0
    # the last power iterate [cols] per matrix and gate block: the only state kept
    _vectors: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("WeightSpectrum: k", self.k, 0)
        check_int("WeightSpectrum(iters=...)", self.iters, 1)
        check_int("WeightSpectrum(cold_iters=...)", self.cold_iters, 1)
        check_int("WeightSpectrum(seed=...)", self.seed, 0)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        mats = {
            n: spectra.as_matrix(p.detach()) for n, p in ctx.params.items() if spectra.is_matrix(p)
        }
        if not mats:
            return {}
        names = tuple(mats)
        found = [self._power(n, m) for n, m in mats.items()]
        sigma = stack_scalars([e.value for e in found])  # [L]
        residual = stack_scalars([e.residual for e in found])  # [L]
        frobenius = stacked_norms(list(mats.values()))  # [L]
        out: dict[str, Value] = {
            f"{self.name}/spectral_norm": PerLayer(names, sigma),
            f"{self.name}/stable_rank": PerLayer(names, spectra.stable_rank(frobenius, sigma)),
            f"{self.name}/residual": PerLayer(names, residual / sigma**2),
        }
        out.update(self._gates(ctx.model, mats))
        if self.k:
            exact = {n: torch.linalg.svdvals(m.to(compute_dtype(m))) for n, m in mats.items()}
            out.update(_sigmas(self.name, exact, self.k))
        return out

    def _power(self, key: str, matrix: Tensor) -> spectra.SpectralNorm:
        """Power iteration on ``matrix``, warm from ``key``'s last vector; keeps the new one."""
        last = self._vectors.get(key)
        if last is not None and last.shape[0] == matrix.shape[1] and last.device == matrix.device:
            found = spectra.spectral_norm(matrix, start=last, iters=self.iters)
        else:
            generator = torch.Generator(device=matrix.device).manual_seed(self.seed)
            found = spectra.spectral_norm(matrix, iters=self.cold_iters, generator=generator)
        self._vectors[key] = found.vector
        return found

    def _gates(self, model: nn.Module, mats: dict[str, Tensor]) -> dict[str, Value]:
        """``weight_spectrum/gate_<g>``: every GRU/LSTM recurrent matrix, per gate block."""
        per_gate: dict[str, tuple[list[str], list[Tensor]]] = {}
        for name, mode in recurrent_weights(model).items():
            blocks = spectra.gate_blocks(mats[name], mode) if name in mats else {}
            for gate, block in blocks.items():  # [H, H]
                names, values = per_gate.setdefault(gate, ([], []))
                names.append(name)
                values.append(self._power(f"{name}/{gate}", block).value)
        return {
            f"{self.name}/gate_{gate}": PerLayer(tuple(names), stack_scalars(values))
            for gate, (names, values) in per_gate.items()
        }


def recurrent_weights(model: nn.Module) -> dict[str, str]:
    """``{parameter name: mode}`` for the ``weight_hh_l*`` of every ``nn.RNNBase``."""
    return {
        f"{prefix}.{name}" if prefix else name: module.mode
        for prefix, module in model.named_modules()
        if isinstance(module, nn.RNNBase)
        for name, _ in module.named_parameters(recurse=False)
        if name.startswith("weight_hh")
    }
