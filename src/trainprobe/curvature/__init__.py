"""Pure torch.func maths on flat ``[P]`` vectors and operators (no hooks, no state)."""

from .params import ParamLayout

__all__ = ["ParamLayout"]
