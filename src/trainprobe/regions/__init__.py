"""Input-space geometry of piecewise-linear networks, as pure torch (no stored hooks, no
state): local complexity (neurons changing state around a point), exact linear pieces
along segments, and L∞ PGD adversarial accuracy."""

from ._hooks import ACTIVATIONS, AFFINE, POOLS, SUPPORTED, pattern_modules
from .attack import AttackResult, pgd_attack
from .complexity import ComplexityCounts, cross_polytope, local_complexity, random_frame
from .segments import SegmentPieces, segment_pieces

__all__ = [
    # what a region count can see
    "ACTIVATIONS",
    "AFFINE",
    "POOLS",
    "SUPPORTED",
    "pattern_modules",
    # local complexity
    "ComplexityCounts",
    "cross_polytope",
    "local_complexity",
    "random_frame",
    # exact pieces along segments
    "SegmentPieces",
    "segment_pieces",
    # adversarial robustness
    "AttackResult",
    "pgd_attack",
]
