"""Flat ``[P]`` vectors <-> named parameter dicts, the currency of the curvature core."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
