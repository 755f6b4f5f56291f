"""Pure torch.func maths on flat ``[P]`` vectors and operators (no hooks, no state)."""

from .lanczos import Eigenpairs, lanczos
from .operator import MatmatOperator, Operator, as_matmat, as_matvec
from .params import ParamLayout

__all__ = [
    "Eigenpairs",
    "MatmatOperator",
    "Operator",
    "ParamLayout",
    "as_matmat",
    "as_matvec",
    "lanczos",
]
