"""Stochastic trace, diagonal and spectral density of a symmetric operator.

Takes an operator, never a model (DESIGN.md rule 1), and applies it to blocks of probe
vectors ``V [n, k] -> A V [n, k]`` through :func:`~.operator.as_matmat`: one batched call
per block, never a Python loop over probes. Probes are Rademacher (±1) or Gaussian,
drawn in float64 on the CPU from an explicit ``torch.Generator`` and then moved to the
device (without one, a fresh generator seeded from OS entropy: the global RNG is never
touched). The operator sees vectors of ``dtype``; everything else is float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .operator import Operator, as_matmat, operator_placement

_DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of ``tr(A)``.

    Attributes:
        value: the estimate.
        stderr: its standard error, sample std / sqrt(#probes) of the random part
            (``nan`` with a single probe).
        matvecs: operator applications used (columns, summed over all calls).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"slq"``.
    """

    value: float
    stderr: float
    matvecs: int
    method: str


def _check_int(name: str, value: object, minimum: int, fix: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{fix}")
    return value


def _setup(
    operator: Operator,
    dim: int,
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    distribution: str,
) -> tuple[Callable[[Tensor], Tensor], torch.dtype, torch.device, torch.Generator]:
    """Batched operator, its input dtype, the device and the generator (as in lanczos)."""
    _check_int("dim", dim, 1)
    matmat = as_matmat(operator, dim)
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # OS entropy; the global RNG stays untouched
    elif not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a CPU torch.Generator, e.g. torch.Generator().manual_seed(0), "
            f"got {type(generator).__name__}"
        )
    device, in_dtype = operator_placement(operator, device, dtype)
    return matmat, in_dtype, device, generator


def _draw(dim: int, k: int, distribution: str, generator: torch.Generator, device) -> Tensor:
    """``[n, k]`` float64 probes, drawn on the CPU then moved to ``device``."""
    if distribution == "rademacher":
        signs = torch.randint(0, 2, (k, dim), generator=generator, dtype=torch.float64)
        return (2 * signs - 1).T.to(device)
    return torch.randn(k, dim, generator=generator, dtype=torch.float64).T.to(device)


def _blocks(count: int, batch_size: int | None) -> list[int]:
    size = count if batch_size is None else batch_size
    return [min(size, count - start) for start in range(0, count, size)]


def _apply(matmat: Callable[[Tensor], Tensor], vs: Tensor, in_dtype, batch_size=None) -> Tensor:
    """``A V [n, k]`` in float64, ``batch_size`` columns per operator call."""
    outs, start = [], 0
    for size in _blocks(vs.shape[1], batch_size):
        block = vs[:, start : start + size]  # [n, b]
        out = matmat(block.to(in_dtype).contiguous())
        if tuple(out.shape) != tuple(block.shape):
            raise ValueError(
                f"the operator returned shape {tuple(out.shape)} for a block of shape "
                f"{tuple(block.shape)}; it must map [n, k] to [n, k]: is dim={vs.shape[0]} right?"
            )
        outs.append(out.detach().to(torch.float64))
        start += size
    out = torch.cat(outs, dim=1)  # [n, k]
    if not bool(torch.isfinite(out).all()):  # deliberate sync: fail loudly, not silently
        raise ValueError(
            "the operator returned NaN/inf: check the loss is finite at these parameters "
            "(and the batch has no NaN), or pass dtype=torch.float32 for a low-precision model"
        )
    return out


def _estimate(samples: Tensor, matvecs: int, method: str, offset: float = 0.0) -> TraceEstimate:
    count = samples.numel()
    std = float(samples.std()) if count > 1 else math.nan  # deliberate sync: the result
    return TraceEstimate(offset + float(samples.mean()), std / math.sqrt(count), matvecs, method)


def hutchinson(
    operator: Operator,
    dim: int,
    *,
    matvecs: int = 100,
    batch_size: int | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's estimator ``tr(A) ≈ (1/m) Σ_i z_iᵀ A z_i`` (Hutchinson 1989).

    Unbiased for ``E[z zᵀ] = I``; ``Var(zᵀAz) = 2(‖A‖_F² − Σ_i a_ii²)`` for Rademacher and
    ``2‖A‖_F²`` for Gaussian probes, so the error falls as ``1/sqrt(m)``.

    Args:
        operator: ``[n, n]`` symmetric tensor, callable ``v [n] -> A v [n]``, or an object
            with ``matvec``/``matmat``.
        dim: ``n``.
        matvecs: number of probes ``m`` (= operator applications).
        batch_size: probes per operator call (default: all ``m`` in one call).
        distribution: ``"rademacher"`` (lower variance) or ``"gaussian"``.
        generator: CPU generator for the probes (default: a fresh one seeded from OS entropy).
        dtype: dtype the operator takes (default: its ``dtype`` attribute, else float64).
        device: where probes live (default: the operator's ``device``, else the CPU).

    Returns:
        :class:`TraceEstimate` with ``stderr = std(z_iᵀAz_i) / sqrt(m)``.

    Examples:
        Rademacher probes are exact on a diagonal matrix: ``zᵀ D z = Σ_i d_i z_i² = tr(D)``
        for every ``z`` of ``±1``, so the estimate is exact and its standard error 0.

        >>> import torch
        >>> D = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, -1.0], dtype=torch.float64))
        >>> estimate = hutchinson(D, 6, matvecs=5, generator=torch.Generator().manual_seed(0))
        >>> estimate.value, estimate.stderr, estimate.matvecs
        (9.5, 0.0, 5)
        >>> hutchinson(lambda v: D @ v, 6, matvecs=5).value  # any ``v -> A v`` callable
        9.5
    """
    matmat, in_dtype, device, gen = _setup(operator, dim, generator, dtype, device, distribution)
    _check_int("matvecs", matvecs, 1)
    batch_size = None if batch_size is None else _check_int("batch_size", batch_size, 1)
    forms = []
    for size in _blocks(matvecs, batch_size):
        z = _draw(dim, size, distribution, gen, device)  # [n, b]
        forms.append((z * _apply(matmat, z, in_dtype)).sum(dim=0))  # [b] zᵀ A z
    return _estimate(torch.cat(forms), matvecs, "hutchinson")


def hutch_plus_plus(
    operator: Operator,
    dim: int,
    *,
    matvecs: int = 100,
    batch_size: int | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1).

    With ``k = ⌊m/3⌋``: ``Q = qr(A S)`` for ``S [n, k]`` random, then
    ``tr(A) ≈ tr(Qᵀ A Q) + (1/g) Σ_i g_iᵀ (I − QQᵀ) A (I − QQᵀ) g_i`` with the remaining
    ``g = m − 2k`` probes. The top of the spectrum is taken exactly, so the error falls as
    ``1/m`` for a decaying spectrum, and a matrix of rank ``<= k`` is traced exactly.
    QR and projections are float64. Arguments as :func:`hutchinson` (``matvecs >= 3``).

    Returns:
        :class:`TraceEstimate`; ``stderr`` is that of the residual Hutchinson part, and
        ``matvecs`` the exact count (``m``, or fewer when ``k > n``).
    """
    matmat, in_dtype, device, gen = _setup(operator, dim, generator, dtype, device, distribution)
    fix = "; use method='hutchinson' for fewer"
    _check_int("matvecs", matvecs, 3, " (Hutch++ splits them in three)" + fix)
    batch_size = None if batch_size is None else _check_int("batch_size", batch_size, 1)
    sketch = _draw(dim, matvecs // 3, distribution, gen, device)  # [n, k]
    q, _ = torch.linalg.qr(_apply(matmat, sketch, in_dtype, batch_size))  # [n, k] float64
    head = float((q * _apply(matmat, q, in_dtype, batch_size)).sum())  # tr(Qᵀ A Q)
    rest = matvecs - 2 * (matvecs // 3)
    forms = []
    for size in _blocks(rest, batch_size):
        g = _draw(dim, size, distribution, gen, device)  # [n, b]
        g = g - q @ (q.T @ g)  # (I − QQᵀ) g
        forms.append((g * _apply(matmat, g, in_dtype)).sum(dim=0))  # [b]
    used = sketch.shape[1] + q.shape[1] + rest
    return _estimate(torch.cat(forms), used, "hutch++", offset=head)


_METHODS = {"hutchinson": hutchinson, "hutch++": hutch_plus_plus}


def trace(
    operator: Operator,
    dim: int,
    *,
    matvecs: int = 100,
    method: str = "hutch++",
    batch_size: int | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """``tr(A)`` by Hutch++ (the default) or Hutchinson.

    Args:
        method: ``"hutch++"`` (:func:`hutch_plus_plus`, needs ``matvecs >= 3``) or
            ``"hutchinson"`` (:func:`hutchinson`).
        operator, dim, matvecs, batch_size, distribution, generator, dtype, device: as
            :func:`hutchinson`.

    Examples:
        Hutch++ takes the top ``matvecs // 3`` directions exactly, so it traces a matrix of
        that rank exactly: here a dense ``6 × 6`` one with eigenvalues summing to 9.5.

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
        >>> eigenvalues = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
        >>> A = q @ torch.diag(eigenvalues) @ q.T
        >>> estimate = trace(A, 6, matvecs=18, generator=torch.Generator().manual_seed(0))
        >>> round(estimate.value, 6), estimate.method
        (9.5, 'hutch++')
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {tuple(_METHODS)}, got {method!r}")
    return _METHODS[method](
        operator,
        dim,
        matvecs=matvecs,
        batch_size=batch_size,
        distribution=distribution,
        generator=generator,
        dtype=dtype,
        device=device,
    )


def diagonal(
    operator: Operator,
    dim: int,
    *,
    matvecs: int = 100,
    batch_size: int | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Stochastic diagonal ``diag(A) ≈ (1/m) Σ_i z_i ⊙ A z_i`` (Bekas, Kokiopoulou & Saad 2007).

    Unbiased for both distributions (for Rademacher probes ``z ⊙ z = 1``, so it is also
    Bekas et al.'s ratio form); entry ``j`` has variance ``Σ_{l≠j} a_jl²`` per Rademacher
    probe. Arguments as :func:`hutchinson`.

    Returns:
        ``[n]`` float64 on ``device``.
    """
    matmat, in_dtype, device, gen = _setup(operator, dim, generator, dtype, device, distribution)
    _check_int("matvecs", matvecs, 1)
    batch_size = None if batch_size is None else _check_int("batch_size", batch_size, 1)
    total = torch.zeros(dim, dtype=torch.float64, device=device)  # [n]
    for size in _blocks(matvecs, batch_size):
        z = _draw(dim, size, distribution, gen, device)  # [n, b]
        total += (z * _apply(matmat, z, in_dtype)).sum(dim=1)
    return total / matvecs
