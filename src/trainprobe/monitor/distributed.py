"""The monitor under ``torch.distributed``: who writes, how ranks agree, what is combined.

Under an initialised process group of two ranks or more (data parallel: DDP, or every
rank training a replica on its own batch):

- **rank 0 writes the store**; the other ranks measure (so that every collective a
  probe makes is matched) and write nothing;
- at the end of every step with probes due, **one collective** (an ``all_gather`` of
  one flat ``float64`` vector) carries every rank's probe status and the sufficient
  statistics of the probes that combine the ranks' batches
  (:class:`~trainprobe.probes.base.OnHost` with ``reduce="sum"``, summed: sums, sums of
  squares, counts; a NaN anywhere stays NaN). Gradients are already the global batch's
  after DDP's all-reduce, so gradient, weight and update norms need nothing. Scalars given
  to ``log`` are rank 0's as logged (many loops log on rank 0 only; log an all-reduced
  value for the global one);
- a probe that fails or skips on one rank fails or skips on all (the decision is made
  from the gathered statuses), so no rank waits in a collective another has left.

The vector's layout (which values, how long) is agreed once per set of due probes with
``all_gather_object`` and cached; a rank whose layout changed (a probe failed, a new key)
says so in the one collective and the ranks agree afresh.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..functional.shards import any_sharded
from ..probes.base import OnHost, Value

#: a probe's status in the exchange
OK, FAILED, SKIPPED = 0.0, 1.0, 2.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group (see the module doc).

    Attributes:
        rank: this process's rank in ``group``.
        world: the number of ranks.
        group: the process group (``None``: the default group).
        device: where collectives run (``cuda`` for NCCL, else the CPU).
    """

    rank: int
    world: int
    group: Any = None
    device: torch.device | str = "cpu"

    @property
    def writer(self) -> bool:
        """Whether this rank writes the store (rank 0)."""
        return self.rank == 0

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over ranks (an all-reduce; every rank gets the same bits)."""
        import torch.distributed as dist

        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out, group=self.group)
        return (out / self.world).to(tensor.device)

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over ranks (an all-reduce; the same bits on every rank)."""
        import torch.distributed as dist

        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out, group=self.group)
        return out.to(tensor.device)

    def gather(self, vector: Tensor) -> Tensor:
        """``[world, n]``: every rank's ``vector [n]`` (an all-gather)."""
        import torch.distributed as dist

        local = vector.detach().to(self.device, torch.float64).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.stack(parts)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (``all_gather_object``; between this job's own ranks)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out


class NullWriter:
    """What a rank other than 0 writes to: nothing (rank 0 holds the store)."""

    last_step: int | None = None

    def set_meta(self, items: Mapping[str, Any]) -> None:
        """Rank 0 records the metadata."""

    def append(self, records: Any) -> None:
        """Rank 0 records the values."""

    def close(self) -> None:
        """Nothing to close."""


def detect_ranks(group: Any = None) -> Ranks | None:
    """The process group's :class:`Ranks`, or None in a single process (no group, or a
    group of one rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    if world < 2:
        return None
    backend = str(dist.get_backend(group)).lower()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in backend and torch.cuda.is_available()
        else torch.device("cpu")
    )
    return Ranks(dist.get_rank(group), world, group, device)


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: DDP's ``.module`` (its forward hooks and
    buffer broadcasts are the training step's business, not a probe's). FSDP2
    (``fully_shard``) wraps nothing: the module is its own, with ``DTensor`` parameters."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


@dataclass(frozen=True)
class _Slot:
    key: str
    numel: int
    how: str  # "sum" (OnHost(reduce="sum")), the one combination so far


def _local_slots(values: Mapping[str, Value]) -> list[tuple[_Slot, Tensor]]:
    """The values this rank must combine with the others', in key order."""
    return [
        (_Slot(key, values[key].values.numel(), "sum"), values[key].values.reshape(-1))
        for key in sorted(values)
        if isinstance(values[key], OnHost) and values[key].reduce == "sum"
    ]  # everything else is the same on every rank, or rank 0's (logged scalars)


class Exchange:
    """One collective per measured step (see the module doc)."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self._layouts: dict[tuple[str, ...], tuple[_Slot, ...]] = {}
        self.collectives = 0  # collectives this exchange made (tests count them)

    def combine(
        self, due: Sequence[str], status: Mapping[str, float], values: dict[str, Value]
    ) -> dict[str, tuple[float, int]]:
        """Combine ``values`` with the other ranks' in place and return, per due probe,
        the worst status over ranks and the first rank that had it.

        ``status``: this rank's status per due probe (:data:`OK`, :data:`FAILED`,
        :data:`SKIPPED`). Values are replaced by their combination: logged scalars by
        their mean over ranks, ``OnHost(reduce="sum")`` by the sum.
        """
        names = tuple(due)
        slots = _local_slots(values)
        layout = tuple(s for s, _ in slots)
        agreed = self._layouts.get(names)
        if agreed is None:
            agreed = self._agree(names, layout)
        head = [float(layout != agreed)] + [status.get(n, OK) for n in names]
        parts = [torch.tensor(head, dtype=torch.float64)]
        if layout == agreed:
            parts += [t for _, t in slots]
        else:  # the agreed length, so the collective matches; the flag says to agree afresh
            parts.append(torch.full((sum(s.numel for s in agreed),), float("nan")))
        payload = torch.cat([x.to(self.ranks.device, torch.float64) for x in parts])
        gathered = self._gather(payload)  # [world, 1 + |due| + size]
        if bool((gathered[:, 0] > 0).any()):  # a layout changed somewhere: agree afresh
            self._layouts.pop(names, None)
            agreed = self._agree(names, layout)
            keep = {s.key: t for s, t in slots}
            common = [s for s in agreed if s.key in keep]
            vector = torch.cat(
                [torch.tensor(head[1:], dtype=torch.float64)]
                + [keep[s.key].to(self.ranks.device, torch.float64).reshape(-1) for s in common]
            )
            gathered = torch.cat([gathered[:, :1], self._gather(vector)], 1)
            agreed = tuple(common)
        verdict = self._verdict(names, gathered[:, 1 : 1 + len(names)])
        self._apply(agreed, gathered[:, 1 + len(names) :], values)
        for slot in set(layout) - set(agreed):  # local only: no combination, so no value
            values.pop(slot.key, None)
        return verdict

    def _gather(self, vector: Tensor) -> Tensor:
        self.collectives += 1
        return self.ranks.gather(vector).cpu()

    def _agree(self, names: tuple[str, ...], layout: tuple[_Slot, ...]) -> tuple[_Slot, ...]:
        """The slots every rank has, in this rank's order (all ranks sort keys the same)."""
        self.collectives += 1
        every = self.ranks.gather_objects(layout)
        shared = set(every[0]).intersection(*every[1:])
        agreed = tuple(s for s in every[0] if s in shared)
        self._layouts[names] = agreed
        return agreed

    @staticmethod
    def _verdict(names: tuple[str, ...], statuses: Tensor) -> dict[str, tuple[float, int]]:
        out = {}
        for i, name in enumerate(names):
            column = statuses[:, i]  # [world]
            worst = float(column.max())
            out[name] = (worst, int(torch.nonzero(column == worst)[0, 0]))
        return out

    def _apply(self, slots: tuple[_Slot, ...], gathered: Tensor, values: dict[str, Value]) -> None:
        offset = 0
        for slot in slots:
            block = gathered[:, offset : offset + slot.numel]  # [world, numel]
            offset += slot.numel
            old = values.get(slot.key)
            if isinstance(old, OnHost):
                values[slot.key] = replace(
                    old, values=block.sum(dim=0).reshape(old.values.shape), reduce=None
                )


_WHOLE_MODEL = (
    "evaluates the model as a function of all its parameters (torch.func), and under FSDP2 "
    "each rank holds only its shard of each: the values would be wrong or it would fail"
)
_WHOLE_MATRIX = (
    "takes singular values of whole weight or gradient matrices, and under FSDP2 each rank "
    "holds only some rows of each"
)


def _under_fsdp2() -> tuple[tuple[type, str], ...]:
    """The probe classes refused under FSDP2 and why, the most specific first (a literal
    registry: a probe class not here, or its subclass, runs; so does one whose reason is
    None, ahead of a refused base class)."""
    from ..probes import (
        CurvatureProbe,
        FeatureAttribution,
        GradSpectrum,
        GrokSignals,
        LocalComplexity,
        Robustness,
        WeightSpectrum,
    )
    from ..probes.output_source import OutputGradientProbe
    from ..probes.source import LossProbe

    return (
        (CurvatureProbe, None),  # runs: finite differences through the sharded model
        (LossProbe, _WHOLE_MODEL),
        (OutputGradientProbe, _WHOLE_MODEL),
        (GrokSignals, _WHOLE_MODEL),
        (Robustness, _WHOLE_MODEL),
        (LocalComplexity, _WHOLE_MODEL),
        (FeatureAttribution, _WHOLE_MODEL),
        (GradSpectrum, _WHOLE_MATRIX),
        (WeightSpectrum, _WHOLE_MATRIX),
    )


def coordinated(probe: Any, *, sharded: bool) -> bool:
    """Whether ``probe`` needs the step's exchange under ranks: its values combine the
    ranks' own batches (sums, or collectives inside its measurement, whose failure must
    be decided alike everywhere), or are shard statistics under FSDP2. The others
    (replicated parameters, all-reduced gradients, the probe's own fixed data) are the
    same on every rank: rank 0 measures and decides alone, and a step with only those
    due makes no collective. Under FSDP2 a probe that runs the model
    (``forward_through_shards``, the curvature probes) runs on every rank, whatever its
    data: the sharded forward and backward are collectives."""
    if sharded and getattr(probe, "forward_through_shards", False):
        return True  # every rank takes part in the sharded model's forward and backward
    rule = getattr(probe, "across_ranks", "same")
    if rule == "sharded":
        return sharded
    if rule != "combined":
        return False
    own = getattr(probe, "own_data", None)
    has_own = own is not None and getattr(probe, own, None) is not None
    return not (has_own or getattr(probe, "batches", None) is not None)


def check_across_ranks(
    probes: Sequence[Any], ranks: Ranks, *, params: Iterable[Tensor] = ()
) -> None:
    """Refuse, before training, the probes whose values would be one rank's share of the
    batch logged as the global batch's (see :data:`~trainprobe.probes.base.ACROSS_RANKS`),
    and, when ``params`` holds ``DTensor`` shards (FSDP2, ``fully_shard``), the probes
    that need the whole model on every rank.

    Args:
        probes: the monitor's probes.
        ranks: this process's place in the group.
        params: the watched trainable parameters (FSDP2 is told by their ``DTensor`` type).

    Raises:
        ValueError: naming each such probe and what makes it measurable.
    """
    problems = []
    sharded = any_sharded(params)
    refused = _under_fsdp2() if sharded else ()
    for probe in probes:
        rule = getattr(probe, "across_ranks", "same")
        field_name = getattr(probe, "own_data", None)
        why = next((why for kind, why in refused if isinstance(probe, kind)), None)
        if why is not None:
            problems.append(
                f"{type(probe).__name__} ('{probe.name}') {why}; leave it out under FSDP2, or "
                "measure saved checkpoints in one process (trainprobe scan)"
            )
        elif rule == "local":
            problems.append(
                f"{type(probe).__name__} ('{probe.name}') reads each rank's own forward and "
                "backward and has no rule yet to combine ranks; leave it out under "
                "torch.distributed, or run it in a single-process job"
            )
        elif rule == "own_data" and field_name and getattr(probe, field_name, None) is None:
            problems.append(
                f"{type(probe).__name__} ('{probe.name}') would measure the step's batch, "
                f"which is only rank {ranks.rank}'s share of the global batch; give it a fixed "
                f"batch with {field_name}= (the same on every rank) so every rank measures the "
                "same thing"
            )
    if problems:
        where = "FSDP2, " if sharded else ""
        raise ValueError(
            f"trainprobe under torch.distributed ({where}{ranks.world} ranks): "
            + "; ".join(problems)
        )
