"""What the supervised probes share: batches ``(inputs, targets)``, a subset of examples
frozen for probes that compare measurements, scores per example from a model's outputs,
and forward passes that change nothing (:func:`observing`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..functional import Mode, SplitBatch, model_device, rng_fork, semantics, unwrap
from ..keys import is_name

FeatureIndex = slice | Sequence[int] | Tensor
"""Positions in the flattened per-example input ``x[i].reshape(-1)``."""


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


def check_count(owner: str, name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]``, else a ``ValueError``."""
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low
    if bad or (high is not None and value > high):  # type: ignore[operator]
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{owner}: {name} must be an integer {span}, got {value!r}")
    return value  # type: ignore[return-value]


def check_features(features: object) -> None:
    """A ``ValueError``/``TypeError`` unless ``features`` maps lower_snake names to indices."""
    if not isinstance(features, Mapping) or not features:
        raise TypeError(
            "FeatureAttribution: features must be a non-empty dict {group: index}, e.g. "
            f"{{'easy': slice(0, 1), 'hard': [1]}}, got {type(features).__name__}"
        )
    bad = [k for k in features if not is_name(k)]
    if bad:
        raise ValueError(
            f"FeatureAttribution: group names {bad} are not lower_snake; record keys need "
            "names like 'easy' or 'hard_1' (lowercase letters, digits, single '_')"
        )


def feature_groups(
    features: Mapping[str, FeatureIndex] | None, dim: int, device: torch.device
) -> tuple[list[str], list[Tensor]]:
    """Group names and ``[m_g]`` index tensors into the ``d = dim`` flattened features
    (default: at most 8 contiguous chunks, ``f<first>`` or ``f<first>_<last>``)."""
    if features is None:
        bounds = torch.linspace(0, dim, min(dim, 8) + 1).round().long().tolist()
        spans = list(itertools.pairwise(bounds))
        names = [f"f{a}" if b - a == 1 else f"f{a}_{b - 1}" for a, b in spans]
        return names, [torch.arange(a, b, device=device) for a, b in spans]
    positions = torch.arange(dim, device=device)  # [d]
    groups = []
    for name, index in features.items():
        mask = isinstance(index, slice) or (isinstance(index, Tensor) and index.dtype == torch.bool)
        chosen = positions[index] if mask else torch.as_tensor(index)  # type: ignore[index]
        chosen = chosen.to(device=device, dtype=torch.long).reshape(-1)  # [m_g]
        if chosen.numel() == 0 or chosen.min() < 0 or chosen.max() >= dim:
            raise ValueError(
                f"FeatureAttribution: group {name!r} selects no feature or one outside the "
                f"{dim} input features per example; index x[i].reshape(-1) in [0, {dim - 1}]"
            )
        groups.append(chosen)
    return list(features), groups


def named_values(values: Any, owner: str, prefix: str) -> dict[str, Tensor | float]:
    """``{prefix + name: value}`` from a user function's ``{name: float | 1-element tensor}``
    with lower_snake names, or a ``ValueError`` naming ``owner``."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{owner} must return a dict {{name: value}}, got {type(values).__name__}")
    out: dict[str, Tensor | float] = {}
    for key, value in values.items():
        if not is_name(key):
            raise ValueError(
                f"{owner} returned the name {key!r}; record keys need lower_snake names like "
                "'loss' or 'top5_acc'"
            )
        if isinstance(value, Tensor) and value.numel() == 1:
            out[prefix + key] = value.detach().reshape(())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[prefix + key] = float(value)
        else:
            raise ValueError(
                f"{owner}'s {key!r} must be a float or a one-element tensor, got "
                f"{type(value).__name__}"
            )
    return out
