"""Transformer rows: attention logits and entropy per layer (AttentionStats), the output
logits' normaliser (OutputLogits), Adam's second moment and the step ε leaves
(AdamHealth)."""

from __future__ import annotations

import numpy as np

from trainprobe.analysis.adam_eps import LIMIT as EPS_LIMIT
from trainprobe.analysis.attention_logits import LIMIT
from trainprobe.analysis.findings import Finding
from trainprobe.analysis.logit_drift import LIMIT as DRIFT_LIMIT
from trainprobe.store import Run

from .curves import _line, _read
from .gradients import _layer_lines, layer_lines_part
from .parts import PanelPart

MAX_LOGIT = "attention/max_logit"
MAX_OVER_LAYERS = "attention/max_logit_max"
ENTROPY = "attention/entropy"
ATTENTION_LOGITS_NEEDS = (f"{MAX_LOGIT}*",)  # per layer, and the largest over them


def attention_logits_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``attention/max_logit/<layer>``: the largest pre-softmax logit of each attention
    layer, with a dotted line where the growth detector reads it as saturated."""
    return layer_lines_part(
        run,
        (MAX_LOGIT, np.max, "max", "q·k/√d"),
        "max q·k/√d",
        "The largest attention logit of each layer. One-hot heads need 10–40; logits "
        f"growing past {LIMIT:g} (dotted) saturate the softmax and stop its gradient "
        "(attention-logit growth: QK-layernorm, a lower peak rate or a longer warmup).",
        reference=(LIMIT, f"saturated: {LIMIT:g}"),
        total=(MAX_OVER_LAYERS, "max over layers"),
    )


ATTENTION_ENTROPY_NEEDS = (f"{ENTROPY}/*",)


def attention_entropy_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``attention/entropy/<layer>``: the mean attention entropy of each layer (nats)."""
    drawn = _layer_lines(run, ENTROPY, np.min, "min", "nats")
    if drawn is None:
        return None
    traces, series, note = drawn
    return PanelPart(
        traces,
        "entropy (nats)",
        "The mean entropy of each layer's attention distributions: log(keys) when uniform, "
        "0 when every head is one-hot. A whole layer falling to 0 alongside growing logits "
        "is entropy collapse." + note,
        keys=tuple(s.key for s in series),
    )


LOG_Z = ("logits/log_z_mean", "logits/log_z_max", "logits/log_z_rms", "logits/max")
OUTPUT_LOGITS_NEEDS = ("logits/*",)


def output_logits_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``logits/*``: the output logits' normaliser ``log Z`` (mean, max, RMS) and the
    largest logit (OutputLogits)."""
    found = _read(run, [key for key in LOG_Z if key in run])
    if not found:
        return None
    names = {
        LOG_Z[0]: "mean log Z",
        LOG_Z[1]: "max log Z",
        LOG_Z[2]: "RMS log Z",
        LOG_Z[3]: "largest logit",
    }
    traces = [_line(s, names[s.key], dash="dot" if s.key == LOG_Z[3] else None) for s in found]
    return PanelPart(
        traces,
        "nats",
        "log Z = logsumexp of the output logits. Every logit drifting together moves it "
        f"steadily away from its early level ({DRIFT_LIMIT:g} nats or more: the "
        "output-logit drift finding), what precedes output-logit divergence at scale; a "
        "z-loss (1e-4 · (log Z)²) holds it near 0 (Wortsman et al. 2023).",
        keys=tuple(s.key for s in found),
    )


ADAM = "adam/grad_to_v"
ADAM_NEEDS = (f"{ADAM}/*",)


def adam_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``adam/grad_to_v/<param>``: each tensor's mean g² over its mean v̂ (AdamHealth)."""
    return layer_lines_part(
        run,
        (ADAM, np.max, "max", "g²/v̂"),
        "mean g² / mean v̂",
        "Each tensor's squared gradient against Adam's second moment: about 1 in steady "
        "training; far above it the gradient grew faster than v̂ follows, where loss "
        "spikes start.",
        reference=(1.0, "g²/v̂ = 1"),
    )


EPS_SHRINK = "adam/eps_shrink"
EPS_SHRINK_TOTAL = "adam/eps_shrink_total"
ADAM_EPS_NEEDS = (f"{EPS_SHRINK}*",)  # per tensor, and over every tensor


def adam_eps_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``adam/eps_shrink/<param>``: the factor ε shrinks each tensor's Adam step by
    (AdamHealth), with a dotted line where the ε-domination detector reads it."""
    return layer_lines_part(
        run,
        (EPS_SHRINK, np.min, "min", "step factor"),
        "step with ε / without",
        "The RMS of each tensor's Adam step with ε over its RMS without: 1 when ε is "
        f"negligible; at or below {EPS_LIMIT:g} (dotted) ε dominates the gradients' RMS and "
        "Adam runs as SGD at lr/ε (lower ε, or find what makes the gradients tiny).",
        reference=(EPS_LIMIT, f"ε-dominated: {EPS_LIMIT:g}"),
        total=(EPS_SHRINK_TOTAL, "over every tensor"),
    )
