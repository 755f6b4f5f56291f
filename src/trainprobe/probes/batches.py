"""The batches the supervised probes read: ``(inputs, targets)`` pairs
(:func:`inputs_targets`), a subset of examples frozen for probes that compare measurements
(:class:`FixedSubset`), and forward passes that change nothing (:func:`observing`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..functional import Mode, SplitBatch, model_device, rng_fork, semantics, unwrap


def inputs_targets(batch: Any, owner: str) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of a batch, or a ``ValueError`` that names ``owner``."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[1], Tensor)):
        raise ValueError(
            f"{owner} needs batches (inputs, targets) with targets a tensor, got "
            f"{type(batch).__name__}; pass data=(x, y)"
        )
    return batch[0], batch[1]


class FixedSubset:
    """The first ``size`` examples of ``data``, or of the first measured step's batch
    (frozen then: later steps' batches are ignored), as detached copies."""

    def __init__(self, data: Any, size: int, owner: str) -> None:
        self.size, self.owner, self.given = size, owner, data is not None
        self._batch = None if data is None else self._take(data)

    def _take(self, batch: Any) -> tuple[Any, Tensor]:
        inputs_targets(batch, self.owner)
        head = SplitBatch.of(tuple(batch)).take(slice(0, self.size))
        return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, head)

    def get(self, step_batch: Any) -> tuple[Any, Tensor]:
        """The subset, frozen from ``step_batch`` at the first call when no data was given."""
        if self._batch is None:
            if step_batch is None:
                raise ValueError(
                    f"{self.owner} needs data: pass data=(x, y) to the probe (a fixed subset), "
                    "or batch= to mon.step()"
                )
            self._batch = self._take(step_batch)
        return self._batch

    def reset(self) -> None:
        """Forget a subset frozen from a step batch (a given ``data`` is kept)."""
        if not self.given:
            self._batch = None


@contextmanager
def observing(model: nn.Module, mode: Mode) -> Iterator[nn.Module]:
    """Forward passes under ``mode`` semantics (modes restored), with the global RNG forked;
    yields the module to call: the eager one inside a ``torch.compile`` wrapper, so that a
    probe's other batch shapes never recompile (or re-specialise) the training graph."""
    with ExitStack() as stack:
        stack.enter_context(rng_fork(model_device(model)))
        stack.enter_context(semantics(model, mode))
        yield unwrap(model)
