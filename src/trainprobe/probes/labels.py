"""Scores per example from a model's outputs and labels: the outputs as ``[n, C]``
(:func:`class_outputs`), a one-vs-rest readout of them (:func:`one_vs_rest`) and ``±1``
labels (:func:`signed_labels`)."""

from __future__ import annotations

import torch
from torch import Tensor


def class_outputs(outputs: Tensor, size: int, owner: str) -> Tensor:
    """A model's outputs as ``[n, C]`` (a ``[n]`` output is ``C = 1``)."""
    if not isinstance(outputs, Tensor) or outputs.ndim == 0 or outputs.shape[0] != size:
        raise ValueError(
            f"{owner}: the model must return a tensor [n, C] (or [n]) for n = {size} "
            f"examples, got {type(outputs).__name__} {tuple(getattr(outputs, 'shape', ()))}"
        )
    return outputs.reshape(size, -1)


def one_vs_rest(classes: int, positive: int) -> Tensor:
    """``v`` ``[C]`` float64 with ``vᵀz = z_c − mean_{c'≠c} z_c'`` (``[1]`` for ``C = 1``)."""
    if classes == 1:
        return torch.ones(1, dtype=torch.float64)
    if not 0 <= positive < classes:
        raise ValueError(
            f"positive_class={positive} is not one of the model's {classes} classes; "
            f"pass an index in [0, {classes - 1}]"
        )
    v = torch.full((classes,), -1.0 / (classes - 1), dtype=torch.float64)
    v[positive] = 1.0
    return v


def signed_labels(targets: Tensor, positive: int) -> Tensor:
    """``+1`` where ``targets == positive``, else ``−1``, ``[n]`` float64."""
    flat = targets.reshape(targets.shape[0], -1)
    if flat.shape[1] != 1:
        raise ValueError(
            f"one label per example expected, got targets of shape {tuple(targets.shape)}"
        )
    return torch.where(flat[:, 0] == positive, 1.0, -1.0).double()
