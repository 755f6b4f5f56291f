"""Attention-logit growth: pre-softmax attention logits growing until the softmax is
saturated one-hot (Dehghani et al. 2023; Wortsman et al. 2023; Zhai et al. 2023)."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_count, check_positive
from ._series import LOSS_KEY, finite_series, fmt, true_runs
from .findings import Finding, Severity

NAME = "attention_logit_growth"
MAX_KEY = "attention/max_logit_max"
LAYER_PREFIX = "attention/max_logit"
ENTROPY_PREFIX = "attention/entropy"

LIMIT = 1e3
"""The default logit level read as saturated (see :func:`detect_attention_logit_growth`)."""

NEEDS = (MAX_KEY,)
"""Record keys it needs: ``AttentionStats``' largest logit over the layers (its
per-layer logits and entropies, and the loss, are read when present, as evidence)."""


def detect_attention_logit_growth(
    run: Run, *, limit: float = LIMIT, growth: float = 10.0, min_points: int = 3
) -> list[Finding]:
    """Attention logits ``q·k/√d`` that grew until the attention is saturated.

    A softmax whose largest logit leads the next by more than ~17 gives the others less
    than float32's resolution (``e^-17 ≈ 4e-8``): the attention is exactly one-hot and
    passes no gradient to the logits it outranks. Healthy heads that attend to one
    position (a previous-token head) need leads of 10–40; logits in the thousands come
    from ``q`` and ``k`` whose norms grew with the learning rate (Dehghani et al. 2023,
    ViT-22B; Wortsman et al. 2023, *Small-scale proxies*, §3.1), and they stall or
    destabilise training: at small scale the damage is a loss *plateau* with ordinary
    gradient norms, which the loss detectors do not see.

    Reported (``WARNING``) where ``attention/max_logit_max`` stays at or above ``limit``
    for ``min_points`` consecutive measurements or more, having grown at least ``growth``
    times from its first measured value (a model whose logits start large, e.g. with a
    tiny attention temperature, is not *growing*). ``CRITICAL`` when the loss went
    non-finite during the span. Thresholds from the transformer runs of the detector
    corpus (``benchmarks/corpus/transformer_cases.py``, 3 seeds each): healthy decoders
    peaked at 10–46 (a control, QK-layernorm at a high rate, previous-token heads near
    one-hot) and 151–359 (a borderline rate, loss unharmed); every decoder that plateaued
    passed 1e3 by step 30 and peaked at 2e5–6e5.

    Args:
        run: the run to read.
        limit: the logit level (default 1e3: 2.8x the healthy runs' largest, 359, and
            passed by every plateaued run within 30 steps).
        growth: least factor over the first measurement (default 10).
        min_points: consecutive measurements at or above ``limit`` (default 3).
    """
    check_positive("limit", limit)
    check_positive("growth", growth)
    check_count("min_points", min_points, minimum=1, what="consecutive measurements")
    steps, values = finite_series(run, MAX_KEY)
    if values.size < min_points or not values[0] > 0:
        return []
    over = (values >= limit) & (values >= growth * values[0])
    spans = [(a, b) for a, b in true_runs(over) if b - a + 1 >= min_points]
    if not spans:
        return []
    first, last = spans[0][0], spans[-1][1]
    peak = int(first + np.argmax(values[first : last + 1]))
    start, end = int(steps[first]), int(steps[last])
    layers = _layers_over(run, limit, start, end)
    entropy = _lowest_entropy(run, start, end)
    evidence: dict[str, float | int | str] = {
        "first_max_logit": float(values[0]),
        "first_step": int(steps[0]),
        "peak_max_logit": float(values[peak]),
        "peak_step": int(steps[peak]),
        "growth": float(values[peak] / values[0]),
        "limit": limit,
        "measurements_over": int(over[first : last + 1].sum()),
        "layers": ", ".join(layers),
    }
    keys = [MAX_KEY, *(f"{LAYER_PREFIX}/{layer}" for layer in layers)]
    said = ""
    if entropy is not None:
        layer, value = entropy
        evidence["lowest_layer_entropy"] = value
        evidence["lowest_entropy_layer"] = layer
        keys.append(f"{ENTROPY_PREFIX}/{layer}")
        said = f"; the mean attention entropy of {layer} fell to {fmt(value)} nats"
    severity = Severity.CRITICAL if _loss_broke(run, start, end) else Severity.WARNING
    where = f" in {', '.join(layers)}" if layers else ""
    return [
        Finding(
            detector=NAME,
            severity=severity,
            start_step=start,
            end_step=end,
            message=(
                f"attention logits grew from {fmt(values[0])} (step {int(steps[0])}) to "
                f"{fmt(values[peak])} (step {int(steps[peak])}){where}: the softmax is "
                f"saturated one-hot, and no gradient flows through the logits it outranks"
                f"{said}"
            ),
            action=(
                "add QK-layernorm (normalise q and k per head before their dot product), "
                "or lower the peak learning rate or lengthen its warmup"
            ),
            evidence=evidence,
            keys=tuple(keys),
        )
    ]


def _layers_over(run: Run, limit: float, start: int, end: int) -> list[str]:
    """The layers whose own largest logit reached ``limit`` within ``[start, end]``,
    highest first."""
    peaks = []
    prefix = f"{LAYER_PREFIX}/"
    for key in run.keys():  # noqa: SIM118 (a Run is not a mapping)
        if key.startswith(prefix):
            steps, values = finite_series(run, key)
            inside = values[(steps >= start) & (steps <= end)]
            if inside.size and inside.max() >= limit:
                peaks.append((float(inside.max()), key[len(prefix) :]))
    return [layer for _, layer in sorted(peaks, reverse=True)]


def _lowest_entropy(run: Run, start: int, end: int) -> tuple[str, float] | None:
    """The layer whose mean attention entropy fell lowest within ``[start, end]``."""
    lowest = None
    prefix = f"{ENTROPY_PREFIX}/"
    for key in run.keys():  # noqa: SIM118
        if key.startswith(prefix):
            steps, values = finite_series(run, key)
            inside = values[(steps >= start) & (steps <= end)]
            if inside.size and (lowest is None or inside.min() < lowest[1]):
                lowest = (key[len(prefix) :], float(inside.min()))
    return lowest


def _loss_broke(run: Run, start: int, end: int) -> bool:
    """Whether the logged loss was non-finite at some step within ``[start, end]``."""
    if LOSS_KEY not in run:
        return False
    series = run.series(LOSS_KEY)
    steps, values = np.asarray(series.steps), np.asarray(series.values, dtype=np.float64)
    inside = (steps >= start) & (steps <= end)
    return bool((~np.isfinite(values[inside])).any())
