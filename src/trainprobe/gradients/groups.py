"""Gradients of groups of a batch: ``[G, P]`` one mean gradient per group.

Three ways to form groups, each on a fresh functional forward (``.grad`` and the user's
autograd graph are never touched, see :class:`trainprobe.functional.Objective`):

- :func:`group_gradients`: per-example integer ids (class labels, user ids: data
  source, domain). Group ``g`` is the set ``S_g`` of examples with id ``g``, ``n_g =
  |S_g|``, its loss ``L_g`` the loss on the sub-batch ``S_g`` and ``g_g = ∇L_g``.
  ``method="subset"`` (default) runs one forward and backward per group on its
  sub-batch: together they process each example once (the cost of one batch gradient
  plus ``G`` call overheads), hold only ``[G, P]``, and are exact for any loss, also one
  that does not decompose over examples. ``method="persample"`` accumulates per-example
  gradients (:mod:`.persample`), chunk by chunk, into the group sums: one vmapped pass
  whatever ``G``, better for many small groups (hundreds of user ids), and equal to
  ``"subset"`` for a loss that is a mean of per-example terms (where vmap cannot batch
  the model it falls back, with a warning, to one backward per example).
- :func:`task_gradients`: a loss returning ``{task: scalar}``; one forward, one
  ``torch.autograd.grad(..., retain_graph=True)`` per task.
- :func:`microbatch_gradients`: ``m`` consecutive micro-batches (sizes as
  ``torch.tensor_split``: they differ by at most one).

For a mean-reduced loss the groups of a partition reassemble the batch:
``L = Σ_g (n_g / N) L_g`` and ``∇L = Σ_g (n_g / N) g_g``; for tasks the objective is the
plain sum ``Σ_t L_t``. :attr:`GroupGradients.weights` holds these ``w_g``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..functional import (
    Objective,
    ParamLayout,
    SplitBatch,
    as_scalar,
    check_objective,
)
from .persample import for_each_chunk

GroupMethod = Literal["subset", "persample"]


@dataclass(frozen=True)
class GroupGradients:
    """One mean gradient, loss and count per group.

    Attributes:
        ids: group ids in row order: ascending integer ids (class label, user id,
            micro-batch index) or task names in sorted order.
        grads: ``[G, P]`` ``g_g = ∇L_g``, each group's mean gradient.
        losses: ``[G]`` ``L_g``, each group's (mean) loss.
        counts: ``[G]`` ``n_g`` examples per group (for tasks: the batch size).
        weights: ``[G]`` ``w_g`` of the batch objective ``Σ_g w_g L_g``: ``n_g / N`` for a
            partition of a mean-reduced loss, 1 for tasks.
        layout: the parameters of the columns.
    """

    ids: tuple[int | str, ...]
    grads: Tensor
    losses: Tensor
    counts: Tensor
    weights: Tensor
    layout: ParamLayout

    @property
    def contributions(self) -> Tensor:
        """``[G, P]`` ``w_g g_g``: each group's part of the batch gradient."""
        return self.weights[:, None].to(self.grads.dtype) * self.grads

    @property
    def total(self) -> Tensor:
        """``[P]`` ``Σ_g w_g g_g``: the batch gradient."""
        return self.contributions.sum(dim=0)


def group_gradients(
    objective: Objective,
    batch: Any,
    ids: Tensor,
    *,
    method: GroupMethod = "subset",
    max_memory: int | None = None,
) -> GroupGradients:
    """Mean gradient of each group of examples sharing an id (see the module doc).

    Args:
        objective: the loss as a function of the selected parameters
            (:class:`trainprobe.functional.Objective`), mean-reduced over the examples;
            under ``mode="train"`` BatchNorm normalises each sub-batch by its own
            statistics with ``"subset"`` (``"persample"`` refuses).
        batch: anything the loss closure takes; tensors of leading size ``B`` are split.
        ids: ``[B]`` integer group id of each example.
        method: ``"subset"`` (default) or ``"persample"``.
        max_memory: bytes per per-example chunk with ``"persample"`` (see
            :func:`~.persample.per_sample_gradients`).

    Raises:
        ValueError: ``ids`` is not ``[B]`` integers, an unknown method, a bad loss.
    """
    if method not in ("subset", "persample"):
        raise ValueError(f"method must be 'subset' or 'persample', got {method!r}")
    fl = check_objective(objective)
    split = SplitBatch.of(batch)
    _check_ids(ids, split.size)
    unique = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
    labels, inverse, counts = unique  # [G], [B], [G]
    ids_host = tuple(int(i) for i in labels.tolist())  # deliberate sync: [G] ids name groups
    if method == "persample":
        grads, losses = _by_examples(fl, split, inverse, len(labels), max_memory)
    else:
        order = torch.argsort(inverse, stable=True)  # [B] examples grouped, in batch order
        members = torch.split(order, counts.tolist())  # deliberate sync: [G] group sizes
        grads, losses = _by_subsets(fl, split, members)
    counts = counts.to(fl.device)
    weights = counts.to(torch.float64) / split.size
    return GroupGradients(ids_host, grads, losses, counts, weights, fl.layout)


def _check_ids(ids: object, size: int) -> None:
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(
            f"ids must be an integer tensor [B] (one group id per example), got "
            f"{type(ids).__name__} {getattr(ids, 'dtype', '')}"
        )
    if ids.shape != (size,):
        raise ValueError(
            f"ids has shape {tuple(ids.shape)} but the batch has {size} examples; "
            f"pass one id per example, shape [{size}]"
        )


def _by_subsets(
    fl: Objective, split: SplitBatch, members: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """One forward and backward per group on its own sub-batch: ``[G, P]``, ``[G]``."""
    rows, losses = [], []
    with fl.scope(), torch.enable_grad():
        for index in members:  # [n_g] example indices of one group
            w = fl.leaves()
            value = fl(w, split.take(index))
            rows.append(fl.flat_grad(value, w))  # [P]
            losses.append(value.detach())
    return torch.stack(rows), torch.stack(losses)


def _by_examples(
    fl: Objective, split: SplitBatch, inverse: Tensor, groups: int, max_memory: int | None
) -> tuple[Tensor, Tensor]:
    """Per-example gradients summed into their groups, chunk by chunk: ``[G, P]``, ``[G]``."""
    sums = torch.zeros(groups, fl.layout.size, dtype=fl.dtype, device=fl.device)  # [G, P]
    loss_sums = torch.zeros(groups, dtype=fl.dtype, device=fl.device)  # [G]
    inverse = inverse.to(fl.device)

    def add(start: int, grads: Tensor, values: Tensor) -> None:
        where = inverse[start : start + grads.shape[0]]  # [c]
        sums.index_add_(0, where, grads)
        loss_sums.index_add_(0, where, values)

    for_each_chunk(fl, split, add, method="auto", chunk_size=None, max_memory=max_memory)
    counts = torch.bincount(inverse, minlength=groups).to(fl.dtype)  # [G]
    return sums / counts[:, None], loss_sums / counts


def microbatch_gradients(objective: Objective, batch: Any, microbatches: int) -> GroupGradients:
    """Mean gradient of each of ``microbatches`` consecutive chunks of the batch.

    The ids are the chunk indices ``0 .. m-1``; chunk ``k`` holds ``⌈B/m⌉`` examples for
    ``k < B mod m`` and ``⌊B/m⌋`` after (``torch.tensor_split``). One forward and backward
    per chunk (:func:`group_gradients` with ``method="subset"``).

    Raises:
        ValueError: ``microbatches`` is not an integer in ``[1, B]``.
    """
    size = SplitBatch.of(batch).size
    if (
        isinstance(microbatches, bool)
        or not isinstance(microbatches, int)
        or not (1 <= microbatches <= size)
    ):
        raise ValueError(
            f"microbatches must be an integer between 1 and the batch size {size}, "
            f"got {microbatches!r}"
        )
    sizes = [size // microbatches + (k < size % microbatches) for k in range(microbatches)]
    ids = torch.repeat_interleave(torch.arange(microbatches), torch.tensor(sizes))  # [B]
    return group_gradients(objective, batch, ids)


def task_gradients(objective: Objective, batch: Any) -> GroupGradients:
    """One gradient per task of a multi-task loss, from a single forward pass.

    Args:
        objective: an :class:`trainprobe.functional.Objective` whose loss closure
            returns ``{task: scalar}``, e.g. ``{"depth": l1(...), "segmentation":
            ce(...)}``; the objective is taken to be ``Σ_t L_t``: to study a weighted
            sum, put the weights into the values.
        batch: as for :func:`group_gradients`.

    Raises:
        TypeError: ``loss_fn`` does not return a mapping of string names.
        ValueError: an empty mapping or a non-scalar task loss.
    """
    fl = check_objective(objective)
    with fl.scope(), torch.enable_grad():
        w = fl.leaves()
        tasks = _check_tasks(fl.raw(w, batch))
        names = sorted(tasks)
        rows = [fl.flat_grad(tasks[t], w, retain=i + 1 < len(names)) for i, t in enumerate(names)]
    losses = torch.stack([tasks[t].detach().to(fl.dtype) for t in names])  # [G]
    size = SplitBatch.of(batch).size
    counts = torch.full((len(names),), size, device=fl.device)
    weights = torch.ones(len(names), dtype=torch.float64, device=fl.device)
    return GroupGradients(tuple(names), torch.stack(rows), losses, counts, weights, fl.layout)


def _check_tasks(value: object) -> dict[str, Tensor]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(
            "task gradients need loss_fn(model, batch) to return a dict {task name: scalar "
            f"loss}}, got {type(value).__name__}; return e.g. {{'depth': l1, 'seg': ce}}"
        )
    if not value:
        raise ValueError("the task loss returned an empty dict; return at least one task")
    return {name: as_scalar(v, f"task {name!r}") for name, v in value.items()}
