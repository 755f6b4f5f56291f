"""Probes: one small object per measured quantity, and their schedules."""

from ._curvature import CurvatureProbe
from .activations import ActivationStats
from .base import NEEDS, PerLayer, Probe, StepContext
from .hessian import HessianDensity, HessianTop, HessianTrace
from .nonfinite import NonFiniteGuard
from .norms import LayerNorms
from .optim import LearningRate
from .schedules import AnyOf, AtSteps, Every, LogSpaced, at_steps, every, log_spaced
from .sharpness import Sharpness, StabilityRule, stability_rule
from .subspace import GradientSubspace
from .updates import UpdateNorms

#: Probe classes by the name their keys start with (the CLI's ``--probes`` uses it).
PROBES = {
    "norms": LayerNorms,
    "updates": UpdateNorms,
    "activations": ActivationStats,
    "nonfinite": NonFiniteGuard,
    "optim": LearningRate,
    "hessian": HessianTop,
    "hessian_trace": HessianTrace,
    "hessian_density": HessianDensity,
    "sharpness": Sharpness,
    "grad_subspace": GradientSubspace,
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
    "CurvatureProbe",
    "GradientSubspace",
    "HessianDensity",
    "HessianTop",
    "HessianTrace",
    "AnyOf",
    "AtSteps",
    "Every",
    "LayerNorms",
    "LearningRate",
    "LogSpaced",
    "NonFiniteGuard",
    "PerLayer",
    "Probe",
    "Sharpness",
    "StabilityRule",
    "StepContext",
    "UpdateNorms",
    "at_steps",
    "default_probes",
    "every",
    "log_spaced",
    "stability_rule",
]
