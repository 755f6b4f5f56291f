"""Healthy holdout runs: architectures, data, optimizers, schedules and loops the detector
corpus does not have (pre-norm residual MLP under RMSprop, a 1-D conv net under Adagrad,
a bag-of-embeddings text classifier under Nesterov with a one-cycle schedule, dropout
with label smoothing, mixup's soft targets, class-weighted imbalance, a classification
task with an agreeing regression task, batches of 4 with noisy labels, a regression
converging to a tiny loss, an autoencoder, gradient accumulation in a GroupNorm CNN, and
fine-tuning from a pre-trained, partly frozen net). No warning or critical finding may
fire on any of them."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import GradConflict, at_steps, every

from . import holdout_data as hd
from . import holdout_models as hm
from .base import Case, ce, full, mse, run_loop, sampler
from .holdout_loops import linear_to_zero, one_cycle, soft_ce, step_decay, task_loop


def resmlp_rmsprop(run_dir: Path, *, steps: int = 600) -> None:
    """Pre-norm residual MLP (4 blocks, width 48) on 3 spirals, RMSprop 1e-3, batches of 128."""
    torch.manual_seed(1)
    model = hm.prenorm_mlp(2, 3)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    run_loop(run_dir, model, opt, sampler(hd.spirals(4096), 128, 1), steps=steps)


def conv1d_adagrad(run_dir: Path, *, steps: int = 500) -> None:
    """1-D conv net on noisy waveforms (3 frequencies), Adagrad 0.05, batches of 64."""
    torch.manual_seed(2)
    model = hm.conv1d_net()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    run_loop(run_dir, model, opt, sampler(hd.waveforms(2048), 64, 2), steps=steps)


def bag_nesterov(run_dir: Path, *, steps: int = 500) -> None:
    """Bag-of-embeddings classifier (tanh hidden layer) on generated documents, SGD
    Nesterov 0.9 under a one-cycle schedule peaking at lr 0.5, batches of 32."""
    torch.manual_seed(3)
    model = hm.BagClassifier(60, 4, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True)
    run_loop(
        run_dir,
        model,
        opt,
        sampler(hd.token_bags(4096), 32, 3),
        steps=steps,
        lr_at=one_cycle(0.5, steps),
    )


def dropout_smoothing(run_dir: Path, *, steps: int = 600) -> None:
    """ReLU MLP with dropout 0.2 on concentric rings, cross-entropy with label smoothing
    0.1 (a loss floor of ~0.2), AdamW 3e-3 wd 0.01 decayed linearly to 0."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(2, 128),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(128, 3),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    def smoothed(net: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(net(x), y, label_smoothing=0.1)

    run_loop(
        run_dir,
        model,
        opt,
        sampler(hd.rings(4096), 64, 4),
        steps=steps,
        loss=smoothed,
        lr_at=linear_to_zero(3e-3, steps),
    )


def mixup(run_dir: Path, *, steps: int = 600, alpha: float = 0.4) -> None:
    """SiLU MLP on 4 overlapping clusters trained on mixup pairs (Zhang et al. 2018):
    inputs and one-hot targets mixed with ``λ ~ Beta(α, α)``, soft-target cross-entropy
    (its floor is the mixed targets' entropy); SGD momentum 0.9, lr 0.1 x0.3 every 200
    steps."""
    torch.manual_seed(5)
    x, y = hd.clusters(4096, (1.0, 1.0, 1.0, 1.0), spread=1.2, seed=5)
    draw = sampler((x, F.one_hot(y, 4).float()), 64, 5)
    beta = torch.distributions.Beta(alpha, alpha)
    gen = torch.Generator().manual_seed(5)

    def batch_at(step: int):
        xb, tb = draw(step)
        lam = beta.sample((xb.shape[0], 1))
        perm = torch.randperm(xb.shape[0], generator=gen)
        return lam * xb + (1 - lam) * xb[perm], lam * tb + (1 - lam) * tb[perm]

    model = hm.mlp(6, 4, nn.SiLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run_loop(
        run_dir, model, opt, batch_at, steps=steps, loss=soft_ce, lr_at=step_decay(0.1, 200, 0.3)
    )


def weighted_imbalance(run_dir: Path, *, steps: int = 400) -> None:
    """Clusters at frequencies 12:4:1 with class-weighted cross-entropy (weights inverse to
    the frequencies), Adam 2e-3, batches of 64; per-class gradients on a fixed batch of
    512 every step for 100 steps, then every 5."""
    weights = (12.0, 4.0, 1.0)
    torch.manual_seed(6)
    x, y = hd.clusters(4096, weights)
    inverse = torch.tensor([sum(weights) / w for w in weights])

    def weighted(net: nn.Module, batch) -> torch.Tensor:
        xb, yb = batch
        return F.cross_entropy(net(xb), yb, weight=inverse)

    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    probe = GradConflict(
        by="class", data=(x[:512], y[:512]), schedule=at_steps(*range(100)) | every(5)
    )
    run_loop(run_dir, model, opt, sampler((x, y), 64, 6), steps=steps, loss=weighted, extra=[probe])


def agreeing_tasks(run_dir: Path, *, steps: int = 500) -> None:
    """Two tasks from one latent ``s = w·x`` (8-D inputs): classify the sign of ``s``
    (cross-entropy) and regress ``s`` (MSE); both need the same feature of the trunk.
    Adam 1e-3, batches of 64."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4096, 8, generator=gen)
    s = x @ F.normalize(torch.randn(8, generator=gen), dim=0)
    torch.manual_seed(7)
    model = hm.ClassifyAndRegress(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def losses(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        xb, sb = batch
        logits, value = net(xb)
        return {
            "sign": F.cross_entropy(logits, (sb > 0).long()),
            "value": (value[:, 0] - sb).pow(2).mean(),
        }

    task_loop(run_dir, model, opt, sampler((x, s), 64, 7), losses, steps=steps)


def tiny_batches(run_dir: Path, *, steps: int = 2000, noise: float = 0.2) -> None:
    """Batches of 4 under plain SGD 0.05 on 3 concentric rings, a ``noise`` share of
    labels redrawn at random: a very noisy batch loss (single batches from 0.15 to 2.7)
    falling 1.1 -> 0.5 towards a floor set by the label noise."""
    x, y = hd.rings(4096, seed=8)
    gen = torch.Generator().manual_seed(8)
    flip = torch.rand(y.shape[0], generator=gen) < noise
    y = torch.where(flip, torch.randint(0, 3, y.shape, generator=gen), y)
    torch.manual_seed(8)
    model = hm.mlp(2, 3, nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run_loop(run_dir, model, opt, sampler((x, y), 4, 8), steps=steps)


def tiny_loss_regression(run_dir: Path, *, steps: int = 1500) -> None:
    """Tanh MLP fitting a smooth noiseless 1-D curve, full batch of 256, Adam 3e-3 x0.1 at
    steps 700 and 1100: the loss falls from 0.27 to 1.2e-4."""
    torch.manual_seed(9)
    model = hm.mlp(1, 1, nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    run_loop(
        run_dir,
        model,
        opt,
        full(hd.smooth_curve(256)),
        steps=steps,
        loss=mse,
        lr_at=lambda step: 3e-3 * (0.1 if step >= 700 else 1.0) * (0.1 if step >= 1100 else 1.0),
    )


def autoencode(run_dir: Path, *, steps: int = 800) -> None:
    """ELU autoencoder ``32 → 6 → 32`` of rank-4 vectors (MSE against the input), Adam 3e-3
    decayed linearly to 0, batches of 64."""
    data = hd.low_rank(4096)
    torch.manual_seed(10)
    model = hm.autoencoder()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    run_loop(
        run_dir,
        model,
        opt,
        sampler((data, data), 64, 10),
        steps=steps,
        loss=mse,
        lr_at=linear_to_zero(3e-3, steps),
    )


def accumulation(run_dir: Path, *, steps: int = 300, micro: int = 4) -> None:
    """GroupNorm CNN on bar images; each step accumulates ``micro`` micro-batches of 16
    (backward on each, loss / micro) inside one step block, SGD momentum 0.9 at 0.05 under
    cosine decay."""
    torch.manual_seed(11)
    model = hm.groupnorm_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    draw = sampler(hd.bars(2048), 16 * micro, 11)
    with trainprobe.watch(
        model, trainprobe.default_probes(every_n=10), run_dir=run_dir, optimizer=opt, loss_fn=ce
    ) as mon:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = 0.025 * (1 + math.cos(math.pi * step / steps))
            x, y = draw(step)
            with mon.step(step, batch=(x, y)) as s:
                total = torch.zeros(())
                for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
                    loss = ce(model, (xm, ym)) / micro
                    loss.backward()
                    total += loss.detach()
                s.log(loss=total)
            opt.step()
            opt.zero_grad()


def finetune(run_dir: Path, *, steps: int = 400) -> None:
    """A ReLU MLP pre-trained (unwatched, 300 Adam steps) on 4 clusters; then its first
    layer is frozen, the head replaced by a fresh one, and it is fine-tuned under watch
    with plain SGD 0.1 on a new 2-way labelling of the same clusters."""
    x, y = hd.clusters(4096, (1.0, 1.0, 1.0, 1.0), seed=12)
    torch.manual_seed(12)
    model = hm.mlp(6, 4, nn.ReLU)
    pre = torch.optim.Adam(model.parameters(), lr=3e-3)
    draw = sampler((x, y), 64, 12)
    for step in range(300):
        loss = ce(model, draw(step))
        loss.backward()
        pre.step()
        pre.zero_grad()
    model[4] = nn.Linear(64, 2)
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run_loop(run_dir, model, opt, sampler((x, (y % 2)), 64, 13), steps=steps)


def _healthy(name: str, train: Callable[[Path], None], note: str, info=()) -> Case:
    return Case(name, "healthy", train, allowed_info=info, note=note)


CASES = (
    _healthy(
        "ho_prenorm_resmlp_rmsprop",
        resmlp_rmsprop,
        "pre-norm residual MLP (LayerNorm, GELU, default init) on 3 spirals, RMSprop 1e-3",
    ),
    _healthy(
        "ho_conv1d_adagrad",
        conv1d_adagrad,
        "1-D conv net on noisy waveforms of 3 frequencies, Adagrad 0.05",
    ),
    _healthy(
        "ho_embedding_bag_nesterov_onecycle",
        bag_nesterov,
        "bag-of-embeddings text classifier on generated documents, Nesterov SGD under a "
        "one-cycle schedule (lr 0.02 -> 0.5 -> 2e-6)",
    ),
    _healthy(
        "ho_dropout_label_smoothing",
        dropout_smoothing,
        "ReLU MLP with dropout 0.2 on rings, label smoothing 0.1, AdamW decayed linearly to 0",
    ),
    _healthy(
        "ho_mixup_step_decay",
        mixup,
        "SiLU MLP on a checkerboard trained on mixup pairs (soft targets), SGD momentum with "
        "lr x0.3 every 200 steps",
    ),
    _healthy(
        "ho_imbalance_weighted_ce",
        weighted_imbalance,
        "clusters at 12:4:1 with class-weighted cross-entropy, Adam; per-class gradients on "
        "a fixed batch: every class's loss falls, the minority's included",
    ),
    _healthy(
        "ho_tasks_agree_classify_regress",
        agreeing_tasks,
        "classify the sign of a latent and regress it, on one GELU trunk, Adam: task "
        "cosines +0.1 early, -0.15..0 later, while both losses fall (0.64 -> 0.045, "
        "0.67 -> 0.0013)",
    ),
    _healthy(
        "ho_tiny_batches_label_noise",
        tiny_batches,
        "batches of 4, plain SGD 0.05, 3 rings with 20% of labels redrawn: single-batch "
        "losses 0.15..2.7, the loss falls 1.1 -> 0.5 towards the label-noise floor",
    ),
    _healthy(
        "ho_regression_tiny_loss",
        tiny_loss_regression,
        "tanh MLP fitting a smooth 1-D curve, full batch, Adam with two x0.1 steps: the loss "
        "falls 0.27 -> 1.2e-4",
    ),
    _healthy(
        "ho_autoencoder_linear_decay",
        autoencode,
        "ELU autoencoder 32 -> 6 -> 32 of rank-4 data, Adam decayed linearly to 0",
    ),
    _healthy(
        "ho_groupnorm_cnn_accumulation",
        partial(accumulation),
        "GroupNorm CNN on bar images, 4 micro-batches accumulated per step, SGD momentum "
        "under cosine decay",
    ),
    _healthy(
        "ho_finetune_frozen_stem",
        finetune,
        "pre-trained ReLU MLP, first layer frozen, fresh head, fine-tuned with plain SGD 0.1 "
        "on a new labelling",
    ),
)
