"""Small models of every family the corpus trains: MLPs, a BatchNorm CNN, GRU/LSTM,
a transformer, residual nets with zero-initialised tensors, and an unrolled RNN whose
hidden-state gradients can be read."""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(
    din: int, dout: int, *, hidden: int = 64, depth: int = 2, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """``depth`` hidden layers of ``hidden`` units with activation ``act``."""
    layers: list[nn.Module] = []
    width = din
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, dout))


def cnn(classes: int = 10, channels: int = 8) -> nn.Sequential:
    """Conv-BN-ReLU ×2 with pooling for ``[B, 1, 8, 8]`` images."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.BatchNorm2d(2 * channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, classes),
    )


class Recurrent(nn.Module):
    """A GRU or LSTM over ``[B, T, D]`` sequences, classifying from the last output."""

    def __init__(self, cell: str, din: int, classes: int, hidden: int = 24) -> None:
        super().__init__()
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(din, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Transformer(nn.Module):
    """One pre-norm encoder layer over ``[B, T, D]`` sequences, mean-pooled."""

    def __init__(self, din: int, classes: int, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(din, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 64, width))
        block = nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        return self.head(self.norm(self.encoder(h)).mean(dim=1))


class ResidualBlock(nn.Module):
    """``x + alpha * fc2(relu(fc1(x)))``. ``rezero``: the scalar ``alpha`` starts at exactly
    zero (ReZero, Bachlechner et al. 2021); else ``alpha`` is 1 and ``fc2.weight`` starts at
    zero (the zero-initialised last layer of a residual branch). No name says "bias"."""

    def __init__(self, width: int, rezero: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.alpha = nn.Parameter(torch.zeros(()) if rezero else torch.ones(()))
        if not rezero:
            nn.init.zeros_(self.fc2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.fc2(torch.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """Stem, residual blocks with zero-initialised tensors, a LayerNorm, and a head whose
    weight starts at zero."""

    def __init__(
        self, din: int, classes: int, width: int = 32, blocks: int = 3, rezero: bool = False
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(din, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, rezero) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


class UnrolledRNN(nn.Module):
    """A tanh RNN unrolled by hand over ``[B, T, D]``; ``keep=True`` keeps every hidden
    state (``self.states``, with ``retain_grad``) so that ``∂L/∂h_t`` can be read."""

    def __init__(self, din: int, classes: int, hidden: int = 32, gain: float = 1.0) -> None:
        super().__init__()
        self.cell = nn.RNNCell(din, hidden, nonlinearity="tanh")
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            w = torch.linalg.qr(torch.randn(hidden, hidden))[0]
            self.cell.weight_hh.copy_(gain * w)  # spectral radius ``gain``
        self.keep = False
        self.states: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        self.states = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            if self.keep and h.requires_grad:
                h.retain_grad()
                self.states.append(h)
        return self.head(h)


class TwoHeads(nn.Module):
    """A shared trunk and one head per task; returns ``(out_a, out_b)``. With
    ``head_angle`` the two heads start as unit-norm vectors that many radians apart."""

    def __init__(
        self, din: int, dout: int = 1, hidden: int = 32, head_angle: float | None = None
    ) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(din, hidden), nn.Tanh())
        self.head_a = nn.Linear(hidden, dout)
        self.head_b = nn.Linear(hidden, dout)
        if head_angle is not None:
            u, v = torch.linalg.qr(torch.randn(hidden, 2))[0].T  # orthonormal
            with torch.no_grad():
                self.head_a.weight.copy_(u)
                self.head_b.weight.copy_(math.cos(head_angle) * u + math.sin(head_angle) * v)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.head_a(h), self.head_b(h)
