"""Pure torch.func maths on flat ``[P]`` vectors and operators (no hooks, no state)."""

from ..functional import LossFn, ParamLayout, criterion_loss, select_params
from .blocks import block_lanczos, diagonal_block_eigenpairs
from .density import SpectralDensity, spectral_density
from .fd import FiniteDifferenceError
from .hvp import ENGINES, HessianOperator, hessian_operator
from .lanczos import Eigenpairs, lanczos
from .operator import MatmatOperator, Operator, as_matmat, as_matvec
from .power import power_iteration
from .trace import TraceEstimate, diagonal, hutch_plus_plus, hutchinson, trace

__all__ = [
    # operators
    "ENGINES",
    "FiniteDifferenceError",
    "HessianOperator",
    "LossFn",
    "MatmatOperator",
    "Operator",
    "ParamLayout",
    "as_matmat",
    "as_matvec",
    "criterion_loss",
    "hessian_operator",
    "select_params",
    # eigenpairs
    "Eigenpairs",
    "block_lanczos",
    "diagonal_block_eigenpairs",
    "lanczos",
    "power_iteration",
    # trace and density
    "SpectralDensity",
    "TraceEstimate",
    "diagonal",
    "hutch_plus_plus",
    "hutchinson",
    "spectral_density",
    "trace",
]
