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

from ..functional import LossFn, ParamSelection, as_scalar, check_mode, network
from ..gradients import METHODS
from ..gradients.ntk import label_directions, tangent_kernel
from ..keys import Key
from ._supervised import (
    FeatureIndex,
    FixedSubset,
    check_count,
    check_features,
    class_outputs,
    feature_groups,
    inputs_targets,
    observing,
    one_vs_rest,
    signed_labels,
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
        return {"features": groups, "mode": self.mode,
                "data": "fixed batch" if self.data is not None else "step batch"}  # fmt: skip


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


class NTKResponse:
    """The network's output along the label-carrying eigendirections of its initial NTK,
    relative to the labels (Pezeshki et al. 2021, Figure 2).

    Scalar output and ``±1`` labels: ``f(x) = z(x)`` for one output; for ``C >= 2`` outputs
    one-vs-rest on ``positive_class`` ``c``: ``f = z_c − mean_{c'≠c} z_c'`` (``z_1 − z_0``
    for two classes) and ``y_i = +1`` iff the label is ``c`` (labels ``{0, 1}`` or
    ``{−1, +1}`` for one output: ``+1`` iff the label equals ``positive_class``).

    At the first measurement (at initialisation when the schedule includes step 0), on a
    fixed subset ``X`` of ``n`` examples: ``K_0 = J Jᵀ`` ``[n, n]`` from the per-example
    gradients of ``f``, eigenpairs ``(λ_k, u_k)`` in decreasing ``λ``, and the label energy
    ``e_k = (u_kᵀy)² / ‖y‖²`` (``Σ_k e_k = 1``). The recorded directions ``D`` are the
    first ``directions`` in that order with ``e_k >= min_label_energy`` (numerically null
    ones, ``λ_k < 1e-6 λ_0``, skipped). At every measurement, with ``f(X)`` ``[n]``:

        ``r_k = u_kᵀ f(X) / u_kᵀ y``      (unchanged by the sign of ``u_k``).

    Under squared loss a kernel fit drives every ``r_k`` to 1. Under cross-entropy the
    strong directions overshoot (``r_k`` grows with the margins) and, in the linearised
    analysis of Pezeshki et al., their growth suppresses the rest: a label-carrying
    direction whose ``r_k`` stays an order of magnitude below the others is starved.

    Keys: see ``keys``. At initialisation the ``r_k`` are noise (``f`` has not learned
    yet): read ``min_ratio`` once the labels are fitted.

    State: the subset, ``u_k`` and ``u_kᵀy`` for ``k ∈ D``; :meth:`reset` forgets them.

    Args:
        schedule: when to measure (default every 10 steps; the first measurement costs one
            per-example-gradient pass and an ``n × n`` eigendecomposition, later ones a
            forward pass).
        data: a fixed batch ``(x, y)``; its first ``max_examples`` examples are the subset.
            Default: the first measured step's ``batch=``, frozen.
        directions: the most directions recorded.
        min_label_energy: ``e_k`` a direction needs to count as label-carrying.
        positive_class: the class ``c`` treated as ``+1``.
        max_examples: ``n``, at most 256.
        params, mode, method, max_memory: of the per-example gradients (see
            :func:`trainprobe.gradients.per_sample_gradients`); ``mode`` also sets the
            semantics of the forward passes.
    """

    name = "ntk_response"
    keys = (
        Key("ntk_response/dir_<k>", "r of the k-th direction of D"),
        Key("ntk_response/min_ratio",
            "min_k r_k / max_k r_k (NaN while max_k r_k <= 0); near 0, or negative: starvation"),
    )
    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        schedule: Schedule | None = None,
        name: str | None = None,
        data: Any = None,
        directions: int = 4,
        min_label_energy: float = 0.02,
        positive_class: int = 1,
        max_examples: int = 256,
        params: ParamSelection = None,
        mode: str = "eval",
        method: str = "auto",
        max_memory: int | None = None,
    ) -> None:
        self.schedule = every(10) if schedule is None else schedule
        check_schedule(self.schedule, "NTKResponse")
        self.name = probe_name(self, name)
        self.directions = check_count("NTKResponse", "directions", directions, 1)
        if not 0 < min_label_energy <= 1:
            raise ValueError(
                f"NTKResponse: min_label_energy must be in (0, 1], got {min_label_energy!r}"
            )
        if method not in METHODS:
            raise ValueError(f"NTKResponse: method must be one of {METHODS}, got {method!r}")
        self.min_label_energy, self.positive_class = min_label_energy, positive_class
        self.max_examples = check_count("NTKResponse", "max_examples", max_examples, 2, 256)
        self.params, self.mode, self.method = params, check_mode(mode), method
        self.max_memory = max_memory
        self._subset = FixedSubset(data, max_examples, "NTKResponse")
        self._basis: tuple[Tensor, Tensor] | None = None  # [n, k] u_k, [k] u_kᵀy

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        x, y = self._subset.get(ctx.batch)
        with observing(ctx.model, self.mode) as model, torch.no_grad():
            outputs = class_outputs(model(x), y.shape[0], "NTKResponse")  # [n, C]
        v = one_vs_rest(outputs.shape[1], self.positive_class)  # [C]
        if self._basis is None:
            self._basis = self._directions(ctx.model, x, signed_labels(y, self.positive_class), v)
        basis, label_proj = self._basis
        f = outputs.double() @ v.to(outputs.device)  # [n]
        ratios = (basis.T @ f) / label_proj  # [k]
        top = ratios.max()
        out: dict[str, Value] = {f"{self.name}/dir_{k}": r for k, r in enumerate(ratios)}
        out[f"{self.name}/min_ratio"] = torch.where(top > 0, ratios.min() / top, torch.nan)
        return out

    def _directions(self, model: nn.Module, x: Any, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``u_k`` ``[n, k]`` and ``u_kᵀy`` ``[k]`` of the label-carrying directions ``D``."""
        outputs = network(model, params=self.params, mode=self.mode)
        kernel, used = tangent_kernel(outputs, x, v[:, None], method=self.method,
                                      max_memory=self.max_memory)  # fmt: skip
        self.method = "loop" if used == "loop" else self.method
        found = label_directions(kernel, y, count=self.directions,
                                 min_energy=self.min_label_energy)  # fmt: skip
        if found is None:
            raise ValueError(
                f"NTKResponse: no eigendirection of the initial NTK carries >= "
                f"{self.min_label_energy} of the label energy; lower min_label_energy"
            )
        return found

    def reset(self) -> None:
        """Forget the directions (and a subset frozen from a step batch)."""
        self._basis = None
        self._subset.reset()

    def settings(self) -> dict[str, Any]:
        return {
            "data": "fixed batch" if self._subset.given else "first step batch",
            "directions": self.directions, "min_label_energy": self.min_label_energy,
            "positive_class": self.positive_class, "max_examples": self.max_examples,
            "mode": self.mode, "method": self.method, "max_memory": self.max_memory,
            "params": self.params if isinstance(self.params, str | None) else repr(self.params),
        }  # fmt: skip
