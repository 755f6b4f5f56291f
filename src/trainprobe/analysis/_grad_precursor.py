"""The gradient-norm spike before a loss spike: whether the global gradient norm gave warning.

Evidence for ``detect_loss_spikes``. OLMo 2 (Team OLMo 2024) tracks spikes of the global
gradient norm, next to loss spikes, as the mark of the training instability its recipe is
built to remove. A norm spike a few steps before a loss spike is warning that a monitor (or
a clip near the level the norm held before) could have acted on. So when a run records
``norms/grad_total``, each loss spike's finding says whether the norm spiked first, when,
how far, and by how many steps.

What is measured: the norm ``g`` is scored like a positive loss, ``log g`` against its own
trailing measurements (robust z-score, no look-ahead, :func:`grad_norm`). A grad-norm spike
is a run of points over ``(1 + min_rel_increase)`` times their trailing median of which one
or more pass the z test, from the first of those (its onset). For one loss spike
(:func:`precursor`), the steps searched are those the loss's trailing reference covers
before it, up to its first step (at least one spacing of the norm's measurements, and after
the previous spike on the key); the latest onset there gives the step, its size (x its
trailing median) and the lead in steps (0: the same step), exact to within the spacing of
the measurements. A spike begun before those steps and lasting into them is no onset: it
gave no warning of this loss spike. :func:`evidence` and :func:`summary` turn that into a
finding's evidence, :func:`warning_action` into the sentence its action gains when the norm
spiked steps ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..store import Run
from ._series import finite_series, fmt, trailing_z, true_runs
from .exploding import TOTAL

TINY = 1e-9
"""Spread floor of ``log g``, as the loss's in log space: a norm varying less is flat."""


@dataclass(frozen=True)
class GradNorm:
    """The global gradient norm scored like the loss, in log space (arrays are ``[m]``)."""

    steps: np.ndarray
    values: np.ndarray
    reference: np.ndarray  # trailing median, NaN where too few points precede
    spikes: list[tuple[int, int]]  # each spike's onset and last point (``grad_norm``)
    every: int  # median spacing of its measurements, in steps


@dataclass(frozen=True)
class Precursor:
    """The gradient norm in the steps before one loss span: the nearest spike, if any."""

    lookback: int  # steps searched before the span's first step
    scored: int  # grad-norm points among them with a trailing reference
    step: int | None = None  # the latest onset (first point) of a grad-norm spike there
    ratio: float = 0.0  # the norm there, x its trailing median
    reference: float = 0.0  # that trailing median: the level the norm held before
    lead: int = 0  # the loss span's first step minus ``step`` (0: the same step)
    resolution: int = 1  # spacing of the measurements around them: ``lead`` is this exact
    began: tuple[int, int] | None = None  # no onset: a spike's first and last step searched,
    # when it began before the steps searched and lasted into them


def grad_norm(run: Run, window: int, tests: tuple[float, float]) -> GradNorm | None:
    """``norms/grad_total`` scored like a positive loss; None when the run lacks it.

    ``tests`` is the loss's ``(z_threshold, min_rel_increase)``; ``window`` its trailing
    points, here the norm's own measurements."""
    z_threshold, rel = tests
    steps, norms = finite_series(run, TOTAL)
    steps, norms = steps[norms > 0], norms[norms > 0]
    if steps.size == 0:
        return None
    med, z = trailing_z(np.log(norms), window, min_periods=max(3, window // 5), floor=TINY)
    reference = np.exp(med)  # [m]
    with np.errstate(invalid="ignore"):
        high = norms > (1.0 + rel) * reference  # [m], False where no reference
    hit = high & (z > z_threshold)  # [m]
    # a spike: a run of high points, from its first that passes the z test too (its onset),
    # so that a sustained rise dipping under the z test for a point is one spike, not two
    spikes = [
        (a + int(np.argmax(hit[a : b + 1])), b) for a, b in true_runs(high) if hit[a : b + 1].any()
    ]
    every = int(np.median(np.diff(steps))) if steps.size > 1 else 1
    return GradNorm(steps, norms, reference, spikes, every)


def precursor(
    g: GradNorm | None, steps: np.ndarray, at: int, window: int, previous: int | None = None
) -> Precursor | None:
    """The latest onset of a grad-norm spike before the loss span that begins at point ``at``.

    The steps searched are those the loss's reference covers (its ``window`` points before
    ``at``; at least one spacing of the norm's measurements), up to the span's first step,
    after the previous span's last point ``previous``. A spike begun before them and lasting
    into them is no onset: it is reported as ``began``.

    Args:
        g: the scored norm (:func:`grad_norm`), None when the run lacks it.
        steps: ``[n]`` the steps of the loss's scored points.
        at: index into ``steps`` of the span's first point.
        window: the loss's trailing points.
        previous: index into ``steps`` of the previous span's last point, if any.

    Returns:
        None without the norm, else what it did before the span.
    """
    if g is None:
        return None
    first = int(steps[at])
    lo = first - max(first - int(steps[max(0, at - window)]), g.every)
    lo = max(lo, int(min(steps[0], g.steps[0])))  # nothing to search before the runs began
    if previous is not None:
        lo = max(lo, int(steps[previous]) + 1)
    inside = (g.steps >= lo) & (g.steps <= first)  # [m]
    found = Precursor(first - lo, int(np.isfinite(g.reference[inside]).sum()))
    onsets = [a for a, _ in g.spikes if inside[a]]
    if not onsets:  # a spike begun before the steps searched and lasting into them
        ongoing = [(a, b) for a, b in g.spikes if g.steps[a] < lo <= g.steps[b]]
        if not ongoing:
            return found
        a, b = ongoing[-1]
        last = int(np.searchsorted(g.steps, first, side="right")) - 1  # the last point searched
        return replace(found, began=(int(g.steps[a]), int(g.steps[min(b, last)])))
    i = onsets[-1]
    spacing = max(
        int(g.steps[i] - g.steps[i - 1]) if i > 0 else 1,
        int(steps[at] - steps[at - 1]) if at > 0 else 1,
    )
    return replace(
        found,
        step=int(g.steps[i]),
        ratio=float(g.values[i] / g.reference[i]),
        reference=float(g.reference[i]),
        lead=first - int(g.steps[i]),
        resolution=spacing,
    )


def _lead_text(low: int, high: int, resolution: int) -> str:
    """``"the same step"``, ``"7 steps before"`` or ``"0-2 steps before"``, with the spacing
    of the measurements when it is coarser than one step."""
    if high == 0:
        text = "the same step"
    else:
        text = f"{low} step{'s' * (low != 1)}" if low == high else f"{low}-{high} steps"
        text += " before"
    if resolution > 1:
        text += f" (to within {resolution} steps, the spacing of the measurements)"
    return text


def evidence(p: Precursor | None) -> dict[str, float | int | str]:
    """A span's evidence about the gradient norm before it (nothing without the norm)."""
    if p is None:
        return {}
    searched = f"the {p.lookback} step{'s' * (p.lookback != 1)} before"
    if p.scored == 0:
        return {
            "grad_norm": f"not judged: no {TOTAL} point with a trailing reference in "
            f"{searched} the spike"
        }
    found: dict[str, float | int | str] = {
        "grad_spike_before": p.step is not None,
        "grad_lookback_steps": p.lookback,
    }
    if p.began is not None:
        return {
            **found,
            "grad_spike_began": p.began[0],
            "grad_spike_lasted_to": p.began[1],
            "grad_norm": f"no new {TOTAL} spike in {searched}: one that began at step "
            f"{p.began[0]} lasted to step {p.began[1]}",
        }
    if p.step is None:
        return {
            **found,
            "grad_norm": f"no {TOTAL} spike in {searched} ({p.scored} measurements scored)",
        }
    return {
        **found,
        "grad_spike_step": p.step,
        "grad_spike_ratio": p.ratio,
        "grad_lead_steps": p.lead,
        "grad_lead_resolution": p.resolution,
        "grad_norm": f"{TOTAL} {fmt(p.ratio)}x its trailing median {fmt(p.reference)} "
        f"at step {p.step}, {_lead_text(p.lead, p.lead, p.resolution)}",
    }


def summary(grads: Sequence[Precursor | None]) -> dict[str, float | int | str]:
    """A recurrent summary's evidence: how many spikes the gradient norm spiked before."""
    judged = [p for p in grads if p is not None and p.scored > 0]
    seen = [p for p in judged if p.step is not None]
    if not judged:
        return {} if all(p is None for p in grads) else evidence(grads[0])
    found: dict[str, float | int | str] = {
        "grad_spikes_before": len(seen),
        "grad_spikes_judged": len(judged),
    }
    text = f"{TOTAL} spiked before {len(seen)} of the {len(judged)} spikes judged"
    if seen:
        leads = np.array([p.lead for p in seen])  # [s]
        resolution = max(p.resolution for p in seen)
        found |= {
            "grad_lead_median": float(np.median(leads)),
            "grad_lead_min": int(leads.min()),
            "grad_lead_max": int(leads.max()),
            "grad_lead_resolution": resolution,
        }
        text += ", " + _lead_text(int(leads.min()), int(leads.max()), resolution)
    return {**found, "grad_norm": text}


def warning_action(grads: Sequence[Precursor | None]) -> str:
    """The sentence added to the action when the gradient norm spiked steps ahead."""
    judged = [p for p in grads if p is not None and p.scored > 0]
    ahead = [p for p in judged if p.step is not None and p.lead > 0]
    if not ahead:
        return ""
    lead = int(np.median([p.lead for p in ahead]))
    level = float(np.median([p.reference for p in ahead]))
    return (
        f" The gradient norm ({TOTAL}) gave {lead} step{'s' * (lead != 1)} of warning"
        + (f" (median over {len(ahead)} of {len(judged)} spikes)" if len(judged) > 1 else "")
        + ": clip it near the level it held before (torch.nn.utils.clip_grad_norm_, max_norm "
        f"about {fmt(level)})."
    )
