"""Data of the holdout cases, apart from the corpus's ``data.py`` so that the holdout
measures detectors on runs they were not tuned on: spirals, concentric rings, a
checkerboard, noisy waveforms, bags of tokens, bar images, a smooth 1-D regression,
low-rank vectors, Gaussian clusters at given frequencies, and a checkerboard with a
linear shortcut. Every generator is seeded."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

Pair = tuple[torch.Tensor, torch.Tensor]


def spirals(n: int, *, arms: int = 3, noise: float = 0.08, seed: int = 0) -> Pair:
    """``arms`` interleaved spirals ``[n, 2]`` (radius up to 1, 1.5 turns), labels ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, arms, (n,), generator=gen)
    r = torch.rand(n, generator=gen)
    angle = 3 * math.pi * r + 2 * math.pi * y / arms
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return x + noise * torch.randn(n, 2, generator=gen), y


def rings(n: int, *, classes: int = 3, noise: float = 0.07, seed: int = 0) -> Pair:
    """Concentric rings ``[n, 2]`` of radius 0.4, 0.8, 1.2, ... by class, labels ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    radius = 0.4 * (y + 1).float() + noise * torch.randn(n, generator=gen)
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1), y


def checkerboard(n: int, *, cells: int = 3, seed: int = 0) -> Pair:
    """Points ``[n, 2]`` uniform in ``[-1, 1]²``, labelled by the parity of their cell on a
    ``cells × cells`` board (a two-class XOR pattern)."""
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, 2, generator=gen) - 1
    cell = ((x + 1) / 2 * cells).floor().clamp(max=cells - 1).long()
    return x, (cell[:, 0] + cell[:, 1]) % 2


def waveforms(n: int, *, length: int = 64, classes: int = 3, seed: int = 0) -> Pair:
    """Noisy sines ``[n, 1, length]`` at a frequency set by the class (2, 4, 6, ... cycles),
    random phase and amplitude 0.5-1.5, noise 0.5; labels ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    t = torch.linspace(0, 1, length)
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    amp = 0.5 + torch.rand(n, 1, generator=gen)
    wave = amp * torch.sin(2 * math.pi * 2 * (y[:, None] + 1).float() * t + phase)
    return (wave + 0.5 * torch.randn(n, length, generator=gen))[:, None], y


def token_bags(
    n: int,
    *,
    classes: int = 4,
    common: int = 40,
    topic: int = 5,
    length: int = 16,
    signal: int = 3,
    seed: int = 0,
) -> Pair:
    """Documents ``[n, length]`` of token ids: ``signal`` tokens drawn from the class's
    ``topic`` topic words (ids ``common + c·topic ...``), the rest from ``common``
    shared filler words (ids ``0 .. common-1``); labels ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    filler = torch.randint(0, common, (n, length - signal), generator=gen)
    words = common + y[:, None] * topic + torch.randint(0, topic, (n, signal), generator=gen)
    docs = torch.cat([words, filler], dim=1)
    order = torch.argsort(torch.rand(n, length, generator=gen), dim=1)
    return torch.gather(docs, 1, order), y


def bars(n: int, *, size: int = 12, seed: int = 0) -> Pair:
    """``[n, 1, size, size]`` images of one bright bar (horizontal, vertical or diagonal:
    the label) at a random offset, under noise 0.4."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    pos = torch.randint(0, size, (n,), generator=gen)
    i = torch.arange(size)
    rows = (i[None, :, None] == pos[:, None, None]).expand(n, size, size)
    cols = (i[None, None, :] == pos[:, None, None]).expand(n, size, size)
    diag = ((i[:, None] - i[None, :]) % size)[None] == pos[:, None, None]
    img = torch.where(y[:, None, None] == 0, rows, torch.where(y[:, None, None] == 1, cols, diag))
    return (img.float() + 0.4 * torch.randn(n, size, size, generator=gen))[:, None], y


def smooth_curve(n: int, *, seed: int = 0) -> Pair:
    """``x ~ U[-3, 3]`` ``[n, 1]`` and the noiseless target ``sin(2x) + 0.5 cos(5x)/(1+x²)``."""
    gen = torch.Generator().manual_seed(seed)
    x = 6 * torch.rand(n, 1, generator=gen) - 3
    return x, torch.sin(2 * x) + 0.5 * torch.cos(5 * x) / (1 + x**2)


def low_rank(n: int, *, dim: int = 32, rank: int = 4, seed: int = 0) -> torch.Tensor:
    """Vectors ``[n, dim]`` on a random ``rank``-dimensional subspace, plus noise 0.01."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=gen) / math.sqrt(rank)
    z = torch.randn(n, rank, generator=gen)
    return z @ basis + 0.01 * torch.randn(n, dim, generator=gen)


def clusters(
    n: int, weights: tuple[float, ...], *, dim: int = 6, spread: float = 0.8, seed: int = 0
) -> Pair:
    """Gaussian clusters ``[n, dim]`` around centres at distance 2.5 from the origin, at
    class frequencies ``weights``."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.5 * F.normalize(torch.randn(len(weights), dim, generator=gen), dim=1)
    probs = torch.tensor(weights, dtype=torch.float32)
    y = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    return centres[y] + spread * torch.randn(n, dim, generator=gen), y


def shortcut(n: int = 2048, *, seed: int = 29) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 3]``: a checkerboard position (features 0-1, the label is the cell parity)
    and a shortcut feature 2 = ±(1 + U[0, 1]) by the label, separable with a wide margin."""
    xy, y = checkerboard(n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sign = 2 * y.float() - 1
    return torch.cat([xy, (sign * (1 + torch.rand(n, generator=gen)))[:, None]], dim=1), y
