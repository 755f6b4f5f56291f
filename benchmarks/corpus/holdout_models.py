"""Models of the holdout cases, apart from the corpus's ``models.py``: a two-hidden-layer
MLP, a pre-norm residual MLP, a 1-D conv net, a GroupNorm CNN, a fastText-style
bag-of-embeddings classifier, an autoencoder, a classify-and-regress two-head net, a
library ``nn.RNN`` classifier and an embedding net for pairs of integers."""

from __future__ import annotations

import torch
from torch import nn


def mlp(din: int, dout: int, act: type[nn.Module], *, hidden: int = 64) -> nn.Sequential:
    """Two hidden layers of ``hidden`` units with activation ``act``."""
    return nn.Sequential(
        nn.Linear(din, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, dout)
    )


class PreNormBlock(nn.Module):
    """``x + fc2(gelu(fc1(layernorm(x))))`` with PyTorch's default initialisation."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def prenorm_mlp(din: int, classes: int, *, width: int = 48, blocks: int = 4) -> nn.Sequential:
    """Stem, ``blocks`` pre-norm residual blocks, a final LayerNorm and a head."""
    return nn.Sequential(
        nn.Linear(din, width),
        *(PreNormBlock(width) for _ in range(blocks)),
        nn.LayerNorm(width),
        nn.Linear(width, classes),
    )


def conv1d_net(classes: int = 3, channels: int = 12) -> nn.Sequential:
    """Two strided 1-D convolutions with ReLU over ``[B, 1, 64]``, global average pool, head."""
    return nn.Sequential(
        nn.Conv1d(1, channels, 7, stride=2, padding=3),
        nn.ReLU(),
        nn.Conv1d(channels, 2 * channels, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, classes),
    )


def groupnorm_cnn(classes: int = 3, channels: int = 8) -> nn.Sequential:
    """Conv-GroupNorm-SiLU ×2 with pooling over ``[B, 1, 12, 12]`` images, a head."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.GroupNorm(2, channels),
        nn.SiLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.GroupNorm(4, 2 * channels),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, classes),
    )


class BagClassifier(nn.Module):
    """fastText-style: the mean of the documents' token embeddings (``nn.EmbeddingBag``
    over ``[B, L]`` ids), then a linear head; ``hidden`` adds a tanh layer between."""

    def __init__(self, vocab: int, classes: int, *, dim: int = 16, hidden: int = 0) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh()) if hidden else None
        self.head = nn.Linear(hidden or dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.bag(ids)
        return self.head(h if self.hidden is None else self.hidden(h))


def autoencoder(dim: int = 32, code: int = 6) -> nn.Sequential:
    """``dim → 24 → code → 24 → dim`` with ELU."""
    return nn.Sequential(
        nn.Linear(dim, 24),
        nn.ELU(),
        nn.Linear(24, code),
        nn.Linear(code, 24),
        nn.ELU(),
        nn.Linear(24, dim),
    )


class ClassifyAndRegress(nn.Module):
    """A shared GELU trunk; a 2-logit head and a scalar head; returns both."""

    def __init__(self, din: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(din, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        self.cls = nn.Linear(32, 2)
        self.reg = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.cls(h), self.reg(h)


class SequenceRNN(nn.Module):
    """``nn.RNN`` (tanh, batch first, PyTorch's default init) over ``[B, T, D]``, a head on
    the last hidden state."""

    def __init__(self, din: int, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.RNN(din, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class PairNet(nn.Module):
    """Embeddings of ``a`` and ``b`` ``[B, 2]`` concatenated, a ReLU layer, logits over p."""

    def __init__(self, p: int, dim: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(p, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, p))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(pairs).flatten(1))
