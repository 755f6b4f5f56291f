"""trainprobe: training-dynamics diagnostics for PyTorch.

Attach probes to any ``nn.Module``, record on a schedule into a crash-safe run
store, flag instabilities with detectors, look at it all in one HTML file.
"""

__version__ = "0.1.0"

from . import curvature, gradients, regions, spectra
from .analysis import Finding, Severity, analyze
from .curvature import criterion_loss, hessian_operator
from .monitor import Monitor, watch
from .probes import (
    ActivationStats,
    FeatureAttribution,
    GradConflict,
    GradientSubspace,
    GradNoise,
    GradSpectrum,
    GrokSignals,
    HeldOut,
    HessianDensity,
    HessianTop,
    HessianTrace,
    LayerNorms,
    LearningRate,
    LocalComplexity,
    NonFiniteGuard,
    NTKAlignment,
    NTKResponse,
    Robustness,
    Sharpness,
    UpdateNorms,
    WeightSpectrum,
    at_steps,
    default_probes,
    every,
    log_spaced,
)
from .step import StepHandle
from .store import Run, RunError

__all__ = [
    # monitoring
    "Monitor",
    "StepHandle",
    "watch",
    # probes and schedules
    "ActivationStats",
    "LayerNorms",
    "LearningRate",
    "NonFiniteGuard",
    "UpdateNorms",
    # curvature probes and the curvature core
    "GradientSubspace",
    "HessianDensity",
    "HessianTop",
    "HessianTrace",
    "Sharpness",
    "criterion_loss",
    "curvature",
    "hessian_operator",
    # gradient structure probes and their cores
    "GradConflict",
    "GradNoise",
    "GradSpectrum",
    "WeightSpectrum",
    "gradients",
    "spectra",
    # grokking, starvation and region probes and their cores
    "FeatureAttribution",
    "GrokSignals",
    "HeldOut",
    "LocalComplexity",
    "NTKAlignment",
    "NTKResponse",
    "Robustness",
    "regions",
    "at_steps",
    "default_probes",
    "every",
    "log_spaced",
    # stored runs
    "Run",
    "RunError",
    # analysis
    "Finding",
    "Severity",
    "analyze",
]
