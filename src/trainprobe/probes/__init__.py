"""Probes: one small object per measured quantity, and their schedules."""

from ._curvature import CurvatureProbe
from .activations import ActivationStats
from .adam import AdamHealth
from .amp import LossScale
from .base import NEEDS, PerLayer, Probe, StepContext
from .conflict import GradConflict
from .flow import GradientFlow
from .grokking import GrokSignals
from .heldout import HeldOut
from .hessian import HessianDensity, HessianTop, HessianTrace
from .noise import GradNoise
from .nonfinite import NonFiniteGuard
from .norms import LayerNorms
from .ntk import NTKAlignment
from .ntk_response import NTKResponse
from .optim import LearningRate
from .regions import LocalComplexity
from .robustness import Robustness
from .schedules import AnyOf, AtSteps, Every, LogSpaced, at_steps, every, log_spaced
from .sharpness import Sharpness, StabilityRule, stability_rule
from .spectra import GradSpectrum
from .starvation import FeatureAttribution
from .subspace import GradientSubspace
from .transformer import AttentionStats, OutputLogits
from .updates import UpdateNorms
from .weight_spectrum import WeightSpectrum

#: Probe classes by the name their keys start with (the CLI's ``--probes`` uses it).
PROBES = {
    "norms": LayerNorms,
    "updates": UpdateNorms,
    "activations": ActivationStats,
    "nonfinite": NonFiniteGuard,
    "optim": LearningRate,
    "adam": AdamHealth,
    "attention": AttentionStats,
    "logits": OutputLogits,
    "amp": LossScale,
    "hessian": HessianTop,
    "hessian_trace": HessianTrace,
    "hessian_density": HessianDensity,
    "sharpness": Sharpness,
    "grad_subspace": GradientSubspace,
    "conflict": GradConflict,
    "grad_noise": GradNoise,
    "grad_spectrum": GradSpectrum,
    "weight_spectrum": WeightSpectrum,
    "grad_flow": GradientFlow,
    "regions": LocalComplexity,
    "robustness": Robustness,
    "heldout": HeldOut,
    "grok": GrokSignals,
    "ntk": NTKAlignment,
    "attribution": FeatureAttribution,
    "ntk_response": NTKResponse,
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
    "AdamHealth",
    "AttentionStats",
    "CurvatureProbe",
    "FeatureAttribution",
    "GradConflict",
    "GradNoise",
    "GradSpectrum",
    "GradientFlow",
    "GradientSubspace",
    "GrokSignals",
    "HeldOut",
    "HessianDensity",
    "HessianTop",
    "HessianTrace",
    "AnyOf",
    "AtSteps",
    "Every",
    "LayerNorms",
    "LearningRate",
    "LossScale",
    "LocalComplexity",
    "LogSpaced",
    "NTKAlignment",
    "NTKResponse",
    "NonFiniteGuard",
    "OutputLogits",
    "PerLayer",
    "Probe",
    "Robustness",
    "Sharpness",
    "StabilityRule",
    "StepContext",
    "UpdateNorms",
    "WeightSpectrum",
    "at_steps",
    "default_probes",
    "every",
    "log_spaced",
    "stability_rule",
]
