"""The detector corpus: generated training runs with known ground truth.

Each :class:`Case` trains a small model under ``trainprobe.watch`` (CPU, seconds) into a
run directory; ``kind="healthy"`` runs must get no warning or critical finding,
``kind="sick"`` runs must get each :class:`Expected` finding within its span.
``benchmarks/detectors.py`` runs and scores them (:mod:`.scoring`);
``tests/benchmarks/test_detectors.py`` runs :data:`FAST` in the default tests.
"""

from __future__ import annotations

from . import (
    healthy_arch,
    healthy_controls,
    healthy_edge,
    healthy_loops,
    logit_drift_cases,
    regions_cases,
    sick_flow,
    sick_instability,
    sick_structure,
    transformer_cases,
)
from .base import Case, Expected

CASES: tuple[Case, ...] = (
    *healthy_arch.CASES,
    *healthy_edge.CASES,
    *healthy_loops.CASES,
    *healthy_controls.CASES,
    *sick_instability.CASES,
    *sick_flow.CASES,
    *sick_structure.CASES,
    *regions_cases.CASES,
    *transformer_cases.CASES,
    *logit_drift_cases.CASES,
)
"""Every case, healthy first."""

BY_NAME: dict[str, Case] = {case.name: case for case in CASES}

FAST: tuple[str, ...] = (
    "mlp_sgd_constant",
    "manual_sgd_no_optimizer",
    "normalised_fixed_step",
    "floor_ce_quantised",
    "tasks_mildly_negative",
    "nan_input_batch",
    "explode_geometric",
    "explode_from_first_step",
    "vanishing_deep_sigmoid",
    "gradient_starvation_toy",
)
"""Cheap cases (about a second each) covering both kinds, for the default tests."""

__all__ = ["BY_NAME", "CASES", "FAST", "Case", "Expected"]
