"""One finding per instability episode, combining its symptoms."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..store import Run
from . import edge_of_stability, exploding, loss_divergence, loss_spike, nonfinite, vanishing
from ._checks import check_count
from ._series import finite_series, fmt
from .edge_of_stability import at_edge, detect_edge_of_stability, ratio_around
from .exploding import detect_exploding_gradients
from .findings import Finding, Severity
from .loss_divergence import detect_loss_divergence
from .loss_spike import detect_loss_spikes
from .nonfinite import detect_nonfinite
from .vanishing import detect_vanishing_gradients

NAME = "instability"
SYMPTOMS: tuple[tuple[str, Callable[[Run], list[Finding]]], ...] = (
    (nonfinite.NAME, detect_nonfinite),
    (loss_spike.NAME, detect_loss_spikes),
    (loss_divergence.NAME, detect_loss_divergence),
    (exploding.NAME, detect_exploding_gradients),
    (vanishing.NAME, detect_vanishing_gradients),
    (edge_of_stability.NAME, detect_edge_of_stability),
)
"""The detectors whose warning and critical findings are symptoms of one instability."""
LABELS = {
    nonfinite.NAME: "non-finite values",
    loss_spike.NAME: "loss spike",
    loss_divergence.NAME: "loss divergence",
    exploding.NAME: "exploding gradients",
    vanishing.NAME: "vanishing gradients",
    edge_of_stability.NAME: "sharpness above the stability threshold",
}
_MODULES = (nonfinite, loss_spike, loss_divergence, exploding, vanishing, edge_of_stability)
NEEDS = (" | ".join(dict.fromkeys(module.NEEDS[0] for module in _MODULES)),)
"""Record keys it needs: those of any symptom detector (each needs at least its first)."""
COMBINES = tuple(detect for _, detect in SYMPTOMS)
"""The detector functions whose findings it folds (``analyze`` passes them as ``computed``)."""
CARRIED = ("grad_norm", "grad_lead_steps", "grad_lead_median")
"""A loss spike's evidence an episode keeps besides its message, as ``symptom[i].<key>``: what
the gradient norm did before it (a sentence) and its lead in steps (one spike's, or the
median of a recurrent summary's), when ``norms/grad_total`` was recorded."""


def detect_instability(
    run: Run,
    *,
    gap: int = 50,
    computed: Mapping[Callable[[Run], list[Finding]], Sequence[Finding]] | None = None,
) -> list[Finding]:
    """Instability episodes: symptoms of different kinds close together in time, as one.

    A diverging or unstable run shows several symptoms at once: the loss spikes, the
    gradient norm explodes, the sharpness is above the optimizer's threshold, NaN
    follows. Each has its detector; this one groups their ``WARNING`` and ``CRITICAL``
    findings into episodes (spans no more than ``gap`` steps apart join) and reports
    each episode with two or more kinds of symptom as one finding: the worst severity,
    the union of the spans and keys, every symptom in the evidence, and the action of
    the most severe one. :func:`~trainprobe.analysis.analyze` then leaves the
    symptoms' own findings out (``fold=False`` keeps them). Each symptom ``i`` is its
    message, ``symptom[i]``; a loss spike's gradient-norm evidence stays too
    (:data:`CARRIED`, as ``symptom[i].grad_norm`` and ``symptom[i].grad_lead_steps``).

    Args:
        run: the run to read.
        gap: steps between two symptoms' spans that still joins them (default 50).
        computed: findings the symptom detectors (:data:`SYMPTOMS`, default thresholds)
            already returned for this run, by detector function: :func:`analyze` passes
            those it ran, so no detector runs twice. The symptom detectors missing from
            it run here.

    Returns:
        One finding per episode with two or more kinds of symptom.

    Raises:
        ValueError: ``gap < 0``.
        TypeError: ``computed`` is not a mapping.
    """
    check_count("gap", gap, minimum=0, what="steps between symptoms of one episode")
    if computed is not None and not isinstance(computed, Mapping):
        raise TypeError(
            f"computed must map symptom detector functions to their findings, e.g. "
            f"{{detect_loss_spikes: [...]}}, got {type(computed).__name__}"
        )
    known = computed or {}
    found = [known[detect] if detect in known else detect(run) for _, detect in SYMPTOMS]
    flat = [f for symptoms in found for f in symptoms]
    catapults, rest = at_the_edge(flat, gap, run)
    return catapults + episodes(rest, gap)


def _recoverable(finding: Finding) -> bool:
    """A symptom the edge of stability explains: a loss spike the loss came back from (a
    warning), or a gradient-norm jump (at the edge the norm rises from the smooth-descent
    level to that of the oscillation along the top eigendirection, and may stay there)."""
    if finding.detector == loss_spike.NAME:
        return finding.severity is Severity.WARNING
    return finding.detector == exploding.NAME and exploding.is_jump(finding)


def at_the_edge(
    findings: Sequence[Finding], gap: int, run: Run | None = None
) -> tuple[list[Finding], list[Finding]]:
    """Catapults: recovered loss spikes and gradient jumps (:func:`_recoverable`) where the
    sharpness sat at or just past the optimizer's threshold: inside an edge-of-stability
    span (its ``INFO`` finding), or with ``sharpness/ratio`` measured in ``[AT_EDGE,
    CATAPULT_END)`` around them (:func:`~.edge_of_stability.at_edge`; a learning-rate
    spike far past it is not a catapult).
    Gradient descent there is non-monotone by nature: the loss jumps, the sharpness
    drops, the loss comes back (Lewkowycz et al. 2020, the catapult phase; Cohen et al.
    2021). Each group of them, with no other symptom among them, becomes one ``INFO``
    finding (whose span lets ``analyze`` fold the symptoms it explains); the findings left
    over are returned for :func:`episodes`."""
    edges = [
        f for f in findings if f.detector == edge_of_stability.NAME and f.severity is Severity.INFO
    ]
    ratio = finite_series(run, edge_of_stability.RATIO) if run is not None else None
    symptoms = [f for f in findings if is_symptom(f)]
    candidates = sorted(
        (f for f in symptoms if _recoverable(f) and _sharp(f, edges, ratio, gap)),
        key=lambda f: f.start_step,
    )
    groups: list[list[Finding]] = []
    for f in candidates:
        if groups and f.start_step <= max(g.end_step for g in groups[-1]) + gap:
            groups[-1].append(f)
        else:
            groups.append([f])
    used: set[int] = set()
    out = []
    for inside in groups:
        start, end = min(f.start_step for f in inside), max(f.end_step for f in inside)
        others = [
            f
            for f in symptoms
            if f not in inside and f.start_step <= end + gap and f.end_step >= start - gap
        ]
        if others:  # something else went wrong there too: an ordinary episode
            continue
        used.update(id(f) for f in inside)
        out.append(_catapult(edges, ratio, inside, start, end, gap))
    return out, [f for f in findings if id(f) not in used]


def _sharp(f: Finding, edges: list[Finding], ratio: tuple | None, gap: int) -> bool:
    """Whether the sharpness sat at the edge (or in the catapult phase) around ``f``."""
    if any(e.start_step - gap <= f.start_step and f.end_step <= e.end_step + gap for e in edges):
        return True
    return ratio is not None and at_edge(ratio_around(ratio, f.start_step - gap, f.end_step + gap))


def _catapult(
    edges: list[Finding], ratio: tuple | None, inside: list[Finding], start: int, end: int, gap: int
) -> Finding:
    kinds = list(dict.fromkeys(LABELS[f.detector] for f in inside))
    evidence: dict[str, float | int | str] = {"catapults": len(inside)}
    for i, f in enumerate(inside):
        evidence[f"symptom[{i}]"] = f"{f.detector} ({f.severity}) {f.start_step}-{f.end_step}"
        evidence |= _carried(i, f)
    level = None if ratio is None else ratio_around(ratio, start - gap, end + gap)
    if level is not None:
        evidence["sharpness_ratio_median"] = level
    edge = next((e for e in edges if e.start_step - gap <= start and end <= e.end_step + gap), None)
    if edge is not None:
        evidence["edge_of_stability"] = f"{edge.start_step}-{edge.end_step}: {edge.message}"
    where = (
        f"steps {edge.start_step}-{edge.end_step}"
        if edge is not None
        else f"λ_max / threshold {fmt(level if level is not None else float('nan'))}"
    )
    return Finding(
        NAME,
        Severity.INFO,
        start,
        end,
        f"Catapults at the edge of stability, steps {start}-{end}: {len(inside)} recovered "
        f"{' and '.join(kinds)} while λ_max sat at or past the optimizer's threshold "
        f"({where}); gradient descent there is non-monotone by nature and comes back.",
        "Nothing to fix; lower the learning rate only if the loss stops coming back.",
        evidence,
        tuple(dict.fromkeys(k for f in inside for k in f.keys)),
    )


def is_symptom(finding: Finding) -> bool:
    """A warning or critical finding of one of the :data:`SYMPTOMS` detectors."""
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
    return [
        f
        for f in findings
        if is_symptom(f) and episode.start_step <= f.start_step and f.end_step <= episode.end_step
    ]


def _episode(group: list[Finding]) -> Finding:
    worst = max(group, key=lambda f: (int(f.severity), -f.start_step))
    start, end = min(f.start_step for f in group), max(f.end_step for f in group)
    kinds = list(dict.fromkeys(f.detector for f in group))
    shown = ", ".join(
        f"{LABELS[k]} ({max(f.severity for f in group if f.detector == k)})" for k in kinds
    )
    evidence: dict[str, float | int | str] = {"symptoms": len(group), "kinds": len(kinds)}
    for i, f in enumerate(group):
        span = f"{f.start_step}-{f.end_step}"
        evidence[f"symptom[{i}]"] = f"{f.detector} ({f.severity}) {span}: {f.message}"
        evidence |= _carried(i, f)
    keys = tuple(dict.fromkeys(k for f in group for k in f.keys))
    return Finding(
        NAME,
        worst.severity,
        start,
        end,
        f"Instability at steps {start}-{end}: {shown}; the worst: {worst.message}",
        worst.action,
        evidence,
        keys,
    )


def _carried(i: int, symptom: Finding) -> dict[str, float | int | str]:
    """Symptom ``i``'s evidence the episode keeps besides its message (:data:`CARRIED`)."""
    if symptom.detector != loss_spike.NAME:
        return {}
    return {f"symptom[{i}].{k}": symptom.evidence[k] for k in CARRIED if k in symptom.evidence}
