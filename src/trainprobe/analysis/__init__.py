"""Detectors over stored series, turning a :class:`~trainprobe.store.Run` into Findings.

numpy/scipy only: nothing here imports torch, so a run can be analysed anywhere.
"""

from .adam_eps import detect_adam_eps_domination
from .attention_logits import detect_attention_logit_growth
from .class_competition import detect_class_competition
from .dead_units import detect_dead_units
from .edge_of_stability import detect_edge_of_stability
from .exploding import detect_exploding_gradients
from .findings import Finding, Severity
from .gradient_conflict import detect_gradient_conflict
from .gradient_starvation import detect_gradient_starvation
from .grokking import detect_grokking
from .instability import detect_instability
from .logit_drift import detect_output_logit_drift
from .loss_divergence import detect_loss_divergence
from .loss_spike import detect_loss_spikes
from .noise_scale import detect_noise_scale
from .nonfinite import detect_nonfinite
from .region_migration import detect_region_migration
from .registry import DETECTORS, Detector, analyze
from .update_ratio import detect_update_ratio
from .vanishing import detect_vanishing_gradients

__all__ = [
    "DETECTORS",
    "Detector",
    "Finding",
    "Severity",
    "analyze",
    "detect_class_competition",
    "detect_dead_units",
    "detect_edge_of_stability",
    "detect_exploding_gradients",
    "detect_gradient_conflict",
    "detect_adam_eps_domination",
    "detect_attention_logit_growth",
    "detect_gradient_starvation",
    "detect_grokking",
    "detect_instability",
    "detect_loss_divergence",
    "detect_loss_spikes",
    "detect_noise_scale",
    "detect_nonfinite",
    "detect_output_logit_drift",
    "detect_region_migration",
    "detect_update_ratio",
    "detect_vanishing_gradients",
]
