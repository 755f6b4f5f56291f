"""Singular-value spectra of gradient and weight matrices, per layer: every parameter
with two or more dimensions is a matrix (:func:`~trainprobe.spectra.as_matrix`: conv
kernels ``[out, in·Πk]``); biases and norm scales have none and are skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from .. import spectra
from ..keys import Key
from ..spectra.matrix import check_int, compute_dtype
from ..spectra.temporal import check_alpha
from .base import PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .tensors import stack_scalars


@dataclass(frozen=True)
class EveryStep:
    """Due at every step (a probe with a running state); the probe records at ``record``."""

    record: Schedule

    def __call__(self, step: int) -> bool:
        return True

    def describe(self) -> str:
        return f"every step (running state), records at {self.record.describe()}"


@dataclass(frozen=True, kw_only=True, eq=False)
class GradSpectrum(ProbeOptions):
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

    Schedule: ``schedule`` says when spectra are recorded; with ``alpha`` set the probe
    is due every step (``due`` is :class:`EveryStep`) for one fused on-device
    ``ema += (1 − α)(g − ema)``, no sync, and ``measure`` returns ``{}`` except at the
    ``schedule`` steps: one update per ``mon.step`` block. The EMA restarts when a step
    does not follow the last one seen (a new run) or a gradient changes shape or
    device. It costs one float32 (float64 for float64 weights) copy of every weight
    matrix on its device while slow tracking is on (:meth:`reset` frees it). ``.grad``
    is only read. On CUDA the SVD synchronises once per matrix at record steps
    (``svdvals`` does); nothing else.

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
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "grad_spectrum"
    schedule: Schedule = every(10)
    keys = (
        Key("grad_spectrum/sigma_<i>/<param>", "the i-th largest singular value of the gradient"),
        Key("grad_spectrum/stable_rank/<param>", "‖G‖_F² / σ_0², the gradient's stable rank"),
        Key(
            "grad_spectrum/effective_rank/<param>",
            "exp(H(p)), the gradient's entropy effective rank; falling: updates along fewer "
            "directions",
        ),
        Key(
            "grad_spectrum/energy_top_r/<param>",
            "Σ_{i<r} σ_i² / ‖G‖_F², r = energy_rank: near 1, the update is low-rank",
        ),
        Key("grad_spectrum/slow_ratio/<param>", "the slow (EMA) share of the gradient"),
    )
    needs = frozenset({"grads"})

    k: int = 3
    energy_rank: int | None = None
    alpha: float | None = 0.98
    exact_max: int = spectra.EXACT_MAX
    oversample: int = 10
    power_iters: int = 2
    seed: int = 0
    _energy_rank: int = field(default=0, init=False, repr=False)  # energy_rank, or k
    _ema: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)
    _last_step: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("GradSpectrum: k", self.k, 1)
        rank = self.k if self.energy_rank is None else self.energy_rank
        self._keep(_energy_rank=check_int("GradSpectrum(energy_rank=...)", rank, 1))
        if self.alpha is not None:
            check_alpha(self.alpha, "GradSpectrum")
        check_int("GradSpectrum(exact_max=...)", self.exact_max, 1)
        check_int("GradSpectrum(oversample=...)", self.oversample, 0)
        check_int("GradSpectrum(power_iters=...)", self.power_iters, 0)
        check_int("GradSpectrum(seed=...)", self.seed, 0)

    @property
    def due(self) -> Schedule:
        """When the monitor runs the probe: every step while slow tracking (``alpha``)
        needs every gradient, else at ``schedule``."""
        return self.schedule if self.alpha is None else EveryStep(self.schedule)

    @property
    def slow_gradients(self) -> Mapping[str, Tensor]:
        """The current EMA per weight matrix (a read-only view; parameter shapes)."""
        return MappingProxyType(self._ema)

    def reset(self) -> None:
        """Drop the EMA; the next step starts it again from that step's gradient."""
        self._ema.clear()
        self._keep(_last_step=None)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        grads = {
            n: ctx.unscaled(p.grad.detach())
            for n, p in ctx.params.items()
            if p.grad is not None and spectra.is_matrix(p)
        }
        if self.alpha is not None:
            self._track(ctx.step, grads)
        if not grads or not self.schedule(ctx.step):
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
        self._keep(_last_step=step)
        going = {
            n: g
            for n, g in grads.items()
            if (e := self._ema.get(n)) is not None and e.shape == g.shape and e.device == g.device
        }
        spectra.ema_update_([self._ema[n] for n in going], list(going.values()), self.alpha)
        for name in [n for n in grads if n not in going]:  # a first gradient starts the EMA
            self._ema[name] = grads[name].to(compute_dtype(grads[name]), copy=True)

    def _spectra(self, grads: dict[str, Tensor], step: int) -> dict[str, Value]:
        options = {
            "top": max(self.k, self._energy_rank),
            "exact_max": self.exact_max,
            "oversample": self.oversample,
            "power_iters": self.power_iters,
        }
        found = {}
        for name, grad in grads.items():
            generator = torch.Generator(device=grad.device).manual_seed(self.seed + step)
            found[name] = spectra.spectrum(spectra.as_matrix(grad), generator=generator, **options)
        names, specs = tuple(found), list(found.values())
        out = _sigmas(self.name, {n: s.sigma for n, s in found.items()}, self.k)
        for metric, values in (
            ("stable_rank", [spectra.stable_rank(s.frobenius, s.sigma[0]) for s in specs]),
            ("effective_rank", [spectra.effective_rank(s.sigma) for s in specs]),
            (
                "energy_top_r",
                [spectra.energy_fraction(s.sigma, s.frobenius, self._energy_rank) for s in specs],
            ),
        ):
            out[f"{self.name}/{metric}"] = PerLayer(names, stack_scalars(values))  # [L]
        return out


def _sigmas(probe: str, sigmas: Mapping[str, Tensor], k: int) -> dict[str, Value]:
    """``{probe}/sigma_<i>`` for ``i < k``, over the matrices that have an ``i``-th value."""
    out: dict[str, Value] = {}
    for i in range(k):
        names = tuple(n for n, s in sigmas.items() if s.shape[0] > i)
        if names:
            values = stack_scalars([sigmas[n][i] for n in names])  # [L_i]
            out[f"{probe}/sigma_{i}"] = PerLayer(names, values)
    return out
