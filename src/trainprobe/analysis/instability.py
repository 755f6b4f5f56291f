"""One finding per instability episode, combining its symptoms."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..store import Run
from ._checks import check_count
from .edge_of_stability import detect_edge_of_stability
from .exploding import detect_exploding_gradients
from .findings import Finding, Severity
from .loss_divergence import detect_loss_divergence
from .loss_spike import detect_loss_spikes
from .nonfinite import detect_nonfinite
from .vanishing import detect_vanishing_gradients

NAME = "instability"
SYMPTOMS: tuple[tuple[str, Callable[[Run], list[Finding]]], ...] = (
    ("nonfinite", detect_nonfinite),
    ("loss_spike", detect_loss_spikes),
    ("loss_divergence", detect_loss_divergence),
    ("exploding_gradients", detect_exploding_gradients),
    ("vanishing_gradients", detect_vanishing_gradients),
    ("edge_of_stability", detect_edge_of_stability),
)
"""The detectors whose warning and critical findings are symptoms of one instability."""
LABELS = {"nonfinite": "non-finite values", "loss_spike": "loss spike",
          "loss_divergence": "loss divergence", "exploding_gradients": "exploding gradients",
          "vanishing_gradients": "vanishing gradients",
          "edge_of_stability": "sharpness above the stability threshold"}  # fmt: skip


def detect_instability(run: Run, *, gap: int = 50) -> list[Finding]:
    """Instability episodes: symptoms of different kinds close together in time, as one.

    A diverging or unstable run shows several symptoms at once: the loss spikes, the
    gradient norm explodes, the sharpness is above the optimizer's threshold, NaN
    follows. Each has its detector; this one groups their ``WARNING`` and ``CRITICAL``
    findings into episodes (spans no more than ``gap`` steps apart join) and reports
    each episode with two or more kinds of symptom as one finding: the worst severity,
    the union of the spans and keys, every symptom in the evidence, and the action of
    the most severe one. :func:`~trainprobe.analysis.analyze` then leaves the
    symptoms' own findings out (``fold=False`` keeps them).

    Args:
        run: the run to read.
        gap: steps between two symptoms' spans that still joins them (default 50).

    Returns:
        One finding per episode with two or more kinds of symptom.

    Raises:
        ValueError: ``gap < 0``.
    """
    check_count("gap", gap, minimum=0, what="steps between symptoms of one episode")
    symptoms = [f for _, detect in SYMPTOMS for f in detect(run)]
    return episodes(symptoms, gap)


def is_symptom(finding: Finding) -> bool:
    return finding.severity >= Severity.WARNING and finding.detector in LABELS


def episodes(findings: Sequence[Finding], gap: int) -> list[Finding]:
    """Group the symptom findings among ``findings`` into episode findings (see above)."""
    symptoms = sorted((f for f in findings if is_symptom(f)), key=lambda f: f.start_step)
    groups: list[list[Finding]] = []
    for finding in symptoms:
        if groups and finding.start_step <= max(f.end_step for f in groups[-1]) + gap:
            groups[-1].append(finding)
        else:
            groups.append([finding])
    return [_episode(g) for g in groups if len({f.detector for f in g}) >= 2]


def members(episode: Finding, findings: Sequence[Finding]) -> list[Finding]:
    """The symptom findings an episode finding stands for (those inside its span)."""
    return [f for f in findings if is_symptom(f) and episode.start_step <= f.start_step
            and f.end_step <= episode.end_step]  # fmt: skip


def _episode(group: list[Finding]) -> Finding:
    worst = max(group, key=lambda f: (int(f.severity), -f.start_step))
    start, end = min(f.start_step for f in group), max(f.end_step for f in group)
    kinds = list(dict.fromkeys(f.detector for f in group))
    shown = ", ".join(f"{LABELS[k]} ({max(f.severity for f in group if f.detector == k)})"
                      for k in kinds)  # fmt: skip
    evidence: dict[str, float | int | str] = {"symptoms": len(group), "kinds": len(kinds)}
    for i, f in enumerate(group):
        span = f"{f.start_step}-{f.end_step}"
        evidence[f"symptom[{i}]"] = f"{f.detector} ({f.severity}) {span}: {f.message}"
    keys = tuple(dict.fromkeys(k for f in group for k in f.keys))
    return Finding(
        NAME, worst.severity, start, end,
        f"Instability at steps {start}-{end}: {shown}; the worst: {worst.message}",
        worst.action, evidence, keys,
    )  # fmt: skip
