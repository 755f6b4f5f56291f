"""Singular-value spectra of gradient and weight matrices, per layer: every parameter
with two or more dimensions is a matrix (:func:`~trainprobe.spectra.as_matrix`: conv
kernels ``[out, in·Πk]``); biases and norm scales have none and are skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import spectra
from ..keys import Key
from ..spectra.matrix import check_int, compute_dtype
from ..spectra.temporal import check_alpha
from .base import PerLayer, StepContext, Value, probe_name
from .schedules import Schedule, check_schedule, every
from .tensors import stack_scalars, stacked_norms


@dataclass(frozen=True)
class EveryStep:
    """Due at every step (a probe with a running state); the probe records at ``record``."""

    record: Schedule

    def __call__(self, step: int) -> bool:
        return True

    def describe(self) -> str:
        return f"every step (running state), records at {self.record.describe()}"


class GradSpectrum:
    """Singular values of each weight matrix's gradient, and its slow (EMA) share.

    A layer's gradient is far from full rank (a Linear layer's batch gradient has
    rank at most the number of inputs it saw) and concentrates in a few directions as training
    goes on (the premise of GaLore, Zhao et al. 2024): a falling stable or effective
    rank says the layer is pushed along fewer directions.

    Spectra, at the ``schedule`` steps: exact when ``min(rows, cols) <= exact_max``,
    else the top ``m = max(k, energy_rank)`` by randomized SVD (Halko, Martinsson &
    Tropp 2011; slightly low). The Frobenius norm is exact either way, so stable rank
    and energy share miss no tail. ``effective_rank`` is Roy & Vetterli's ``exp(H(p))``,
    ``p_i = σ_i / Σ_j σ_j`` (σ normalised by their sum, not their squares'): exact
    for small matrices, else that of the renormalised top ``m``: a lower bound, <= m.

    Slow gradients (``alpha`` not None), as in Grokfast (Lee et al. 2024): the EMA
    ``ema ← α·ema + (1 − α)·g``, started at the first gradient and read after this
    step's update, is the slow part, ``g − ema`` the fast one;
    ``slow_ratio = ||ema||² / (||ema||² + ||g − ema||²)`` in ``[0, 1]`` is 1 for a
    gradient constant in time and has a pure-noise floor ``(1 − α)/(1 − α + 2α²)``
    (0.0103 at α = 0.98; derivation in :func:`~trainprobe.spectra.slow_ratio`). It
    starts at 1 and forgets that start in about ``1/(1 − α)`` steps.

    Schedule: with ``alpha`` set, ``self.schedule`` is :class:`EveryStep` (due every
    step for one fused on-device ``ema += (1 − α)(g − ema)``, no sync) and ``measure``
    returns ``{}`` except at the ``schedule=`` steps (``self.record``): one update per
    ``mon.step`` block. The EMA restarts when a step does not follow the last one
    seen (a new run) or a gradient changes shape or device. It costs one float32
    (float64 for float64 weights) copy of every weight matrix on its device while
    slow tracking is on (:meth:`reset` frees it). ``.grad`` is only read. On CUDA the
    SVD synchronises once per matrix at record steps (``svdvals`` does); nothing else.

    Keys: see ``keys`` (``sigma_<i>`` for ``i < k`` and ``i < min(rows, cols)``;
    ``slow_ratio`` with ``alpha``). NaN for an all-zero gradient; parameters without
    ``.grad`` are left out.

    Args:
        k: singular values recorded per matrix.
        energy_rank: ``r`` of ``energy_top_r`` (default ``k``).
        alpha: slow-gradient EMA decay in ``(0, 1)`` (Grokfast's 0.98); None: no slow
            tracking (the probe then runs only at its schedule and keeps no state).
        schedule: when spectra are computed and recorded (default every 10 steps).
        exact_max: matrices with ``min(rows, cols)`` above it use the randomized SVD.
        oversample: randomized SVD oversampling ``p``.
        power_iters: randomized SVD power iterations ``q``.
        seed: randomized SVD draws from ``torch.Generator(device).manual_seed(seed +
            step)``, never from the global RNG.
    """

    name = "grad_spectrum"
    keys = (
        Key("grad_spectrum/sigma_<i>/<param>", "the i-th largest singular value of the gradient"),
        Key("grad_spectrum/stable_rank/<param>", "||G||_F² / σ_0²"),
        Key("grad_spectrum/effective_rank/<param>", "exp(H(p)), the entropy effective rank"),
        Key("grad_spectrum/energy_top_r/<param>",
            "Σ_{i<r} σ_i² / ||G||_F², r = energy_rank"),
        Key("grad_spectrum/slow_ratio/<param>", "the slow (EMA) share of the gradient"),
    )
    needs = frozenset({"grads"})

    def __init__(self, k: int = 3, *, energy_rank: int | None = None,
                 alpha: float | None = 0.98, schedule: Schedule | None = None,
                 name: str | None = None,
                 exact_max: int = spectra.EXACT_MAX, oversample: int = 10,
                 power_iters: int = 2, seed: int = 0) -> None:  # fmt: skip
        self.record = every(10) if schedule is None else schedule
        check_schedule(self.record, "GradSpectrum")
        self.name = probe_name(self, name)
        self.k = check_int("GradSpectrum: k", k, 1)
        rank = k if energy_rank is None else energy_rank
        self.energy_rank = check_int("GradSpectrum(energy_rank=...)", rank, 1)
        self.alpha = None if alpha is None else check_alpha(alpha, "GradSpectrum")
        self.exact_max = check_int("GradSpectrum(exact_max=...)", exact_max, 1)
        self.oversample = check_int("GradSpectrum(oversample=...)", oversample, 0)
        self.power_iters = check_int("GradSpectrum(power_iters=...)", power_iters, 0)
        self.seed = check_int("GradSpectrum(seed=...)", seed, 0)
        self.schedule = self.record if alpha is None else EveryStep(self.record)
        self._ema: dict[str, Tensor] = {}
        self._last_step: int | None = None

    @property
    def slow_gradients(self) -> Mapping[str, Tensor]:
        """The current EMA per weight matrix (a read-only view; parameter shapes)."""
        return MappingProxyType(self._ema)

    def reset(self) -> None:
        """Drop the EMA; the next step starts it again from that step's gradient."""
        self._ema.clear()
        self._last_step = None

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        grads = {n: p.grad.detach() for n, p in ctx.params.items()
                 if p.grad is not None and spectra.is_matrix(p)}  # fmt: skip
        if self.alpha is not None:
            self._track(ctx.step, grads)
        if not grads or not self.record(ctx.step):
            return {}
        out = self._spectra(grads, ctx.step)
        if self.alpha is not None:
            names = tuple(grads)
            ratio = spectra.slow_ratio([self._ema[n] for n in names], list(grads.values()))
            out[f"{self.name}/slow_ratio"] = PerLayer(names, ratio)  # [L]
        return out

    def _track(self, step: int, grads: dict[str, Tensor]) -> None:
        """One EMA step for every matrix with a gradient (its first one starts it)."""
        if self._last_step is not None and step <= self._last_step:
            self._ema.clear()  # a new run
        self._last_step = step
        going = {n: g for n, g in grads.items() if (e := self._ema.get(n)) is not None
                 and e.shape == g.shape and e.device == g.device}  # fmt: skip
        spectra.ema_update_([self._ema[n] for n in going], list(going.values()), self.alpha)
        for name in [n for n in grads if n not in going]:  # a first gradient starts the EMA
            self._ema[name] = grads[name].to(compute_dtype(grads[name]), copy=True)

    def _spectra(self, grads: dict[str, Tensor], step: int) -> dict[str, Value]:
        options = {"top": max(self.k, self.energy_rank), "exact_max": self.exact_max,
                   "oversample": self.oversample, "power_iters": self.power_iters}  # fmt: skip
        found = {}
        for name, grad in grads.items():
            generator = torch.Generator(device=grad.device).manual_seed(self.seed + step)
            found[name] = spectra.spectrum(spectra.as_matrix(grad), generator=generator, **options)
        names, specs = tuple(found), list(found.values())
        out = _sigmas("grad_spectrum", {n: s.sigma for n, s in found.items()}, self.k)
        for metric, values in (
            ("stable_rank", [spectra.stable_rank(s.frobenius, s.sigma[0]) for s in specs]),
            ("effective_rank", [spectra.effective_rank(s.sigma) for s in specs]),
            ("energy_top_r", [spectra.energy_fraction(s.sigma, s.frobenius, self.energy_rank)
                              for s in specs]),
        ):  # fmt: skip
            out[f"{self.name}/{metric}"] = PerLayer(names, stack_scalars(values))  # [L]
        return out

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "energy_rank": self.energy_rank, "alpha": self.alpha,
                "record": self.record.describe(), "exact_max": self.exact_max,
                "oversample": self.oversample, "power_iters": self.power_iters,
                "seed": self.seed}  # fmt: skip


class WeightSpectrum:
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
    """

    name = "weight_spectrum"
    keys = (
        Key("weight_spectrum/spectral_norm/<param>", "σ̂_0, a lower bound of ||W||_2"),
        Key("weight_spectrum/stable_rank/<param>", "||W||_F² / σ̂_0² (exact ||W||_F)"),
        Key("weight_spectrum/residual/<param>",
            "||WᵀW v − σ̂_0² v|| / σ̂_0²: small when the power iteration converged"),
        Key("weight_spectrum/gate_<gate>/<param>",
            "the spectral norm of a GRU/LSTM gate block"),
        Key("weight_spectrum/sigma_<i>/<param>", "the exact i-th largest singular value"),
    )
    needs: frozenset[str] = frozenset()

    def __init__(self, k: int = 0, *, iters: int = 4, cold_iters: int = 30,
                 schedule: Schedule | None = None, seed: int = 0,
                 name: str | None = None) -> None:  # fmt: skip
        self.schedule = every(10) if schedule is None else schedule
        check_schedule(self.schedule, "WeightSpectrum")
        self.name = probe_name(self, name)
        self.k = check_int("WeightSpectrum: k", k, 0)
        self.iters = check_int("WeightSpectrum(iters=...)", iters, 1)
        self.cold_iters = check_int("WeightSpectrum(cold_iters=...)", cold_iters, 1)
        self.seed = check_int("WeightSpectrum(seed=...)", seed, 0)
        self._vectors: dict[str, Tensor] = {}  # [cols] last power iterate per matrix

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        mats = {n: spectra.as_matrix(p.detach()) for n, p in ctx.params.items()
                if spectra.is_matrix(p)}  # fmt: skip
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
            out.update(_sigmas("weight_spectrum", exact, self.k))
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
        return {f"{self.name}/gate_{gate}": PerLayer(tuple(names), stack_scalars(values))
                for gate, (names, values) in per_gate.items()}  # fmt: skip

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "iters": self.iters, "cold_iters": self.cold_iters,
                "seed": self.seed}  # fmt: skip


def recurrent_weights(model: nn.Module) -> dict[str, str]:
    """``{parameter name: mode}`` for the ``weight_hh_l*`` of every ``nn.RNNBase``."""
    return {f"{prefix}.{name}" if prefix else name: module.mode
            for prefix, module in model.named_modules() if isinstance(module, nn.RNNBase)
            for name, _ in module.named_parameters(recurse=False)
            if name.startswith("weight_hh")}  # fmt: skip


def _sigmas(probe: str, sigmas: Mapping[str, Tensor], k: int) -> dict[str, Value]:
    """``{probe}/sigma_<i>`` for ``i < k``, over the matrices that have an ``i``-th value."""
    out: dict[str, Value] = {}
    for i in range(k):
        names = tuple(n for n, s in sigmas.items() if s.shape[0] > i)
        if names:
            values = stack_scalars([sigmas[n][i] for n in names])  # [L_i]
            out[f"{probe}/sigma_{i}"] = PerLayer(names, values)
    return out
