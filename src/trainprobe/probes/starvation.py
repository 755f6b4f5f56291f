"""Gradient starvation (Pezeshki et al. 2021, "Gradient Starvation: A Learning Proclivity in
Neural Networks"): a predictive feature the network never learns because another one
already drives the cross-entropy loss to zero.

Why these signals and not the loss: once the easy feature separates the training set, the
loss is saturated and per-example gradients are tiny, but that is as true of a healthy
run that has learned every feature, so neither separates starved from healthy runs. What
does is *how the fit is shared*: between input feature groups (:class:`FeatureAttribution`)
and between the label-carrying eigendirections of the initial NTK
(:class:`NTKResponse`): starvation leaves one predictive part of the input, or one
label-carrying direction, an order of magnitude behind the rest.

This module holds :class:`FeatureAttribution` and its input feature groups
(:data:`FeatureIndex`, :func:`check_features`, :func:`feature_groups`); :class:`NTKResponse`
lives in :mod:`.ntk_response`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import LossFn, Mode, as_scalar, check_mode
from ..keys import Key, is_name
from .base import ProbeOptions, StepContext, Value, step_source
from .batches import inputs_targets, observing
from .labels import class_outputs
from .schedules import Schedule, every

FeatureIndex = slice | Sequence[int] | Tensor
"""Positions in the flattened per-example input ``x[i].reshape(-1)``."""


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureAttribution(ProbeOptions):
    """How much of the output each input feature group carries, and what removing it costs.

    On a batch ``(x, y)`` (a fixed one via ``data=`` is best: then steps compare alike) of
    ``n`` examples with flattened inputs ``x_i ∈ R^d``, the score of example ``i`` is
    ``s_i = f(x_i)`` for a model with one output, else the centered true-class logit
    ``s_i = z_{y_i}(x_i) − mean_c z_c(x_i)`` (the part of ``z_y`` the softmax sees; for two
    classes half the margin). Gradient × input (Shrikumar et al. 2016; Ancona et al. 2018,
    "Towards better understanding of gradient-based attribution methods") per group ``g``:

        ``a_g = mean_i Σ_{j ∈ g} |∂s_i/∂x_ij · x_ij|``,   ``share_g = a_g / Σ_h a_h``.

    Ablation: every feature of ``g`` replaced by its batch mean, the rise in the loss
    ``L(x with g ablated, y) − L(x, y)`` (the probe's or the step's ``loss_fn``).

    Reading it (Pezeshki et al.'s starvation): a group known to predict the label whose
    share and ablation rise stay near 0 while another group's dominate is starved; a
    healthy run that uses both has both shares and both rises well above 0, however low
    its loss. Groups need not cover every feature; shares are over the groups given.

    Keys: see ``keys``.

    Args:
        features: ``{group: index}``, each index a slice, a list of positions, an integer
            tensor or a boolean mask into ``x_i.reshape(-1)``, group names lower_snake
            (``{"easy": slice(0, 1), "hard": [1]}``). Default: at most 8 contiguous
            chunks named ``f<first>`` (one feature) or ``f<first>_<last>``.
        schedule: when to measure (default every 50 steps; a measurement is one forward
            and backward to the inputs plus one forward per group).
        data: a fixed batch ``(x, y)`` (default: the step's ``batch=``).
        loss_fn: ``loss(model, (x, y))`` for the ablation (default: the step's).
        mode: ``"eval"`` (default) or ``"train"`` semantics (modes restored, RNG forked;
            under ``"train"`` BatchNorm mixes the examples' gradients).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "attribution"
    across_ranks = "own_data"
    own_data = "data"
    schedule: Schedule = every(50)
    keys = (
        Key("attribution/share/<group>", "share_g, summing to 1 over the groups"),
        Key(
            "attribution/ablation/<group>",
            "the loss rise when the group is set to its mean: how much the model relies on it",
        ),
    )

    features: Mapping[str, FeatureIndex] | None = None
    data: Any = field(default=None, repr=False)
    loss_fn: LossFn | None = field(default=None, repr=False)
    mode: Mode = "eval"
    # the input size and device the groups were checked for, their names and [m_g] indices
    _cache: tuple[tuple[int, torch.device], list[str], list[Tensor]] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features is not None:
            check_features(self.features)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError("FeatureAttribution: loss_fn must be callable loss(model, batch)")
        check_mode(self.mode)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        loss_fn, batch = step_source(ctx, "FeatureAttribution", self.loss_fn, self.data)
        x, y = inputs_targets(batch, "FeatureAttribution")
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
            raise ValueError(
                "FeatureAttribution needs floating-point inputs x of shape [n, ...], got "
                f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
            )
        names, groups = self._groups(x[0].numel(), x.device)
        with observing(ctx.model, self.mode) as model:
            shares = _shares(model, x, y, groups)  # [G]
            rises = _ablation(model, loss_fn, x, y, groups)  # [G]
        out: dict[str, Value] = {}
        for g, name in enumerate(names):
            out[f"{self.name}/share/{name}"] = shares[g]
            out[f"{self.name}/ablation/{name}"] = rises[g]
        return out

    def _groups(self, dim: int, device: torch.device) -> tuple[list[str], list[Tensor]]:
        """Names and ``[m_g]`` indices, checked once per input size (the check syncs)."""
        if self._cache is None or self._cache[0] != (dim, device):
            self._keep(_cache=((dim, device), *feature_groups(self.features, dim, device)))
        return self._cache[1], self._cache[2]  # type: ignore[index]


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


def _scores(outputs: Tensor, targets: Tensor) -> Tensor:
    """``s`` ``[n]``: the output, or the centered true-class logit (class doc)."""
    if outputs.shape[1] == 1:
        return outputs[:, 0]
    if targets.is_floating_point() or targets.reshape(-1).shape[0] != outputs.shape[0]:
        raise ValueError(
            f"FeatureAttribution: a model with {outputs.shape[1]} outputs needs one integer "
            f"class label per example, got targets {tuple(targets.shape)} {targets.dtype}"
        )
    true = outputs.gather(1, targets.reshape(-1, 1))[:, 0]  # [n]
    return true - outputs.mean(dim=1)


def _shares(model: nn.Module, x: Tensor, y: Tensor, groups: list[Tensor]) -> Tensor:
    """``share_g`` ``[G]`` from gradient × input (class doc); ``.grad`` is never written."""
    n = x.shape[0]
    leaf = x.detach().clone().requires_grad_(True)  # [n, ...]
    with torch.enable_grad():
        scores = _scores(class_outputs(model(leaf), n, "FeatureAttribution"), y)  # [n]
        (grad,) = torch.autograd.grad(scores.sum(), leaf)  # examples independent: row i = ∇s_i
    contrib = (grad * leaf.detach()).abs().reshape(n, -1)  # [n, d]
    per_group = torch.stack([contrib[:, idx].sum(dim=1).mean() for idx in groups])  # [G]
    return per_group / per_group.sum()


def _ablation(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, groups: list[Tensor]
) -> Tensor:
    """Loss rises ``[G]`` with each group set to its batch mean."""
    flat = x.detach().reshape(x.shape[0], -1)  # [n, d]
    means = flat.mean(dim=0)  # [d]
    with torch.no_grad():
        clean = as_scalar(loss_fn(model, (x, y)), "the loss closure")
        rises = []
        for idx in groups:
            ablated = flat.clone()
            ablated[:, idx] = means[idx]
            loss = as_scalar(loss_fn(model, (ablated.reshape(x.shape), y)), "the loss closure")
            rises.append(loss - clean)
    return torch.stack(rises)  # [G]
