"""`trainprobe demo`: train a small CNN on generated digit-like images, watched.

The data are made here (no download): ten 8×8 class prototypes built from
random Gaussian blobs; each example is its prototype shifted by up to one
pixel, rescaled, plus pixel noise. Training is SGD with momentum and a
BatchNorm CNN. Unless ``mishap=False``, the learning rate is raised 12× for a
short stretch at 60% of training — the kind of schedule bug (a warm restart
to the wrong value) that causes loss spikes — so the detectors have something
real to report; the report says which steps it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..monitor import watch
from ..probes import default_probes
from ..progress import Progress


@dataclass(frozen=True)
class DemoConfig:
    """The demo's embedded defaults (each one a CLI flag)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 0.05
    mishap: bool = True
    mishap_factor: float = 12.0
    mishap_steps: int = 25
    seed: int = 0
    probe_every: int = 10
    eval_every: int = 50

    @property
    def mishap_start(self) -> int:
        return int(self.steps * 0.6)


def make_digits(n: int, *, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples ``[n, 1, 8, 8]`` and labels ``[n]`` from fixed class prototypes."""
    proto_gen = torch.Generator().manual_seed(1234)  # same classes for train and held-out
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"))
    centres = torch.rand(10, 3, 2, generator=proto_gen) * 7  # 3 blobs per class
    dist2 = ((grid[None, None] - centres[..., None, None]) ** 2).sum(2)  # [10, 3, 8, 8]
    protos = torch.exp(-dist2 / 3.0).sum(1)  # [10, 8, 8]
    protos = protos / protos.amax(dim=(1, 2), keepdim=True)
    labels = torch.randint(0, 10, (n,), generator=gen)
    shifts = torch.randint(-1, 2, (n, 2), generator=gen)
    images = torch.stack(
        [
            torch.roll(protos[c], (int(s[0]), int(s[1])), dims=(0, 1))
            for c, s in zip(labels, shifts, strict=True)
        ]
    )  # [n, 8, 8]
    scale = 0.6 + 0.8 * torch.rand(n, 1, 1, generator=gen)
    images = images * scale + 0.45 * torch.randn(n, 8, 8, generator=gen)
    return images[:, None], labels


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def learning_rate(config: DemoConfig, step: int) -> float:
    start = config.mishap_start
    if config.mishap and start <= step < start + config.mishap_steps:
        return config.lr * config.mishap_factor
    return config.lr


def run_demo(config: DemoConfig, run_dir: Path) -> None:
    """Train and record into ``run_dir`` (must not hold a run yet)."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x_train, y_train = make_digits(4096, gen=gen)
    x_val, y_val = make_digits(1024, gen=gen)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    meta = {
        "demo": {k: getattr(config, k) for k in config.__dataclass_fields__}
        | {"mishap_start": config.mishap_start}
    }
    with (
        watch(
            model,
            default_probes(every_n=config.probe_every),
            run_dir=run_dir,
            optimizer=opt,
            meta=meta,
        ) as mon,
        Progress(config.steps, "training") as bar,
    ):
        for step in range(config.steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(config, step)
            idx = torch.randint(0, x_train.shape[0], (config.batch_size,), generator=gen)
            x, y = x_train[idx], y_train[idx]
            with mon.step(step, batch=(x, y)) as s:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                s.log(loss=loss, accuracy=(logits.argmax(1) == y).float().mean())
            opt.step()
            opt.zero_grad()
            if step % config.eval_every == 0 or step == config.steps - 1:
                val = accuracy(model, x_val, y_val)
                mon.log(val_accuracy=val)
                bar.update(step + 1, f"val acc {val:.2f}")
