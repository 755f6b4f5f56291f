"""Transformer runs: attention-logit growth in a small decoder, its remedy, a borderline
rate and a control (``examples/transformer_instability.py``, 3 seeds each).

The decoder (2 pre-LayerNorm blocks, d = 64, 4 heads) learns a sparse Markov chain with
AdamW at a constant rate, watched by the default probes, ``AttentionStats`` and
``OutputLogits`` every 10 steps. Ground truth from the runs themselves, not from the
detector: at lr 0.1 without QK-layernorm the loss plateaus near 2.5 nats (the others
reach 1.6-1.7) with the attention entropy at 0; the same rate with QK-layernorm, a 3x
lower rate (0.03, whose previous-token heads are near one-hot with logits of about 30)
and the control (3e-3) train normally (largest logits 10-46), and so does lr 0.05,
whose logits grow to 151-359 with the loss unharmed: the case that places the threshold.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

from .base import Case, Expected

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)
STEPS = 400


def _example():
    spec = importlib.util.spec_from_file_location(
        "transformer_instability", ROOT / "examples/transformer_instability.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decoder(run_dir: Path, *, lr: float, qk_norm: bool, seed: int) -> None:
    _example().train(run_dir, lr=lr, qk_norm=qk_norm, seed=seed, steps=STEPS)


HEALTHY = {  # name: (lr, QK-layernorm, note)
    "decoder_control": (3e-3, False, "AdamW 3e-3: logits below ~10, loss 1.6"),
    "decoder_qk_norm_high_lr": (0.1, True, "lr 0.1 with QK-layernorm: logits ~25, loss 1.7"),
    "decoder_one_hot_heads": (
        0.03,
        False,
        "lr 0.03: previous-token heads near one-hot (logits ~30, entropy ~0.5), loss 1.6",
    ),
    "decoder_borderline_lr": (0.05, False, "lr 0.05: logits grow to ~200, loss 1.7, unharmed"),
}

CASES = (
    *(
        Case(
            f"{name}_s{seed}", "healthy", partial(decoder, lr=lr, qk_norm=qk, seed=seed), note=note
        )
        for name, (lr, qk, note) in HEALTHY.items()
        for seed in SEEDS
    ),
    *(
        Case(
            f"decoder_attention_growth_s{seed}",
            "sick",
            partial(decoder, lr=0.1, qk_norm=False, seed=seed),
            (Expected("attention_logit_growth", 20, STEPS - 1, 30),),
            note="lr 0.1 without QK-layernorm: attention logits pass 1e3 within 30 steps, the "
            "entropy falls to 0 and the loss plateaus at 2.5-3.1 nats",
            also=("exploding_gradients",),  # bursts of the saturated run's gradient (13x)
        )
        for seed in SEEDS
    ),
)
