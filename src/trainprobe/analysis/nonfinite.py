"""Non-finite values: the first step with NaN/Inf in the loss, the gradients or the parameters."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_count, check_fraction
from ._series import param_order, true_runs
from .findings import Finding, Severity

NAME = "nonfinite"
PREFIX = "nonfinite"
SOURCES = ("loss", "grad", "param")
"""Where NaN/Inf can appear within one step, in the order a step computes them."""
_LABEL = {"loss": "the loss", "grad": "the gradients", "param": "the parameters"}


NEEDS = (f"{PREFIX}/*",)
"""Record keys it reads: the flags and counts of :class:`~trainprobe.probes.NonFiniteGuard`."""


def detect_nonfinite(run: Run, *, rare_fraction: float = 0.01, max_run: int = 5) -> list[Finding]:
    """The first NaN/Inf in the loss, gradients or parameters, and where it began.

    Reads ``nonfinite/{loss,grad,param}`` (a 0/1 flag and counts of offending
    tensors, written every step) and ``nonfinite/first_{grad,param}`` (index
    into ``run.meta["model"]["params"]`` of the first offending tensor, -1 for
    none). The *origin* is the source with the earliest bad step; ties follow the
    order of a step (loss, then backward, then the optimizer update). The span
    runs from the first to the last bad step.

    Severity is ``CRITICAL``, except when only gradients were ever non-finite
    while the loss and the parameters stayed finite (both recorded): the
    optimizer step was then skipped, as a dynamic loss scaler
    (``torch.cuda.amp.GradScaler``) does on fp16 overflow. Such skips are
    ``INFO`` when rare and isolated, which is the scaler working as designed:
    fewer than ``rare_fraction`` of the checked steps, in runs of at most
    ``max_run`` consecutive checked steps. Otherwise they are a ``WARNING``: the
    scale keeps overflowing, and many updates are lost.

    Args:
        run: the run to read.
        rare_fraction: share of checked steps below which skipped steps are
            normal (default 0.01: a scaler that doubles every 2000 steps and backs
            off once overflows about 0.05% of steps).
        max_run: longest normal run of consecutive skipped steps (default 5: the
            scaler's 2^16 initial scale takes a few halvings to settle).

    Returns:
        ``[]`` when every value was finite, else one finding.

    Raises:
        ValueError: ``rare_fraction`` outside ``[0, 1)`` or ``max_run < 1``.
        TypeError: ``max_run`` is not an int.
    """
    check_fraction("rare_fraction", rare_fraction)
    check_count("max_run", max_run, minimum=1, what="consecutive skipped steps")
    first_bad: dict[str, int] = {}
    bad_steps: list[np.ndarray] = []
    for source in SOURCES:
        if f"{PREFIX}/{source}" not in run:
            continue
        steps = _bad(run, source)[0]
        if steps.size:
            first_bad[source] = int(steps[0])
            bad_steps.append(steps)
    if not first_bad:
        return []
    every = np.unique(np.concatenate(bad_steps))
    origin = min(first_bad, key=lambda src: (first_bad[src], SOURCES.index(src)))
    tensors = {
        src: _first_tensor(run, src, first_bad[src])
        for src in ("grad", "param")
        if src in first_bad
    }
    skipped = set(first_bad) == {"grad"} and all(
        f"{PREFIX}/{src}" in run for src in ("loss", "param")
    )
    evidence: dict[str, float | int | str] = {
        "first_step": first_bad[origin],
        "last_step": int(every[-1]),
        "bad_steps": int(every.size),
        "origin": origin,
        **{f"first_{src}_step": first_bad.get(src, -1) for src in SOURCES},
        **{f"first_{src}_tensor": name for src, name in tensors.items() if name},
    }
    severity = Severity.CRITICAL
    if skipped:
        severity, extra = _skip_severity(run, rare_fraction, max_run)
        evidence.update(extra)
    return [
        Finding(
            NAME,
            severity,
            first_bad[origin],
            int(every[-1]),
            _message(first_bad, origin, tensors, every),
            _action(origin, first_bad[origin], tensors.get(origin), severity),
            evidence,
            tuple(f"{PREFIX}/{src}" for src in SOURCES if src in first_bad),
        )
    ]


def _bad(run: Run, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Bad steps ``[b]`` of ``nonfinite/<source>`` and the ``[n]`` bad mask over checked steps."""
    series = run.series(f"{PREFIX}/{source}")
    mask = np.nan_to_num(series.values, nan=0.0) > 0  # [n]
    return series.steps[mask], mask


def _skip_severity(
    run: Run, rare_fraction: float, max_run: int
) -> tuple[Severity, dict[str, float | int]]:
    """INFO for rare, isolated skipped steps; WARNING when they are frequent or long."""
    _, mask = _bad(run, "grad")
    share = float(np.mean(mask))
    longest = max(b - a + 1 for a, b in true_runs(mask))
    rare = share < rare_fraction and longest <= max_run
    return (Severity.INFO if rare else Severity.WARNING), {
        "checked_steps": int(mask.size),
        "bad_fraction": share,
        "longest_run": longest,
        "rare_fraction": rare_fraction,
        "max_run": max_run,
    }


def _first_tensor(run: Run, source: str, step: int) -> str | None:
    """Name of the first offending tensor at ``step``, or None when it is not known."""
    key = f"{PREFIX}/first_{source}"
    if key not in run:
        return None
    series = run.series(key)
    at = np.flatnonzero(series.steps == step)
    if not at.size or not np.isfinite(series.values[at[0]]):
        return None
    index, names = int(series.values[at[0]]), param_order(run)
    return names[index] if 0 <= index < len(names) else None


def _message(
    first_bad: dict[str, int], origin: str, tensors: dict[str, str | None], every: np.ndarray
) -> str:
    parts = []
    for src in sorted(first_bad, key=lambda s: (first_bad[s], SOURCES.index(s))):
        name = tensors.get(src)
        parts.append(
            f"{_LABEL[src]} at step {first_bad[src]}"
            + (f" (first tensor '{name}')" if name else "")
        )
    return (
        f"NaN/Inf first appeared in {parts[0]}"
        + (f", then in {', '.join(parts[1:])}" if parts[1:] else "")
        + f"; {every.size} steps affected, the last at step {int(every[-1])} "
        f"(origin: {_LABEL[origin]})"
    )


def _action(origin: str, step: int, tensor: str | None, severity: Severity) -> str:
    where = f" in '{tensor}'" if tensor else ""
    if severity is Severity.INFO:
        return (
            "Nothing to do: rare skipped steps are how a dynamic loss scaler "
            "(torch.cuda.amp.GradScaler) finds its scale; act only if they become frequent."
        )
    if severity is Severity.WARNING:
        return (
            "Skipped steps are frequent for a dynamic loss scaler "
            "(torch.cuda.amp.GradScaler): lower the learning rate or the initial loss "
            "scale, enable gradient clipping (after scaler.unscale_), or train in bfloat16."
        )
    if origin == "loss":
        return (
            f"Check the inputs and the loss at step {step} (log or division by zero, fp16 "
            "overflow) and rerun it under torch.autograd.detect_anomaly() to find the op, "
            "lowering the learning rate if the loss was rising before."
        )
    if origin == "grad":
        return (
            f"Rerun step {step} under torch.autograd.detect_anomaly() to find the backward "
            f"op that made the gradient{where} non-finite, and enable gradient clipping "
            "(torch.nn.utils.clip_grad_norm_) with a lower learning rate."
        )
    return (
        f"Lower the learning rate and enable gradient clipping, since the optimizer update "
        f"itself made the parameters{where} non-finite at step {step} (check weight decay, "
        "the optimizer's eps and any manual parameter edits)."
    )
