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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..functional import LossFn, as_scalar, check_mode
from ..keys import Key
from ._supervised import (
    FeatureIndex,
    check_features,
    class_outputs,
    feature_groups,
    inputs_targets,
    observing,
)
from .base import StepContext, Value, probe_name, step_source
from .schedules import Schedule, check_schedule, every


class FeatureAttribution:
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
    """

    name = "attribution"
    keys = (
        Key("attribution/share/<group>", "share_g, summing to 1 over the groups"),
        Key("attribution/ablation/<group>", "the loss rise when the group is set to its mean"),
    )
    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        features: Mapping[str, FeatureIndex] | None = None,
        *,
        schedule: Schedule | None = None,
        name: str | None = None,
        data: Any = None,
        loss_fn: LossFn | None = None,
        mode: str = "eval",
    ) -> None:
        self.schedule = every(50) if schedule is None else schedule
        check_schedule(self.schedule, "FeatureAttribution")
        self.name = probe_name(self, name)
        if features is not None:
            check_features(features)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("FeatureAttribution: loss_fn must be callable loss(model, batch)")
        self.features, self.data, self.loss_fn = features, data, loss_fn
        self.mode = check_mode(mode)
        self._cache: tuple[tuple[int, torch.device], list[str], list[Tensor]] | None = None

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

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
            self._cache = ((dim, device), *feature_groups(self.features, dim, device))
        return self._cache[1], self._cache[2]

    def settings(self) -> dict[str, Any]:
        groups = None if self.features is None else {k: repr(v) for k, v in self.features.items()}
        return {
            "features": groups,
            "mode": self.mode,
            "data": "fixed batch" if self.data is not None else "step batch",
        }


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
