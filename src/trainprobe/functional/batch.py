"""A batch seen as examples: which leaves split along dim 0, and how many examples.

:class:`SplitBatch` views an arbitrary batch (a tensor, tuple, dict, ...) as ``B``
examples: tensor leaves whose leading size is ``B`` are split along dim 0, every other
leaf (numbers, strings, 0-d tensors, tensors of another leading size) goes whole to
every sub-batch. :func:`default_batch_size` is that ``B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten


def default_batch_size(batch: Any) -> int:
    """Leading size of the first tensor in ``batch`` (the number of examples)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return int(leaf.shape[0])
    raise ValueError(
        "cannot tell the batch size: the batch holds no tensor with a leading dimension; "
        "pass batch_size=lambda batch: <number of examples>"
    )


@dataclass(frozen=True)
class SplitBatch:
    """A batch seen as ``size`` examples (see the module doc).

    Attributes:
        size: ``B``, the leading size of the first tensor leaf with a dimension.
        leaves: the batch's leaves (``torch.utils._pytree`` order).
        spec: its tree structure.
        split: indices of the leaves split along dim 0.
    """

    size: int
    leaves: tuple[Any, ...]
    spec: TreeSpec
    split: tuple[int, ...]

    @classmethod
    def of(cls, batch: Any) -> SplitBatch:
        leaves, spec = tree_flatten(batch)
        sized = [t for t in leaves if isinstance(t, Tensor) and t.ndim > 0]
        if not sized:
            raise ValueError(
                "cannot tell the examples apart: the batch holds no tensor with a leading "
                "(batch) dimension; pass inputs as tensors of shape [B, ...]"
            )
        size = int(sized[0].shape[0])
        if size < 1:
            raise ValueError("the batch is empty (leading size 0); pass at least one example")
        split = tuple(
            i
            for i, t in enumerate(leaves)
            if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == size
        )
        return cls(size, tuple(leaves), spec, split)

    def rows(self, index: slice | Tensor) -> list[Tensor]:
        """The split leaves at ``index`` (a slice or a ``[n]`` index tensor), in order."""
        if isinstance(index, slice):
            return [self.leaves[i][index] for i in self.split]
        return [self.leaves[i][index.to(self.leaves[i].device)] for i in self.split]

    def rebuild(self, rows: Sequence[Tensor]) -> Any:
        """The batch with the split leaves replaced by ``rows`` (same order as ``split``)."""
        leaves = list(self.leaves)
        for i, row in zip(self.split, rows, strict=True):
            leaves[i] = row
        return tree_unflatten(leaves, self.spec)

    def take(self, index: slice | Tensor) -> Any:
        """The sub-batch of the examples at ``index``."""
        return self.rebuild(self.rows(index))
