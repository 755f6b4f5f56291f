"""Gradient conflict between tasks, classes, user-defined groups or micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..functional import Objective
from ..gradients import (
    GroupGradients,
    cosines,
    group_gradients,
    layer_grams,
    magnitude_similarity,
    microbatch_gradients,
    pcgrad_shift,
    projection_shares,
    task_gradients,
)
from ..keys import Key, is_name
from .base import PerLayer, StepContext, Value
from .schedules import Schedule, every
from .source import LossProbe

_BY = ("class", "task", "microbatch")


@dataclass(frozen=True, kw_only=True, eq=False)
class GradConflict(LossProbe):
    """Pairwise conflict and balance of group gradients (Yu et al. 2020, "Gradient Surgery
    for Multi-Task Learning"; per class: Francazi et al. 2023, "A Theoretical Analysis of
    the Learning Dynamics under Class Imbalance").

    Each group ``g`` of the batch has its mean gradient ``g_g = ∇L_g``, loss ``L_g``, size
    ``n_g`` and weight ``w_g`` in the batch objective ``L = Σ_g w_g L_g`` (``n_g / N`` for
    classes, ids and micro-batches of a mean-reduced loss; 1 for tasks), hence its
    contribution ``c_g = w_g g_g`` to the batch gradient ``C = Σ_g c_g`` (see
    :mod:`trainprobe.gradients.groups`). Group names: ``class_<label>``, ``group_<id>``,
    ``micro_<k>``, or the task's own lower_snake name; their numeric ids: the label, the
    id, ``k``, or the task's index in sorted name order.

    Keys: see ``keys`` (the pair keys with two groups or more, ``cos`` and ``gms`` only
    while ``G <= max_pair_groups``; ``layer_*`` with ``layers=True``). Cosines are NaN, and
    left out of the means, where a gradient is exactly zero.

    Args:
        by: ``"class"`` (default: batches ``(inputs, targets)`` with integer labels
            ``[B]``), ``"task"`` (the loss returns ``{task: scalar}``, one forward),
            ``"microbatch"`` (``microbatches`` consecutive chunks), or a callable
            ``batch -> [B]`` non-negative integer ids (data source, domain, user).
        microbatches: chunks for ``by="microbatch"``.
        method: ``"subset"`` (one backward per group) or ``"persample"`` (per-example
            gradients summed per group; for many small groups); see
            :func:`trainprobe.gradients.group_gradients`.
        layers: record the per-parameter cosines.
        max_pair_groups: record per-pair keys while there are at most this many groups
            (``G (G − 1) / 2`` keys each).
        schedule: when to measure (default every 10 steps; a measurement is ``G`` forward
            and backward passes on the groups' sub-batches: 23 ms, about two batch
            gradients, for 10 classes of a batch of 64 on a small CPU CNN, so 1.23x the
            training step every 10 steps; ``benchmarks/gradients.py``).
        max_memory: bytes per chunk of per-example gradients with ``method="persample"``.
        data, loss_fn, params, mode: where the loss is taken, see
            :class:`~.source.LossProbe`.
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "conflict"
    schedule: Schedule = every(10)
    across_ranks = "combined"  # on the step's batch: every rank's groups pooled
    keys = (
        Key("conflict/groups", "G, the groups in the batch"),
        Key("conflict/norm/<group>", "‖g_g‖, the norm of the group's mean gradient"),
        Key("conflict/loss/<group>", "L_g, the group's mean loss"),
        Key("conflict/count/<group>", "n_g, the group's examples (for tasks: the batch size)"),
        Key(
            "conflict/grad_share/<group>",
            "⟨c_g, C⟩ / ‖C‖², the part of the update the group pulls along its own "
            "direction: the shares sum to 1, negative marks a group the step works against",
        ),
        Key("conflict/loss_share/<group>", "w_g L_g / Σ_j w_j L_j"),
        Key("conflict/cos/<a>__<b>", "cos φ_ab of a pair of group gradients"),
        Key(
            "conflict/gms/<a>__<b>",
            "gradient magnitude similarity 2‖g_a‖‖g_b‖ / (‖g_a‖² + ‖g_b‖²) of a pair: near 0, one "
            "group's gradient dwarfs the other's",
        ),
        Key("conflict/mean_cos", "the mean cosine over pairs"),
        Key("conflict/min_cos", "the minimum cosine over pairs"),
        Key("conflict/min_pair_a", "the numeric id of one group of the most conflicting pair"),
        Key("conflict/min_pair_b", "the numeric id of the other group of that pair"),
        Key(
            "conflict/frac_negative",
            "the fraction of pairs with cos φ < 0, PCGrad's conflict criterion",
        ),
        Key("conflict/min_gms", "the minimum gradient magnitude similarity over pairs"),
        Key(
            "conflict/pcgrad_shift",
            "‖Σ c^PC − C‖ / ‖C‖, how far PCGrad's projections would move the update",
        ),
        Key(
            "conflict/applied_cos/<group>",
            "cos of the gradient handed to the optimizer (.grad) with g_g: negative, the step "
            "taken raises the group's loss to first order",
        ),
        Key(
            "conflict/applied_offset",
            "‖.grad − C‖ / ‖C‖, how far the gradient handed to the optimizer is from the "
            "plain batch gradient: 0 when the losses are summed, about pcgrad_shift when "
            "the update is PCGrad's",
        ),
        Key(
            "conflict/layer_cos/<param>",
            "mean pairwise cosine of the groups' gradients within one parameter tensor: where in "
            "the network they disagree",
        ),
        Key(
            "conflict/layer_min_cos/<param>",
            "worst pairwise cosine of the groups' gradients within one parameter tensor: where in "
            "the network they disagree most",
        ),
    )

    by: str | Callable[[Any], Tensor] = "class"
    microbatches: int = 4
    method: str = "subset"
    layers: bool = True
    max_pair_groups: int = 8
    max_memory: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (callable(self.by) or self.by in _BY):
            raise ValueError(
                f"GradConflict: by must be 'class', 'task', 'microbatch' or a callable "
                f"batch -> [B] integer ids, got {self.by!r}"
            )
        _check_int("microbatches", self.microbatches, 2)
        _check_int("max_pair_groups", self.max_pair_groups, 0)
        if self.method not in ("subset", "persample"):
            raise ValueError(
                f"GradConflict: method must be 'subset' or 'persample', got {self.method!r}"
            )

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        objective, batch = self.objective(ctx)
        groups = self._gradients(objective, batch)
        if ctx.ranks is not None and self.data is None:  # each rank holds its share
            groups = pooled_groups(groups, ctx.ranks, by=self.by)
        names, numbers = self._names(groups.ids)
        grams = layer_grams(groups.grads, groups.layout)  # [L, G, G]
        out = _group_values(self.name, groups, names, grams.sum(dim=0))
        if len(names) >= 2:
            out.update(self._pair_values(groups, names, numbers, grams))
            applied = _applied_gradient(ctx, groups)
            if applied is not None:
                out.update(_applied_values(self.name, groups, names, applied))
        return out

    def _gradients(self, objective: Objective, batch: Any) -> GroupGradients:
        if self.by == "task":
            return task_gradients(objective, batch)
        if self.by == "microbatch":
            return microbatch_gradients(objective, batch, self.microbatches)
        ids = class_ids(batch) if self.by == "class" else self.by(batch)
        return group_gradients(
            objective, batch, ids, method=self.method, max_memory=self.max_memory
        )

    def _names(self, ids: tuple[int | str, ...]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Key-safe group names and numeric ids (see the class doc)."""
        if self.by == "task":
            bad = [t for t in ids if not is_name(str(t))]
            if bad:
                raise ValueError(
                    f"GradConflict: task names {bad} are not lower_snake; record keys need "
                    "names like 'depth' or 'seg_loss' (lowercase letters, digits, single '_')"
                )
            return tuple(str(t) for t in ids), tuple(range(len(ids)))
        numbers = tuple(int(i) for i in ids)
        if any(i < 0 for i in numbers):
            raise ValueError(
                f"GradConflict: group ids must be >= 0 to name record keys, got {min(numbers)}; "
                "map them to non-negative integers (drop ignored targets such as -100 first)"
            )
        prefix = {"class": "class", "microbatch": "micro"}.get(str(self.by), "group")
        return tuple(f"{prefix}_{i}" for i in numbers), numbers

    def _pair_values(
        self,
        groups: GroupGradients,
        names: tuple[str, ...],
        numbers: tuple[int, ...],
        grams: Tensor,
    ) -> dict[str, Value]:
        gram = grams.sum(dim=0)  # [G, G]
        pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
        rows, cols = torch.tensor(pairs, device=gram.device).T  # [pairs] each, row-major
        cos = cosines(gram)[rows, cols]  # [pairs]
        gms = magnitude_similarity(gram)[rows, cols]  # [pairs]
        worst = torch.where(cos.isnan(), torch.inf, cos).argmin()
        ids = torch.tensor(numbers, dtype=torch.float64, device=gram.device)  # [G]
        weights = groups.weights.to(gram)  # [G]
        out: dict[str, Value] = {
            f"{self.name}/mean_cos": cos.nanmean(),
            f"{self.name}/min_cos": cos[worst],
            f"{self.name}/min_pair_a": ids[rows[worst]],
            f"{self.name}/min_pair_b": ids[cols[worst]],
            f"{self.name}/frac_negative": (cos < 0).to(cos).sum() / (~cos.isnan()).to(cos).sum(),
            f"{self.name}/min_gms": _nanmin(gms, dim=0),
            f"{self.name}/pcgrad_shift": pcgrad_shift(weights[:, None] * gram * weights[None, :]),
        }
        if len(names) <= self.max_pair_groups:
            keys = tuple(f"{names[a]}__{names[b]}" for a, b in pairs)
            out[f"{self.name}/cos"] = PerLayer(keys, cos)
            out[f"{self.name}/gms"] = PerLayer(keys, gms)
        if self.layers:
            per_layer = cosines(grams)[:, rows, cols]  # [L, pairs]
            out[f"{self.name}/layer_cos"] = PerLayer(groups.layout.names, per_layer.nanmean(dim=1))
            out[f"{self.name}/layer_min_cos"] = PerLayer(groups.layout.names, _nanmin(per_layer, 1))
        return out


def _group_values(
    probe: str, groups: GroupGradients, names: tuple[str, ...], gram: Tensor
) -> dict[str, Value]:
    """Per-group norms, losses, counts and shares from the ``[G, G]`` Gram matrix, under
    the probe name ``probe``."""
    weights = groups.weights.to(gram)  # [G]
    weighted_loss = weights * groups.losses.to(gram)  # [G]
    return {
        f"{probe}/groups": float(len(names)),
        f"{probe}/norm": PerLayer(names, torch.diagonal(gram).clamp(min=0).sqrt()),
        f"{probe}/loss": PerLayer(names, groups.losses),
        f"{probe}/count": PerLayer(names, groups.counts.to(gram)),
        f"{probe}/grad_share": PerLayer(
            names, projection_shares(weights[:, None] * gram * weights[None, :])
        ),
        f"{probe}/loss_share": PerLayer(names, weighted_loss / weighted_loss.sum()),
    }


def _applied_gradient(ctx: StepContext, groups: GroupGradients) -> Tensor | None:
    """``[P]`` the gradient the optimizer will step on (``.grad`` of the groups'
    parameters, laid out like ``groups.grads``), or None when one of them has none (a
    checkpoint scan, an evaluation step, a hand-written update that bypasses ``.grad``)."""
    grads = {}
    for name in groups.layout.names:
        param = ctx.params.get(name)
        if param is None or param.grad is None:
            return None
        grads[name] = param.grad.detach()
    flat = groups.layout.flatten(grads).to(device=groups.grads.device, dtype=torch.float64)
    return ctx.unscaled(flat)


def _applied_values(
    probe: str, groups: GroupGradients, names: tuple[str, ...], applied: Tensor
) -> dict[str, Value]:
    """How the step actually taken treats each group: the cosine of ``applied [P]`` with
    each ``g_g`` (NaN where either is zero), and its distance from the plain batch
    gradient ``C``, relative to ``‖C‖``. A PCGrad step has ``⟨.grad, g_g⟩ >= 0`` for every
    group (Yu et al. 2020, for two tasks exactly): no group's loss rises to first order,
    which is what projection is for."""
    grads = groups.grads.to(torch.float64)  # [G, P]
    dots = grads @ applied  # [G]
    cos = dots / (grads.norm(dim=1) * applied.norm())  # [G]
    total = groups.total.to(torch.float64)  # [P]
    return {
        f"{probe}/applied_cos": PerLayer(names, cos),
        f"{probe}/applied_offset": (applied - total).norm() / total.norm(),
    }


def pooled_groups(groups: GroupGradients, ranks: Any, *, by: Any) -> GroupGradients:
    """The groups of the global batch from every rank's share (data parallel).

    Classes and ids: the union of the ranks' ids (one ``gather_objects``), then one
    all-reduce of each group's example-weighted gradient and loss sums and its count, so a
    group's gradient is its mean over all its examples wherever they were. Tasks: each
    rank's task gradients are means over its batch; the global one weights them by batch
    size. Micro-batches: every rank's micro-batches are groups of the global batch (rank
    ``r``'s ``k``-th is number ``r·m + k``), gathered.
    """
    if by == "microbatch":
        flat = torch.cat(
            [
                groups.grads.reshape(-1),
                groups.losses.to(groups.grads),
                groups.counts.to(groups.grads),
            ]
        )
        every_rank = ranks.gather(flat).to(groups.grads.device)  # [W, m·P + 2m]
        count, size = groups.grads.shape
        grads = every_rank[:, : count * size].reshape(-1, size)  # [W·m, P]
        losses = every_rank[:, count * size : count * size + count].reshape(-1)
        counts = every_rank[:, count * size + count :].reshape(-1)
        return replace(
            groups,
            ids=tuple(range(grads.shape[0])),
            grads=grads.to(groups.grads.dtype),
            losses=losses,
            counts=counts,
            weights=counts / counts.sum(),
        )
    if by == "task":
        size = groups.counts[:1].to(groups.grads)  # the local batch size (every task's)
        local = torch.cat(
            [size * groups.grads.reshape(-1), size * groups.losses.to(groups.grads), size]
        )
        total = ranks.sum(local)
        n = total[-1]
        count, width = groups.grads.shape
        return replace(
            groups,
            grads=(total[: count * width] / n).reshape(count, width),
            losses=total[count * width : -1] / n,
            counts=torch.full_like(groups.counts.to(groups.grads), 1.0) * n,
        )
    union = sorted({i for ids in ranks.gather_objects(list(groups.ids)) for i in ids})
    index = {i: k for k, i in enumerate(union)}
    rows = torch.tensor([index[i] for i in groups.ids], device=groups.grads.device)
    width = groups.grads.shape[1]
    counts = groups.counts.to(groups.grads)
    sums = torch.zeros(len(union), width + 2, dtype=groups.grads.dtype, device=groups.grads.device)
    sums[rows, :width] = counts[:, None] * groups.grads
    sums[rows, width] = counts * groups.losses.to(groups.grads)
    sums[rows, width + 1] = counts
    total = ranks.sum(sums)  # [G, P + 2]
    n = total[:, width + 1]
    return replace(
        groups,
        ids=tuple(union),
        grads=total[:, :width] / n[:, None],
        losses=total[:, width] / n,
        counts=n,
        weights=n / n.sum(),
    )


def _nanmin(values: Tensor, dim: int) -> Tensor:
    """Minimum over ``dim`` ignoring NaN (NaN where every entry is NaN)."""
    low = torch.where(values.isnan(), torch.inf, values).amin(dim=dim)
    return torch.where(torch.isinf(low), torch.nan, low)


def class_ids(batch: Any) -> Tensor:
    """The ``[B]`` integer labels of a batch ``(inputs, targets)``, or a ``ValueError``."""
    targets = batch[1] if isinstance(batch, tuple | list) and len(batch) >= 2 else None
    if not isinstance(targets, Tensor) or targets.ndim != 1 or targets.is_floating_point():
        raise ValueError(
            "GradConflict(by='class') needs batches (inputs, targets) with integer class "
            f"labels of shape [B], got {type(batch).__name__}; for other batches pass "
            "by=lambda batch: <[B] integer ids>"
        )
    return targets


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"GradConflict: {name} must be an integer >= {minimum}, got {value!r}")
