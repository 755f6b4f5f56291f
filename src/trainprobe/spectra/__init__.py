"""Singular-value maths on weight and gradient matrices: pure torch functions on tensors.

No models, no hooks, no state (DESIGN.md rule 1): a parameter or gradient becomes a
matrix with :func:`as_matrix`; :func:`spectrum` gives its singular values (exact when
small, randomized when large); :func:`stable_rank`, :func:`effective_rank` and
:func:`energy_fraction` summarise them; :func:`spectral_norm` tracks ``σ_1`` by
warm-started power iteration; :func:`ema_update_` and :func:`slow_ratio` split a
gradient sequence into slow and fast parts. Randomness only from an explicit
``torch.Generator``.
"""

from .matrix import GATES, as_matrix, gate_blocks, is_matrix
from .power import SpectralNorm, spectral_norm
from .summary import effective_rank, energy_fraction, stable_rank
from .svd import EXACT_MAX, Spectrum, randomized_svdvals, spectrum
from .temporal import ema_update_, slow_ratio

__all__ = [
    # matrices
    "GATES",
    "as_matrix",
    "gate_blocks",
    "is_matrix",
    # singular values
    "EXACT_MAX",
    "Spectrum",
    "randomized_svdvals",
    "spectrum",
    # summaries
    "effective_rank",
    "energy_fraction",
    "stable_rank",
    # spectral norm
    "SpectralNorm",
    "spectral_norm",
    # slow gradients
    "ema_update_",
    "slow_ratio",
]
