"""trainprobe: training-dynamics diagnostics for PyTorch.

Attach probes to any ``nn.Module``, record on a schedule into a crash-safe run
store, flag instabilities with detectors, look at it all in one HTML file.

The public names are loaded on first use (PEP 562): ``import trainprobe`` imports
nothing else, so ``trainprobe report``, ``dashboard``, ``export`` and ``--help`` never
import torch. ``from trainprobe import HessianTop`` works as always.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

_PUBLIC: dict[str, str] = {
    # monitoring (torch)
    "Monitor": "trainprobe.monitor",
    "watch": "trainprobe.monitor",
    "StepHandle": "trainprobe.monitor",
    # probes and schedules (torch)
    "ActivationStats": "trainprobe.probes",
    "FeatureAttribution": "trainprobe.probes",
    "GradConflict": "trainprobe.probes",
    "GradientFlow": "trainprobe.probes",
    "GradientSubspace": "trainprobe.probes",
    "GradNoise": "trainprobe.probes",
    "GradSpectrum": "trainprobe.probes",
    "GrokSignals": "trainprobe.probes",
    "HeldOut": "trainprobe.probes",
    "HessianDensity": "trainprobe.probes",
    "HessianTop": "trainprobe.probes",
    "HessianTrace": "trainprobe.probes",
    "LayerNorms": "trainprobe.probes",
    "LearningRate": "trainprobe.probes",
    "LossScale": "trainprobe.probes",
    "LocalComplexity": "trainprobe.probes",
    "NonFiniteGuard": "trainprobe.probes",
    "NTKAlignment": "trainprobe.probes",
    "NTKResponse": "trainprobe.probes",
    "Robustness": "trainprobe.probes",
    "Sharpness": "trainprobe.probes",
    "UpdateNorms": "trainprobe.probes",
    "WeightSpectrum": "trainprobe.probes",
    "at_steps": "trainprobe.probes",
    "default_probes": "trainprobe.probes",
    "every": "trainprobe.probes",
    "log_spaced": "trainprobe.probes",
    # the maths cores (torch): subpackages, and two names from the curvature core
    "curvature": "trainprobe.curvature",
    "gradients": "trainprobe.gradients",
    "regions": "trainprobe.regions",
    "spectra": "trainprobe.spectra",
    "criterion_loss": "trainprobe.curvature",
    "hessian_operator": "trainprobe.curvature",
    # stored runs and their analysis (no torch)
    "Run": "trainprobe.store",
    "RunError": "trainprobe.store",
    "RunInUseError": "trainprobe.store",
    "Finding": "trainprobe.analysis",
    "Severity": "trainprobe.analysis",
    "analyze": "trainprobe.analysis",
}
"""Each public name -> the module it is imported from, on first access. A name equal to its
module's last part (``"curvature": "trainprobe.curvature"``) is that subpackage itself.
Names and ``__all__`` agree (tests/test_startup.py checks)."""

__all__ = [
    # monitoring
    "Monitor",
    "StepHandle",
    "watch",
    # probes and schedules
    "ActivationStats",
    "LayerNorms",
    "LearningRate",
    "LossScale",
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
    "GradientFlow",
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
    "RunInUseError",
    # analysis
    "Finding",
    "Severity",
    "analyze",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ below
    from . import curvature, gradients, regions, spectra
    from .analysis import Finding, Severity, analyze
    from .curvature import criterion_loss, hessian_operator
    from .monitor import Monitor, StepHandle, watch
    from .probes import (
        ActivationStats,
        FeatureAttribution,
        GradConflict,
        GradientFlow,
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
        LossScale,
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
    from .store import Run, RunError, RunInUseError


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access and cache the value."""
    target = _PUBLIC.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(target)
    value = module if target == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
