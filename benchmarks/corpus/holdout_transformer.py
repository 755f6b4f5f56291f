"""Transformer holdout runs, written after the attention-logit-growth threshold was set
on the corpus's decoders and never used to revise it: a library encoder
(``nn.TransformerEncoderLayer``, pre-norm, causal mask: ``nn.MultiheadAttention``'s path
through ``F.multi_head_attention_forward``) learning to copy a random 12-token prefix
(loss on the copied half only), under Adam or AdamW with a linear warmup, watched by the
default probes and ``AttentionStats`` every 10 steps. Ground truth from the loss: the
healthy runs solve the copy (loss below 1e-3); at lr 0.1 after a 50-step warmup it stays
unsolved (0.09-0.2) with attention logits in the thousands; at a constant 3e-2 seed 0
stalls at 0.78 with logits of about 800 and gradient bursts (a case between the
mechanisms: which detector reports it is part of the measurement).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import trainprobe
from trainprobe.probes import AdamHealth, AttentionStats, default_probes, every

from .base import Case, Expected

VOCAB, HALF, STEPS = 16, 12, 300


class CopyEncoder(nn.Module):
    def __init__(self, d: int = 48, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        seq = 2 * HALF
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.encoder(x, mask=self.mask[:t, :t], is_causal=True))


def copy_run(
    run_dir: Path,
    *,
    lr: float,
    seed: int,
    warmup: int = 0,
    adamw: bool = False,
    eps: float = 1e-8,
    loss_scale: float = 1.0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CopyEncoder()
    opt = (torch.optim.AdamW if adamw else torch.optim.Adam)(model.parameters(), lr=lr, eps=eps)
    probes = [*default_probes(every_n=10), AttentionStats(schedule=every(10))]
    if eps != 1e-8 or loss_scale != 1.0:  # the ε-domination runs, written after its limit
        probes.append(AdamHealth(schedule=every(10)))
    with trainprobe.watch(model, probes, run_dir=run_dir, optimizer=opt) as mon:
        for step in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            prefix = torch.randint(1, VOCAB, (32, HALF), generator=gen)
            seqs = torch.cat([prefix, prefix], 1)
            with mon.step(step) as s:
                logits = model(seqs[:, :-1])[:, HALF - 1 :]  # predicting the copied half
                loss = F.cross_entropy(logits.reshape(-1, VOCAB), seqs[:, HALF:].reshape(-1))
                (loss * loss_scale).backward()
                s.log(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=True)


CASES = (
    *(
        Case(
            f"mha_copy_adam_{lr:g}_s{seed}",
            "healthy",
            partial(copy_run, lr=lr, seed=seed),
            note=f"Adam {lr:g}: the copy is solved (loss < 1e-3), largest logits 12-16",
        )
        for lr, seed in ((1e-3, 0), (1e-3, 1), (3e-3, 0))
    ),
    *(
        Case(
            f"mha_copy_warmup_lr0.1_s{seed}",
            "sick",
            partial(copy_run, lr=0.1, seed=seed, warmup=50, adamw=True),
            (Expected("attention_logit_growth", 0, STEPS - 1),),
            note="AdamW warmed up to 0.1 over 50 steps: logits in the thousands, the copy unsolved",
            also=("exploding_gradients", "instability", "loss_spike"),
        )
        for seed in (0, 1)
    ),
    Case(
        "mha_copy_adam_0.03_s0",
        "sick",
        partial(copy_run, lr=0.03, seed=0),
        (Expected(("attention_logit_growth", "exploding_gradients", "instability"), 0, STEPS - 1),),
        note="Adam 0.03: stalls at loss 0.78 with logits of about 800 and gradient bursts",
        also=("loss_spike",),
    ),
)
