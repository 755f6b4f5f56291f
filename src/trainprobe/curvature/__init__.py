"""Pure torch.func maths on flat ``[P]`` vectors and operators (no hooks, no state)."""

from .lanczos import Eigenpairs, lanczos
from .params import ParamLayout

__all__ = ["Eigenpairs", "ParamLayout", "lanczos"]
