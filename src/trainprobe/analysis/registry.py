"""The detector registry and :func:`analyze`, which runs every applicable detector."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..store import Run
from .class_competition import detect_class_competition
from .edge_of_stability import detect_edge_of_stability
from .exploding import detect_exploding_gradients
from .findings import Finding
from .gradient_conflict import detect_gradient_conflict
from .gradient_starvation import detect_gradient_starvation
from .grokking import detect_grokking
from .instability import detect_instability, members
from .loss_divergence import detect_loss_divergence
from .loss_spike import detect_loss_spikes
from .noise_scale import detect_noise_scale
from .nonfinite import detect_nonfinite
from .region_migration import detect_region_migration
from .update_ratio import detect_update_ratio
from .vanishing import detect_vanishing_gradients


@dataclass(frozen=True)
class Detector:
    """A named detector and the record keys it reads.

    Attributes:
        name: the ``Finding.detector`` name its findings carry.
        func: ``run -> findings``, with default thresholds.
        needs: fnmatch glob patterns of record keys (e.g. ``"norms/grad/*"``);
            the detector runs only when every pattern matches some key of the run. A
            pattern may offer alternatives, ``"a/* | b/c"``: any of them matching counts.
            A detector may narrow a pattern inside: the loss detectors need
            ``scalars/*loss*`` but skip loss-scale keys (``_series.is_loss_key``).

    Raises:
        TypeError: ``needs`` is a bare string instead of a tuple of patterns.
    """

    name: str
    func: Callable[[Run], list[Finding]]
    needs: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.needs, str) or not all(isinstance(p, str) for p in self.needs):
            raise TypeError(
                f"Detector {self.name!r}: needs must be a tuple of glob patterns such as "
                f"('norms/grad/*',), got {self.needs!r}"
            )
        object.__setattr__(self, "needs", tuple(self.needs))

    def applies_to(self, keys: Iterable[str]) -> bool:
        """Whether every pattern in ``needs`` matches at least one of ``keys``."""
        keys = list(keys)
        return all(
            any(fnmatchcase(key, choice) for choice in alternatives(pattern) for key in keys)
            for pattern in self.needs
        )


def alternatives(pattern: str) -> list[str]:
    """The glob patterns a ``needs`` entry offers: ``"a/* | b/c"`` -> ``["a/*", "b/c"]``."""
    return [choice.strip() for choice in pattern.split("|")]


DETECTORS: tuple[Detector, ...] = (
    Detector("nonfinite", detect_nonfinite, ("nonfinite/*",)),
    Detector("loss_spike", detect_loss_spikes, ("scalars/*loss*",)),
    Detector("loss_divergence", detect_loss_divergence, ("scalars/*loss*",)),
    Detector("exploding_gradients", detect_exploding_gradients, ("norms/grad_total",)),
    Detector("vanishing_gradients", detect_vanishing_gradients, ("norms/grad/*",)),
    Detector("update_ratio", detect_update_ratio, ("updates/ratio/*",)),
    Detector(
        "edge_of_stability",
        detect_edge_of_stability,
        ("sharpness/lambda_max", "sharpness/threshold"),
    ),
    Detector("gradient_conflict", detect_gradient_conflict, ("conflict/cos/*",)),
    Detector(
        "class_competition",
        detect_class_competition,
        ("conflict/loss/class_*", "conflict/count/class_*", "conflict/norm/class_*"),
    ),
    Detector(
        "noise_scale",
        detect_noise_scale,
        ("grad_noise/trace_cov", "grad_noise/grad_sq", "grad_noise/batch_size"),
    ),
    Detector("grokking", detect_grokking, ("heldout/train_acc", "heldout/acc")),
    Detector("region_migration", detect_region_migration, ("regions/*/total",)),
    Detector(
        "gradient_starvation",
        detect_gradient_starvation,
        ("attribution/share/* | ntk_response/min_ratio",),
    ),
    Detector(
        "instability",
        detect_instability,
        ("scalars/*loss* | norms/grad_total | norms/grad/* | nonfinite/* | sharpness/lambda_max",),
    ),
)


def analyze(
    run: Run, *, detectors: Iterable[Detector] = DETECTORS, fold: bool = True
) -> list[Finding]:
    """Run every detector whose needed keys the run holds; skip the others silently.

    Args:
        run: the run to analyse.
        detectors: the detectors to try (default :data:`DETECTORS`).
        fold: leave out the symptom findings (warning or worse, of the detectors in
            :data:`~trainprobe.analysis.instability.SYMPTOMS`) that lie inside an
            ``instability`` episode's span; the episode lists the symptoms its own
            default-threshold detectors found. False keeps every finding.

    Returns:
        The findings, most severe first, then by start step (stable otherwise).

    Raises:
        TypeError: an entry of ``detectors`` is not a :class:`Detector`.
    """
    detectors = tuple(detectors)
    for detector in detectors:
        if not isinstance(detector, Detector):
            raise TypeError(
                f"detectors must hold Detector objects, got {type(detector).__name__}; wrap a "
                "function as Detector(name, func, needs=(...))"
            )
    keys = run.keys()
    findings: list[Finding] = []
    for detector in detectors:
        if detector.applies_to(keys):
            findings.extend(detector.func(run))
    if fold:
        folded = [m for e in findings if e.detector == "instability" for m in members(e, findings)]
        findings = [f for f in findings if not any(f is m for m in folded)]
    return sorted(findings, key=lambda f: (-int(f.severity), f.start_step))
