"""What a corpus case is (:class:`Case`, :class:`Expected`) and the training loop most
cases share (:func:`run_loop`): a real loop under ``trainprobe.watch``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import Probe, default_probes

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Expected:
    """A ground-truth finding of a sick case.

    Attributes:
        detector: the detector that must report it, or a tuple of acceptable detectors
            (``("exploding_gradients", "instability")``: ``analyze`` folds the symptoms
            of one episode into one ``instability`` finding).
        start: first step of the true span.
        end: last step of the true span.
        tolerance: steps either side of the span that still count.
        severity: least severity that counts (``"warning"``; ``"info"`` for a detector
            whose true finding is information, e.g. a grokked run).
    """

    detector: str | tuple[str, ...]
    start: int
    end: int
    tolerance: int = 0
    severity: str = "warning"

    def __post_init__(self) -> None:
        if self.end < self.start or self.tolerance < 0 or self.severity not in SEVERITIES:
            raise ValueError(f"bad Expected: {self}")

    @property
    def detectors(self) -> tuple[str, ...]:
        return (self.detector,) if isinstance(self.detector, str) else tuple(self.detector)

    @property
    def window(self) -> tuple[int, int]:
        return self.start - self.tolerance, self.end + self.tolerance


@dataclass(frozen=True)
class Case:
    """One generated training run with known ground truth.

    Attributes:
        name: unique, lower_snake.
        kind: ``"healthy"`` (no warning or critical finding may fire) or ``"sick"``.
        train: ``train(run_dir)`` runs the training loop under ``trainprobe.watch``.
        expect: the findings a sick case must get (empty for healthy cases).
        allowed_info: detectors whose ``info`` findings are true on this run.
        note: what the run is, and why its ground truth holds.
        also: detectors whose warning or critical findings are true side effects of a
            sick case's mishap (a NaN run also spikes), so not false alarms.
    """

    name: str
    kind: str
    train: Callable[[Path], None]
    expect: tuple[Expected, ...] = ()
    allowed_info: tuple[str, ...] = ()
    note: str = ""
    also: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in ("healthy", "sick"):
            raise ValueError(f"{self.name}: kind must be 'healthy' or 'sick'")
        if (self.kind == "sick") != bool(self.expect):
            raise ValueError(f"{self.name}: a sick case needs expect=, a healthy one none")


def ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of ``model(x)`` against integer labels."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``½ mean ||model(x) − y||²`` over the batch (summed over outputs)."""
    x, y = batch
    out = model(x)
    return 0.5 * (out - y.reshape(out.shape)).pow(2).sum(dim=-1).mean()


def constant(lr: float) -> Callable[[int], float]:
    return lambda step: lr


def warmup_decay(lr: float, warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warmup to ``lr`` over ``warmup`` steps, then linear decay to lr / 20."""

    def at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (1 - 0.95 * (step - warmup) / max(1, steps - warmup))

    return at


def cosine(lr: float, steps: int, warmup: int = 0) -> Callable[[int], float]:
    """Optional linear warmup, then cosine decay to 0."""

    def at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return at


def spike(lr: float, start: int, length: int, factor: float) -> Callable[[int], float]:
    """``lr``, times ``factor`` for ``length`` steps from ``start`` (a schedule bug)."""
    return lambda step: lr * factor if start <= step < start + length else lr


def run_loop(
    run_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch_at: Callable[[int], Batch],
    *,
    steps: int,
    loss: LossFn = ce,
    probes: Sequence[Probe] | None = None,
    extra: Sequence[Probe] = (),
    lr_at: Callable[[int], float] | None = None,
    clip: float | None = None,
    probe_loss: LossFn | None = None,
    stop_nonfinite: bool = False,
) -> None:
    """The ordinary loop: ``mon.step(step, batch=...)``, backward, log the loss, clip
    (outside the block, so the probes see the raw gradient, as ``clip_grad_norm_``
    returns it), step. Default probes every 10 steps plus ``extra``."""
    probes = [*(default_probes(every_n=10) if probes is None else probes), *extra]
    with trainprobe.watch(
        model, probes, run_dir=run_dir, optimizer=opt, loss_fn=probe_loss or loss
    ) as mon:
        for step in range(steps):
            if lr_at is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
            batch = batch_at(step)
            with mon.step(step, batch=batch) as s:
                value = loss(model, batch)
                value.backward()
                s.log(loss=value)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
            if stop_nonfinite and not torch.isfinite(value):
                break


def sampler(data: tuple[torch.Tensor, ...], size: int, seed: int) -> Callable[[int], Batch]:
    """Mini-batches of ``size`` drawn with replacement from ``data`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    n = data[0].shape[0]

    def at(step: int) -> Batch:
        idx = torch.randint(0, n, (size,), generator=gen)
        return tuple(t[idx] for t in data)

    return at


def full(data: tuple[torch.Tensor, ...]) -> Callable[[int], Batch]:
    """The whole data set every step (full-batch training)."""
    return lambda step: data
