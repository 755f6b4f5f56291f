"""The detector registry and :func:`analyze`, which runs every applicable detector."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from ..store import Run
from . import (
    adam_eps,
    attention_logits,
    class_competition,
    dead_units,
    edge_of_stability,
    exploding,
    gradient_conflict,
    gradient_starvation,
    grokking,
    instability,
    logit_drift,
    loss_divergence,
    loss_spike,
    noise_scale,
    nonfinite,
    region_migration,
    update_ratio,
    vanishing,
)
from .adam_eps import detect_adam_eps_domination
from .attention_logits import detect_attention_logit_growth
from .class_competition import detect_class_competition
from .dead_units import detect_dead_units
from .edge_of_stability import detect_edge_of_stability
from .exploding import detect_exploding_gradients
from .findings import Finding
from .gradient_conflict import detect_gradient_conflict
from .gradient_starvation import detect_gradient_starvation
from .grokking import detect_grokking
from .instability import detect_instability, members
from .logit_drift import detect_output_logit_drift
from .loss_divergence import detect_loss_divergence
from .loss_spike import detect_loss_spikes
from .noise_scale import detect_noise_scale
from .nonfinite import detect_nonfinite
from .region_migration import detect_region_migration
from .update_ratio import detect_update_ratio
from .vanishing import detect_vanishing_gradients

DetectorFunc = Callable[..., list[Finding]]
"""``run -> findings`` (a combining detector also takes ``computed=``)."""


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
            ``scalars/*loss*`` but skip loss-scale keys (``_series.is_loss_key``). Each
            detector module declares its patterns as ``NEEDS`` beside its function.
        combines: detector functions whose findings ``func`` folds into its own;
            :func:`analyze` runs it after the others and calls
            ``func(run, computed={function: findings})`` with the findings of those it
            already ran, so no detector runs twice (``instability``).

    Raises:
        TypeError: ``needs`` is a bare string instead of a tuple of patterns, or
            ``combines`` is not a tuple of functions.
    """

    name: str
    func: DetectorFunc
    needs: tuple[str, ...]
    combines: tuple[DetectorFunc, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.needs, str) or not all(isinstance(p, str) for p in self.needs):
            raise TypeError(
                f"Detector {self.name!r}: needs must be a tuple of glob patterns such as "
                f"('norms/grad/*',), got {self.needs!r}"
            )
        if not isinstance(self.combines, tuple | list) or not all(map(callable, self.combines)):
            raise TypeError(
                f"Detector {self.name!r}: combines must be a tuple of detector functions such "
                f"as (detect_loss_spikes,), got {self.combines!r}"
            )
        object.__setattr__(self, "needs", tuple(self.needs))
        object.__setattr__(self, "combines", tuple(self.combines))

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
    Detector(nonfinite.NAME, detect_nonfinite, nonfinite.NEEDS),
    Detector(loss_spike.NAME, detect_loss_spikes, loss_spike.NEEDS),
    Detector(loss_divergence.NAME, detect_loss_divergence, loss_divergence.NEEDS),
    Detector(exploding.NAME, detect_exploding_gradients, exploding.NEEDS),
    Detector(vanishing.NAME, detect_vanishing_gradients, vanishing.NEEDS),
    Detector(update_ratio.NAME, detect_update_ratio, update_ratio.NEEDS),
    Detector(dead_units.NAME, detect_dead_units, dead_units.NEEDS),
    Detector(edge_of_stability.NAME, detect_edge_of_stability, edge_of_stability.NEEDS),
    Detector(gradient_conflict.NAME, detect_gradient_conflict, gradient_conflict.NEEDS),
    Detector(class_competition.NAME, detect_class_competition, class_competition.NEEDS),
    Detector(noise_scale.NAME, detect_noise_scale, noise_scale.NEEDS),
    Detector(grokking.NAME, detect_grokking, grokking.NEEDS),
    Detector(region_migration.NAME, detect_region_migration, region_migration.NEEDS),
    Detector(gradient_starvation.NAME, detect_gradient_starvation, gradient_starvation.NEEDS),
    Detector(attention_logits.NAME, detect_attention_logit_growth, attention_logits.NEEDS),
    Detector(adam_eps.NAME, detect_adam_eps_domination, adam_eps.NEEDS),
    Detector(logit_drift.NAME, detect_output_logit_drift, logit_drift.NEEDS),
    Detector(instability.NAME, detect_instability, instability.NEEDS, instability.COMBINES),
)


def analyze(
    run: Run,
    *,
    detectors: Iterable[Detector] = DETECTORS,
    fold: bool = True,
    config: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Finding]:
    """Run every detector whose needed keys the run holds; skip the others silently.

    Each detector function runs at most once: a detector that combines others
    (``instability``) runs after them and folds the findings they returned.

    Args:
        run: the run to analyse.
        detectors: the detectors to try (default :data:`DETECTORS`).
        fold: leave out the symptom findings (warning or worse, of the detectors in
            :data:`~trainprobe.analysis.instability.SYMPTOMS`) that lie inside an
            ``instability`` episode's span; the episode lists the symptoms its
            detectors found. False keeps every finding.
        config: thresholds by detector name, e.g.
            ``{"exploding_gradients": {"jump_factor": 20}}``: each entry is passed to the
            detector's function as a keyword argument (its keyword-only parameters, see
            :func:`detector_parameters`; CLI: ``trainprobe report --set
            exploding_gradients.jump_factor=20``). Values are checked against the type of
            the parameter's default (an int is accepted for a float; a comma-separated
            string for a tuple of patterns). Detectors not named keep their defaults.

    Returns:
        The findings, most severe first, then by start step (stable otherwise).

    Raises:
        TypeError: an entry of ``detectors`` is not a :class:`Detector`, ``config`` or an
            entry of it is not a mapping, or a value's type does not fit its parameter.
        ValueError: ``config`` names an unknown detector (the message lists the known
            ones) or a parameter the detector does not have (the message lists its
            parameters).

    Examples:
        A run whose loss turns NaN at step 2, as :class:`~trainprobe.probes.NonFiniteGuard`
        records it, written with the store's writer:

        >>> import tempfile
        >>> from trainprobe.store import Record, Run, RunWriter
        >>> folder = tempfile.TemporaryDirectory()
        >>> writer = RunWriter(folder.name)
        >>> losses = [1.0, 0.5, float("nan")]
        >>> writer.append(
        ...     Record(step, {"scalars/loss": loss, "nonfinite/loss": float(loss != loss)})
        ...     for step, loss in enumerate(losses)
        ... )
        >>> writer.close()
        >>> with Run(folder.name) as run:
        ...     findings = analyze(run)
        >>> [(f.detector, str(f.severity), f.start_step) for f in findings]
        [('nonfinite', 'critical', 2)]
        >>> folder.cleanup()
    """
    detectors = tuple(detectors)
    for detector in detectors:
        if not isinstance(detector, Detector):
            raise TypeError(
                f"detectors must hold Detector objects, got {type(detector).__name__}; wrap a "
                "function as Detector(name, func, needs=(...))"
            )
    settings = detector_settings(detectors, config or {})
    findings = [f for found in _run_each_once(run, detectors, settings) for f in found]
    if fold:
        episodes = [e for e in findings if e.detector == instability.NAME]
        folded = [m for e in episodes for m in members(e, findings)]
        findings = [f for f in findings if not any(f is m for m in folded)]
    return sorted(findings, key=lambda f: (-int(f.severity), f.start_step))


def _run_each_once(
    run: Run, detectors: tuple[Detector, ...], settings: Mapping[str, Mapping[str, Any]]
) -> list[list[Finding]]:
    """Each applicable detector's findings, in the order of ``detectors``.

    The plain detectors run first, each function once, with the detector's ``settings``;
    then those that combine others, given the findings already computed by the functions
    they combine.
    """
    keys = run.keys()
    applies = [detector.applies_to(keys) for detector in detectors]
    computed: dict[DetectorFunc, list[Finding]] = {}
    found: list[list[Finding]] = [[] for _ in detectors]
    for i, detector in enumerate(detectors):
        if applies[i] and not detector.combines:
            if detector.func not in computed:
                computed[detector.func] = detector.func(run, **settings.get(detector.name, {}))
            found[i] = computed[detector.func]
    for i, detector in enumerate(detectors):
        if applies[i] and detector.combines:
            known = {func: computed[func] for func in detector.combines if func in computed}
            found[i] = detector.func(run, computed=known, **settings.get(detector.name, {}))
    return found


def detector_parameters(detector: Detector) -> dict[str, inspect.Parameter]:
    """The settable thresholds of ``detector``: its function's keyword-only parameters
    (all but ``computed``, which :func:`analyze` passes itself), with their defaults."""
    params = inspect.signature(detector.func).parameters.values()
    return {p.name: p for p in params if p.kind is p.KEYWORD_ONLY and p.name != "computed"}


def detector_settings(
    detectors: Iterable[Detector], config: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``config`` checked against ``detectors`` and converted (see :func:`analyze`).

    Raises:
        TypeError: ``config`` or an entry is not a mapping, or a value has the wrong type.
        ValueError: an unknown detector or parameter name.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            f"analyze(config=...) must be a dict by detector name such as "
            f"{{'exploding_gradients': {{'jump_factor': 20}}}}, got {type(config).__name__}"
        )
    by_name = {d.name: d for d in detectors}
    settings = {}
    for name, params in config.items():
        if name not in by_name:
            raise ValueError(
                f"config names an unknown detector {name!r}; the detectors are: "
                f"{', '.join(by_name)}"
            )
        known = detector_parameters(by_name[name])
        if not isinstance(params, Mapping):
            raise TypeError(
                f"config entry {name!r} must be a dict of parameters "
                f"({', '.join(known)}), got {type(params).__name__}"
            )
        settings[name] = {key: _checked(name, key, value, known) for key, value in params.items()}
    return settings


def _checked(detector: str, key: str, value: Any, known: Mapping[str, inspect.Parameter]) -> Any:
    """``value`` for ``detector``'s parameter ``key``, converted to its default's type."""
    if key not in known:
        raise ValueError(
            f"detector {detector!r} has no parameter {key!r}; its parameters are: "
            f"{', '.join(known) or '(none)'}"
        )
    default = known[key].default
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, tuple) and isinstance(value, str):
        value = tuple(part.strip() for part in value.split(",") if part.strip())
    for kind, fits, convert in (
        (bool, isinstance(value, bool), bool),
        (int, isinstance(value, int) and number, int),
        (float, number, float),
        (tuple, isinstance(value, tuple | list), tuple),
        (str, isinstance(value, str), str),
    ):
        if isinstance(default, kind):
            if not fits:
                raise TypeError(
                    f"detector {detector!r}: {key} takes a {kind.__name__} like its default "
                    f"{default!r}, got {type(value).__name__} {value!r}"
                )
            return convert(value)
    return value  # no default to compare with: the detector checks it
