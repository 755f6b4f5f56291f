"""Sick holdout runs: mishaps the detector corpus does not stage, or stages another way
(a learning rate raised 30x for good, a loss multiplied by 1e4 from some step, weights
initialised 20x too large, a library RNN vanishing over 60 steps, ReLUs killed by a bias
shift under Adam, two tasks with contradictory labels on one head, a minority class
relabelled mid-run, Adam with eps=0 on an embedding table, grokking of modular
subtraction through embeddings, and a shortcut feature starving a nonlinear one)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import (
    FeatureAttribution,
    GradConflict,
    GradientFlow,
    HeldOut,
    at_steps,
    every,
)

from . import holdout_data as hd
from . import holdout_models as hm
from .base import Case, Expected, ce, full, run_loop, sampler
from .holdout_loops import task_loop


def lr_raised(run_dir: Path, *, at: int = 300, factor: float = 30.0, steps: int = 500) -> None:
    """1-D conv net on waveforms under SGD momentum 0.9 at lr 0.02, raised ``factor``x
    for good at step ``at`` (a schedule that multiplies where it should divide)."""
    torch.manual_seed(20)
    model = hm.conv1d_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    run_loop(
        run_dir,
        model,
        opt,
        sampler(hd.waveforms(2048, seed=20), 64, 20),
        steps=steps,
        lr_at=lambda step: 0.02 * (factor if step >= at else 1.0),
    )


def loss_scaled(run_dir: Path, *, at: int = 250, scale: float = 1e4, steps: int = 400) -> None:
    """GELU MLP on rings under SGD 0.05; from step ``at`` the backward runs on the loss
    times ``scale`` (a loss scale applied and never unscaled), the loss logged unscaled."""
    torch.manual_seed(21)
    model = hm.mlp(2, 3, nn.GELU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = sampler(hd.rings(4096, seed=21), 64, 21)
    with trainprobe.watch(
        model, trainprobe.default_probes(every_n=10), run_dir=run_dir, optimizer=opt, loss_fn=ce
    ) as mon:
        for step in range(steps):
            batch = batches(step)
            with mon.step(step, batch=batch) as s:
                loss = ce(model, batch)
                (loss * (scale if step >= at else 1.0)).backward()
                s.log(loss=loss.detach())
            opt.step()
            opt.zero_grad()


def big_init(run_dir: Path, *, gain: float = 20.0, steps: int = 300) -> None:
    """ReLU MLP (3 hidden layers of 64) on 6-D clusters whose weights all start ``gain``x
    PyTorch's default: logits ~1e5 at step 0; SGD 0.01."""
    x, y = hd.clusters(4096, (1.0, 1.0, 1.0, 1.0), seed=22)
    torch.manual_seed(22)
    model = nn.Sequential(
        nn.Linear(6, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.mul_(gain)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run_loop(run_dir, model, opt, sampler((x, y), 64, 22), steps=steps)


def rnn_60_steps(run_dir: Path, *, length: int = 60, steps: int = 250) -> None:
    """A library tanh ``nn.RNN`` (hidden 64) over 60 steps; the label is the sign of the
    first input's first feature times the last one's, so the first position must be
    learned; Adam 1e-3, ``GradientFlow`` every 10 steps."""
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(2048, length, 3, generator=gen)
    y = ((x[:, 0, 0] > 0) == (x[:, -1, 0] > 0)).long()
    torch.manual_seed(23)
    model = hm.SequenceRNN(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run_loop(
        run_dir,
        model,
        opt,
        sampler((x, y), 64, 23),
        steps=steps,
        extra=[GradientFlow(schedule=every(10))],
    )


def bias_shift(run_dir: Path, *, at: int = 300, shift: float = 10.0, steps: int = 600) -> None:
    """ReLU MLP on rings under Adam 3e-3; at step ``at`` the first layer's biases drop by
    ``shift`` (a faulty partial reload), below every pre-activation's reach."""
    torch.manual_seed(24)
    model = hm.mlp(2, 3, nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    draw = sampler(hd.rings(4096, seed=24), 64, 24)

    def batch_at(step: int):
        if step == at:
            with torch.no_grad():
                model[0].bias.sub_(shift)
        return draw(step)

    run_loop(run_dir, model, opt, batch_at, steps=steps)


def contradictory_tasks(run_dir: Path, *, steps: int = 500) -> None:
    """Two binary tasks on the same inputs through one shared logit: task b's labels are
    task a's flipped (two data sources that disagree). At the compromise (logit 0) the
    two gradients are exactly opposite; Adam 1e-3."""
    x, y = hd.clusters(4096, (1.0, 1.0), seed=25)
    torch.manual_seed(25)
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 1))

    def losses(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        xb, yb = batch
        logit = net(xb)[:, 0]
        target = yb.float()
        return {
            "source_a": F.binary_cross_entropy_with_logits(logit, target),
            "source_b": F.binary_cross_entropy_with_logits(logit, 1 - target),
        }

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    task_loop(run_dir, model, opt, sampler((x, y), 64, 25), losses, steps=steps)


def relabelled_minority(run_dir: Path, *, at: int = 200, steps: int = 400) -> None:
    """5 clusters at 6:6:6:6:1 under SGD momentum 0.9 at 0.02; from step ``at`` the
    minority's labels in the training stream read class 0 (a relabelling bug); per-class
    gradients and losses on a fixed, correctly labelled batch of 1024 every 2 steps for
    100 steps, then every 5."""
    x, y = hd.clusters(8192, (6.0, 6.0, 6.0, 6.0, 1.0), spread=1.0, seed=26)
    torch.manual_seed(26)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    draw = sampler((x, y), 64, 26)

    def batch_at(step: int):
        xb, yb = draw(step)
        return xb, torch.where((yb == 4) & (step >= at), torch.zeros_like(yb), yb)

    probe = GradConflict(
        by="class",
        data=(x[:1024], y[:1024]),
        schedule=at_steps(*range(0, 100, 2)) | every(5),
    )
    run_loop(run_dir, model, opt, batch_at, steps=steps, extra=[probe])


def adam_eps_zero(run_dir: Path, *, new_token_at: int = 150, steps: int = 300) -> None:
    """Bag-of-embeddings classifier under Adam with ``eps=0``: an embedding row whose
    gradient has been exactly 0 at every step so far gets ``0 / 0`` = NaN at the first
    update. Token 60, unused until step ``new_token_at`` (a new word joining the stream),
    has a NaN row from step 0; the loss turns NaN when batches first hold it."""
    docs, y = hd.token_bags(4096, seed=27)
    torch.manual_seed(27)
    model = hm.BagClassifier(61, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=0.0)
    draw = sampler((docs, y), 64, 27)

    def batch_at(step: int):
        ids, yb = draw(step)
        if step >= new_token_at:
            ids = ids.clone()
            ids[::4, 0] = 60
        return ids, yb

    run_loop(run_dir, model, opt, batch_at, steps=steps)


def modular_subtraction(
    run_dir: Path, *, p: int = 31, fraction: float = 0.6, steps: int = 1400
) -> None:
    """``(a − b) mod p`` from ``fraction`` of the pairs, learned embeddings and a ReLU layer,
    full-batch AdamW 1e-2 with weight decay 1; held-out and train accuracy every 10 steps."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs, labels = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1), (a - b).reshape(-1) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(28))
    k = int(fraction * p * p)
    train, held = order[:k], order[k:]
    torch.manual_seed(28)
    model = hm.PairNet(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0, betas=(0.9, 0.98))
    extra = [
        HeldOut(
            data=(pairs[held], labels[held]),
            train_data=(pairs[train], labels[train]),
            schedule=every(10),
        )
    ]
    run_loop(run_dir, model, opt, full((pairs[train], labels[train])), steps=steps, extra=extra)


def starved_checkerboard(run_dir: Path, *, steps: int = 600) -> None:
    """A ReLU MLP on a 3x3 checkerboard plus a linear shortcut that also gives the label:
    the shortcut is learned within a few steps and the board, which needs curved
    boundaries, is never learned (the board alone predicts the label as well). SGD
    momentum 0.9 at 0.05, feature attribution over {board, shortcut} every 25 steps."""
    x, y = hd.shortcut()
    torch.manual_seed(29)
    model = hm.mlp(3, 2, nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = FeatureAttribution(
        features={"board": [0, 1], "shortcut": [2]}, data=(x[:512], y[:512]), schedule=every(25)
    )
    run_loop(run_dir, model, opt, sampler((x, y), 64, 29), steps=steps, extra=[probe])


def _sick(name, train, expect, note, also=(), info=()) -> Case:
    return Case(name, "sick", train, expect=expect, note=note, also=also, allowed_info=info)


LOSS = ("loss_spike", "loss_divergence")
INSTABILITY = (*LOSS, "exploding_gradients", "update_ratio", "instability")
BLOWUP = ("exploding_gradients", "update_ratio", "nonfinite", "instability")
CASES = (
    _sick(
        "ho_lr_raised_30x_for_good",
        lr_raised,
        (Expected(INSTABILITY, 300, 330, 20),),
        "1-D conv net, SGD momentum 0.02, lr x30 from step 300 on: the loss (0.06) leaves its "
        "level at ~310 and sits at ln 3 from ~320 to the end; the second ReLU layer dies",
        also=(*INSTABILITY, "dead_units", "nonfinite"),
    ),
    _sick(
        "ho_loss_times_1e4",
        loss_scaled,
        (Expected(BLOWUP, 250, 260, 5),),
        "GELU MLP, SGD 0.05; from step 250 the backward runs on 1e4 x the loss (logged "
        "unscaled): the gradient norm 0.26 -> 2.6e3 at step 250, the loss 0.85 -> 4e4 at 251, "
        "parameters Inf at 255 and the loss NaN from 260",
        also=("loss_spike", "loss_divergence", "dead_units"),
    ),
    _sick(
        "ho_init_weights_x20",
        big_init,
        (Expected(INSTABILITY, 0, 60, 10),),
        "ReLU MLP (3 hidden layers) with every weight 20x the default init, SGD 0.01: the "
        "loss is 3.7e3 at step 0 (ln 4 = 1.39 is normal) and 3.5e4 at step 1, the gradient "
        "norm 2.5e3; the loss stays above 3 until ~60 and swings 10x (0.9 <-> 12) after; "
        "the middle ReLU layer ends ~99% dead",
        also=(*INSTABILITY, "dead_units"),
    ),
    _sick(
        "ho_rnn_tanh_60_steps",
        rnn_60_steps,
        (Expected("vanishing_gradients", 0, 249, 0),),
        "library nn.RNN (tanh, default init) over 60 steps, the label needs the first and the "
        "last input: the first position gets 1e-13..1e-3 of the last one's gradient and the "
        "loss stays at ln 2",
    ),
    _sick(
        "ho_bias_shift_dead_relus",
        bias_shift,
        (Expected(("dead_units", "vanishing_gradients"), 300, 599, 20),),
        "ReLU MLP on rings, Adam 3e-3; the first layer's biases drop by 10 at step 300: that "
        "layer is 100% zero from 300 to the end and the loss sits at ln 3",
        also=("loss_spike", "loss_divergence", "exploding_gradients", "instability"),
    ),
    _sick(
        "ho_tasks_contradictory_labels",
        contradictory_tasks,
        (Expected("gradient_conflict", 0, 499, 0),),
        "two binary tasks through one shared logit, task b's labels task a's flipped: task "
        "cosine -0.95 at step 0 and -1.0 from ~100, both losses stuck at ln 2",
    ),
    _sick(
        "ho_minority_relabelled",
        relabelled_minority,
        (
            Expected("class_competition", 0, 42, 5),
            Expected("class_competition", 200, 399, 10),
        ),
        "5 clusters at 6:6:6:6:1, SGD momentum; per-class losses on a fixed clean batch. "
        "Two episodes: the minority's loss rises 1.5 -> 3.5 over steps 0-20 and is back "
        "under its start by ~42 (imbalance), then its training labels read class 0 from step "
        "200 and its loss climbs 0.9 -> 5.3 to the end while the others stay learned",
    ),
    _sick(
        "ho_adam_eps0_new_token",
        adam_eps_zero,
        (Expected(("nonfinite", "instability"), 1, 150, 2),),
        "bag-of-embeddings classifier, Adam eps=0: the row of a token unused so far gets "
        "0/0 = NaN at the first update (the parameters are non-finite from step 1); the "
        "loss turns NaN at step 150, when the token first appears",
        also=("loss_spike", "loss_divergence", "exploding_gradients", "update_ratio"),
    ),
    _sick(
        "ho_grokking_subtraction_embeddings",
        modular_subtraction,
        (Expected("grokking", 40, 960, 100, severity="info"),),
        "(a - b) mod 31 from 60% of the pairs through learned embeddings, full-batch AdamW "
        "1e-2 wd 1: the train set is fit by ~40, held-out accuracy is at chance until ~300 "
        "and reaches 0.95 at ~960",
    ),
    _sick(
        "ho_shortcut_starves_board",
        starved_checkerboard,
        (Expected("gradient_starvation", 25, 599, 0),),
        "3x3 checkerboard plus a wide-margin linear shortcut, both predicting the label: "
        "with the shortcut zeroed or shuffled the trained net is at chance (0.49, 0.51), "
        "while the board alone is learned to 0.9 in the same 600 steps when the shortcut "
        "carries nothing",
    ),
)
