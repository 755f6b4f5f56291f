"""Probes: one small object per measured quantity, and their schedules."""

from .activations import ActivationStats
from .base import NEEDS, PerLayer, Probe, StepContext
from .nonfinite import NonFiniteGuard
from .norms import LayerNorms
from .optim import LearningRate
from .schedules import AnyOf, AtSteps, Every, LogSpaced, at_steps, every, log_spaced
from .updates import UpdateNorms

#: Probe classes by the name their keys start with (the CLI's ``--probes`` uses it).
PROBES = {
    "norms": LayerNorms,
    "updates": UpdateNorms,
    "activations": ActivationStats,
    "nonfinite": NonFiniteGuard,
    "optim": LearningRate,
}


def default_probes(*, every_n: int = 10) -> list[Probe]:
    """The cheap probes: norms, updates and activations every ``every_n`` steps;
    the non-finite guard and the learning rate every step."""
    schedule = every(every_n)
    return [
        LayerNorms(schedule=schedule),
        UpdateNorms(schedule=schedule),
        ActivationStats(schedule=schedule),
        NonFiniteGuard(),
        LearningRate(),
    ]


__all__ = [
    "NEEDS",
    "PROBES",
    "ActivationStats",
    "AnyOf",
    "AtSteps",
    "Every",
    "LayerNorms",
    "LearningRate",
    "LogSpaced",
    "NonFiniteGuard",
    "PerLayer",
    "Probe",
    "StepContext",
    "UpdateNorms",
    "at_steps",
    "default_probes",
    "every",
    "log_spaced",
]
