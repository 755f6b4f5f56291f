"""Tiny shared training cases: models of every family and a seeded training loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.curvature import criterion_loss


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def cnn() -> nn.Module:
    """A small CNN with BatchNorm and dropout (both change under train mode)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout2d(0.1),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 8] -> 4 tokens of 2
        tokens = self.embed(x.reshape(x.shape[0], 4, 2).repeat(1, 1, 4))  # [B, 4, 16]
        return self.head(self.block(tokens).mean(dim=1))


class TinyRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], 4, 2))  # [B, 4, 12]
        return self.head(out[:, -1])


class TwoNames(nn.Module):
    """One block registered under two attribute names (``self.b = self.a``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(8, 8), nn.ReLU()
        self.b = self.a
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.b(self.act(self.a(x)))))


def repeated() -> nn.Module:
    """``nn.ModuleList([block] * 3)``: one block applied three times."""
    block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    return nn.Sequential(*nn.ModuleList([block] * 3), nn.Linear(8, 3))


class Tied(nn.Module):
    """One weight held by two modules (``out.weight = inp.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU()
        self.out.weight = self.inp.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.out(self.act(self.inp(x)))))


class Frozen(nn.Module):
    """A frozen first layer (``requires_grad=False``) under a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.act, self.head = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        self.body.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(x)))


class Unused(nn.Module):
    """A trainable layer the forward pass never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.act, self.head = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        self.spare = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(x)))


SHARING: dict[str, Callable[[], nn.Module]] = {
    "two_names": TwoNames,
    "repeated": repeated,
    "tied": Tied,
    "frozen": Frozen,
    "unused": Unused,
}
"""Models whose parameters are shared, tied, frozen or unused (the observer contract)."""

MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": TinyTransformer,
    "rnn": TinyRNN,
}


class OnceTanh(torch.autograd.Function):
    """tanh whose backward is marked once_differentiable, as fused kernels often are: a
    layer without a double backward (the exact reference is nn.Tanh in its place)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class OnceAct(nn.Module):
    """:class:`OnceTanh` as a module."""

    def forward(self, x):
        return OnceTanh.apply(x)


def batch(name: str, step: int, *, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch for ``step`` (its own generator: no global RNG use)."""
    gen = torch.Generator().manual_seed(1000 + step)
    shape = (size, 1, 8, 8) if name == "cnn" else (size, 8)
    return torch.randn(shape, generator=gen), torch.randint(0, 3, (size,), generator=gen)


def train(
    name: str,
    *,
    steps: int = 20,
    probes: Sequence[object] | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    raise_at: int | None = None,
    flush_seconds: float = 0.0,
    on_model: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Train ``MODELS[name]`` (or ``SHARING[name]``) with Adam; watched by ``probes`` when
    ``run_dir`` is given; ``on_model(model)`` sees the model before training starts."""
    torch.manual_seed(seed)
    model = {**MODELS, **SHARING}[name]()
    if on_model is not None:
        on_model(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()

    def one_step(step: int, mon: trainprobe.Monitor | None) -> None:
        x, y = batch(name, step)
        if mon is None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            with mon.step(step, batch=(x, y)) as s:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                s.log(loss=loss)
                if step == raise_at:
                    raise RuntimeError("boom")
        opt.step()
        opt.zero_grad()

    if run_dir is None:
        for step in range(steps):
            one_step(step, None)
        return model, opt
    with trainprobe.watch(
        model,
        probes,
        run_dir=run_dir,
        optimizer=opt,
        loss_fn=criterion_loss(nn.CrossEntropyLoss()),
        on_probe_error="raise",
        flush_seconds=flush_seconds,
    ) as mon:
        for step in range(steps):
            one_step(step, mon)
    return model, opt


def hook_count(model: nn.Module) -> int:
    """Every hook a module or parameter can hold, summed over the model."""
    total = 0
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(module, attr, {}))
    for p in model.parameters():
        total += len(getattr(p, "_backward_hooks", None) or {})
        total += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return total
