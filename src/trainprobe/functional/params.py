"""Which parameters a function is taken in, and flat ``[P]`` vectors <-> named
parameter dicts, the currency of the curvature and gradient cores."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ParamSelection = None | str | Iterable[str] | nn.Module
"""All trainable parameters (None), a regex on names, explicit names, or a submodule."""


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of parameters laid end to end in a ``[P]`` vector.

    Attributes:
        names: parameter names in vector order.
        shapes: their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> ParamLayout:
        """The layout of ``params`` in their iteration order."""
        if not params:
            raise ValueError("ParamLayout.of(params): got no parameters; pass a non-empty dict")
        return cls(tuple(params), tuple(p.shape for p in params.values()))

    @classmethod
    def trainable(cls, model: nn.Module) -> ParamLayout:
        """The layout of ``model``'s parameters with ``requires_grad``."""
        return cls.of({n: p for n, p in model.named_parameters() if p.requires_grad})

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        """``P``, the total number of entries."""
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``tensors`` (same names and shapes as the layout) into ``[P]``."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(
                f"flatten: missing tensors for {missing}; pass every name of the layout"
            )
        for name, shape in zip(self.names, self.shapes, strict=True):
            if tensors[name].shape != shape:
                raise ValueError(
                    f"flatten: {name} has shape {tuple(tensors[name].shape)}, "
                    f"the layout expects {tuple(shape)}"
                )
        return torch.cat([tensors[n].reshape(-1) for n in self.names])  # [P]

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a ``[P]`` vector into views shaped like the parameters."""
        if vector.ndim != 1 or vector.shape[0] != self.size:
            raise ValueError(
                f"unflatten: expected a vector of shape [{self.size}], got {tuple(vector.shape)}"
            )
        chunks = torch.split(vector, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}


def select_params(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` the curvature is taken in, by name, in model order.

    Args:
        model: the module.
        params: None (every parameter with ``requires_grad``), a regular expression
            matched with ``re.search`` against names, an iterable of names, or a
            submodule of ``model`` (its parameters).

    Raises:
        ValueError: nothing selected, an unknown name, a module not inside ``model``, or
            a frozen (``requires_grad=False``) parameter named explicitly.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        what = "model has no parameter with requires_grad=True; unfreeze some"
    elif isinstance(params, str):
        pattern = re.compile(params)
        chosen = [n for n in named if pattern.search(n) and named[n].requires_grad]
        what = f"no trainable parameter name matches {params!r}; names are {list(named)[:8]}"
    elif isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = [n for n, p in named.items() if id(p) in ids and p.requires_grad]
        what = "the module passed as params has no trainable parameter of this model"
    else:
        chosen = list(params)
        unknown = [n for n in chosen if n not in named]
        if unknown:
            raise ValueError(f"params: unknown names {unknown}; names are {list(named)[:8]}")
        what = "params is empty; pass parameter names, a regex, a module or None"
    if not chosen:
        raise ValueError(what)
    frozen = [n for n in chosen if not named[n].requires_grad]
    if frozen:
        raise ValueError(
            f"params {frozen} are frozen (requires_grad=False), so training never moves "
            "them; leave them out of params= or set requires_grad=True"
        )
    order = set(chosen)
    return {n: p for n, p in named.items() if n in order}
