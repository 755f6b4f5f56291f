"""Output-logit drift: a small decoder whose output logits drift far below zero together,
its z-loss remedy and a normal-rate control (3 seeds each).

Wortsman et al. (2023, *Small-scale proxies*, §3.2) saw large models' output logits
diverge at high learning rates without weight decay, ``log Z = logsumexp(logits)`` going
very negative before the loss did; PaLM and OLMo 2 add a z-loss ``1e-4 · (log Z)²``
against it, and Stollenwerk et al. (2026) trace it to the mean output embedding ``μ``
growing (the mean logit is ``μ · h``). The cross-entropy is blind to a shift of every
logit, so its gradient never pulls ``μ`` back; Adam's per-coordinate steps let the rarely
seen tokens' embeddings move at full rate and carry ``μ`` along.

The decoder (2 pre-LayerNorm blocks with QK-layernorm, d = 64, no biases, a final
LayerNorm without gain, an untied head, the forward under bfloat16 autocast) learns a
Markov chain over 2,048 Zipf-distributed tokens (3 successors each, 10% background),
batches of 16 sequences, AdamW (β₂ 0.95, no weight decay, 100 warmup steps), 3,000 steps,
watched by the default probes and ``OutputLogits`` every 50 steps. The runs, measured
(first in a separate script, then as these cases): at lr 0.1 log Z falls steadily from
about 8.7 to between −36 and −39 (the mean logit to about −57, ‖μ‖ to 36–38); a z-loss of
1e-3 at the same rate ends at −1 to −3 (1e-4 only slows the drift, to about −24); lr 0.01
keeps it at 7–8. At this scale the drift costs nothing measurable: the drifting runs end
within 0.02 nats of the z-loss runs' loss on each seed, and bfloat16 rounding of logits
near −39 cost 0.0025 nats. The cases say whether the detector sees the drift, not whether
it harmed the run; the labels come from the configuration (no z-loss at lr 0.1: the
mechanism is on).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import OutputLogits, default_probes, every

from .base import Case, Expected
from .transformer_cases import _example

VOCAB, SEQ, STEPS, BATCH, WARMUP = 2048, 32, 3000, 16, 100
SEEDS = (0, 1, 2)


def zipf_chain(n: int, gen: torch.Generator, *, successors: int = 3, background: float = 0.1):
    """``[n, SEQ + 1]`` tokens: each token has ``successors`` next tokens drawn from a
    Zipf(1) unigram; with probability ``background`` the next token is drawn from it."""
    zipf = 1.0 / torch.arange(1, VOCAB + 1).float()
    zipf = zipf / zipf.sum()
    succ = torch.multinomial(zipf, VOCAB * successors, replacement=True, generator=gen)
    succ = succ.view(VOCAB, successors)
    seqs = torch.empty(n, SEQ + 1, dtype=torch.long)
    seqs[:, 0] = torch.multinomial(zipf, n, replacement=True, generator=gen)
    for t in range(1, SEQ + 1):
        pick = torch.randint(0, successors, (n,), generator=gen)
        nxt = succ[seqs[:, t - 1], pick]
        jump = torch.rand(n, generator=gen) < background
        nxt[jump] = torch.multinomial(zipf, int(jump.sum()), replacement=True, generator=gen)
        seqs[:, t] = nxt
    return seqs


class GainlessDecoder(nn.Module):
    """The example's blocks with QK-layernorm and no biases, a final LayerNorm without
    gain (with a gain the model shrinks ``‖h‖`` as ``μ`` grows, and log Z stays put)."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        block = _example().Block
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList([block(d, heads, True) for _ in range(layers)])
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias = None
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.head = nn.Linear(d, VOCAB, bias=False)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(d))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, VOCAB]
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def drift_run(run_dir: Path, *, lr: float, seed: int, z_loss: float = 0.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    data = zipf_chain(8192, gen)
    torch.manual_seed(seed)
    model = GainlessDecoder()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    probes = [*default_probes(every_n=50), OutputLogits(schedule=every(50))]
    with trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt) as mon:
        for step in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / WARMUP)
            batch = data[torch.randint(0, len(data), (BATCH,), generator=gen)]
            with mon.step(step) as s:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(batch[:, :-1])
                logits = logits.float()
                loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
                total = loss + z_loss * torch.logsumexp(logits, -1).square().mean()
                total.backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=True)


CASES = (
    *(
        Case(
            f"logit_drift_lr0.1_s{seed}",
            "sick",
            partial(drift_run, lr=0.1, seed=seed),
            (Expected("output_logit_drift", 500, STEPS - 1, severity="info"),),
            note="AdamW 0.1, no z-loss: log Z falls steadily from 8 to about -39 (mean logit "
            "-57); the loss is as the remedies' at this scale",
        )
        for seed in SEEDS
    ),
    *(
        Case(
            f"logit_drift_z_loss_1e-3_s{seed}",
            "healthy",
            partial(drift_run, lr=0.1, seed=seed, z_loss=1e-3),
            note="the same rate with a z-loss of 1e-3 (the remedy): log Z held near -2",
        )
        for seed in SEEDS
    ),
    *(
        Case(
            f"logit_drift_control_lr0.01_s{seed}",
            "healthy",
            partial(drift_run, lr=0.01, seed=seed),
            note="AdamW 0.01 (the control): log Z stays at 7-8",
        )
        for seed in SEEDS
    ),
)
