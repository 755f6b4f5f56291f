"""Generated data sets (no download): blobs, moons, digit-like images, sequences,
modular-addition pairs and realisable regressions. Every generator is seeded."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from trainprobe.cli.demo import make_digits

Pair = tuple[torch.Tensor, torch.Tensor]


def blobs(
    n: int,
    *,
    classes: int = 4,
    dim: int = 10,
    spread: float = 1.0,
    seed: int = 0,
    weights: tuple[float, ...] | None = None,
) -> Pair:
    """Gaussian blobs ``[n, dim]`` around random unit-ish centres (scale 3), labels ``[n]``;
    ``weights`` gives class frequencies (imbalance)."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dim, generator=gen) / math.sqrt(dim) * 2
    probs = torch.tensor(weights or [1.0] * classes)
    y = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    x = centres[y] + spread * torch.randn(n, dim, generator=gen)
    return x, y


def moons(n: int, *, seed: int = 0, noise: float = 0.1) -> Pair:
    """Two interleaved half circles ``[n, 2]`` and labels ``[n]`` (as in the quickstart)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    angle = torch.rand(n, generator=gen) * math.pi
    x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    x = torch.where(y[:, None] == 1, torch.tensor([1.0, 0.5]) - x, x)
    return x + noise * torch.randn(n, 2, generator=gen), y


def digits(n: int, *, seed: int = 0) -> Pair:
    """``[n, 1, 8, 8]`` digit-like images and labels ``[n]`` (the demo's generator)."""
    return make_digits(n, gen=torch.Generator().manual_seed(seed))


def sequences(n: int, *, length: int = 12, dim: int = 4, classes: int = 3, seed: int = 0) -> Pair:
    """``[n, length, dim]`` noise sequences; the label is the class of the mean of a few
    marked steps spread over the sequence (so early and late steps both matter)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, dim, generator=gen)
    proj = torch.randn(dim, classes, generator=gen)
    marked = x[:, :: max(1, length // 4)].mean(dim=1)  # [n, dim]
    return x, (marked @ proj).argmax(dim=1)


def late_sequences(n: int, *, length: int = 30, dim: int = 4, seed: int = 0) -> Pair:
    """``[n, length, dim]`` sequences whose binary label depends on the last step only."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, dim, generator=gen)
    return x, (x[:, -1, 0] + 0.5 * x[:, -1, 1] > 0).long()


def modular(p: int, fraction: float, *, seed: int = 0) -> tuple[Pair, Pair]:
    """One-hot ``(a, b)`` ``[p², 2p]`` with labels ``(a + b) mod p``, split into a train
    share ``fraction`` and the held-out rest."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
    y = (a + b) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    k = int(fraction * p * p)
    return (x[order[:k]], y[order[:k]]), (x[order[k:]], y[order[k:]])


def regression(n: int, *, dim: int = 8, out: int = 1, seed: int = 0, noise: float = 0.0) -> Pair:
    """``[n, dim]`` inputs and ``[n, out]`` targets of a random linear map (realisable)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    w = torch.randn(dim, out, generator=gen) / math.sqrt(dim)
    return x, x @ w + noise * torch.randn(n, out, generator=gen)


def split(data: Pair, fraction: float) -> tuple[Pair, Pair]:
    """The first ``fraction`` of the examples, and the rest."""
    k = int(fraction * data[0].shape[0])
    return (data[0][:k], data[1][:k]), (data[0][k:], data[1][k:])
