"""Gradient structure as pure torch.func maths: per-example gradients, group and task
gradients, their pairwise geometry, the gradient noise scale and the empirical neural
tangent kernel (no hooks, no state)."""

from .groups import (
    GroupGradients,
    group_gradients,
    microbatch_gradients,
    task_gradients,
)
from .noise import NoiseScale, layer_sq_norms, microbatch_noise, noise_scale, per_sample_noise
from .ntk import (
    centered_alignment,
    label_directions,
    label_kernel,
    output_gradients,
    relative_change,
    tangent_kernel,
)
from .persample import DEFAULT_MAX_MEMORY, METHODS, PerSampleGradients, per_sample_gradients
from .similarity import cosines, layer_grams, magnitude_similarity, pcgrad_shift, projection_shares

__all__ = [
    # per-example gradients
    "DEFAULT_MAX_MEMORY",
    "METHODS",
    "PerSampleGradients",
    "per_sample_gradients",
    # groups, tasks, micro-batches
    "GroupGradients",
    "group_gradients",
    "microbatch_gradients",
    "task_gradients",
    # pairwise geometry
    "cosines",
    "layer_grams",
    "magnitude_similarity",
    "pcgrad_shift",
    "projection_shares",
    # noise scale
    "NoiseScale",
    "layer_sq_norms",
    "microbatch_noise",
    "noise_scale",
    "per_sample_noise",
    # the empirical neural tangent kernel
    "centered_alignment",
    "label_directions",
    "label_kernel",
    "output_gradients",
    "relative_change",
    "tangent_kernel",
]
