"""What the monitor does differently under ``torch.distributed``: who opens the store, which
probes the step's one collective is for, and how a failure or skip on any rank is decided
on every rank (the mechanics of the collective are :mod:`.distributed`'s)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..functional.shards import any_sharded
from ..probes.base import OnHost, Probe, Value
from ..store import RunWriter
from .distributed import (
    FAILED,
    OK,
    SKIPPED,
    Exchange,
    NullWriter,
    Ranks,
    check_across_ranks,
    coordinated,
)
from .step import StepHandle

UPDATE = "@update"
"""Suffix of an update probe's name in the exchange (measured as the next step began)."""


class RankCoordinator:
    """The monitor's side of one process group (see the module doc).

    Args:
        ranks: this process's place in the group.
        probes: the monitor's probes (checked here: refused ones raise ``ValueError``).
        params: the watched parameters (FSDP2 is told by their ``DTensor`` type).
        on_probe_error: the monitor's policy (``"warn"`` or ``"raise"``).
        skip, disable: the monitor's own ways to skip a probe's step and disable it.
    """

    def __init__(
        self,
        ranks: Ranks,
        probes: Sequence[Probe],
        params: Mapping[str, Tensor],
        *,
        on_probe_error: str,
        skip: Callable[[Probe, int, str], None],
        disable: Callable[[Probe, str], None],
    ) -> None:
        check_across_ranks(probes, ranks, params=params.values())
        sharded = any_sharded(params.values())
        self.ranks = ranks
        self.exchange = Exchange(ranks)
        self.probes = {p.name: p for p in probes}
        #: the probes the step's collective is for (see distributed.coordinated)
        self.coordinated = frozenset(p.name for p in probes if coordinated(p, sharded=sharded))
        self.on_probe_error = on_probe_error
        self._skip, self._disable = skip, disable
        #: statuses of coordinated probes that failed or skipped here, decided at the next
        #: exchange together with every rank's
        self._pending: dict[str, tuple[float, Exception | None]] = {}

    # -- the store ---------------------------------------------------------------------
    def open_store(
        self, run_dir: Path, options: Mapping[str, Any]
    ) -> tuple[RunWriter | NullWriter, int | None]:
        """Rank 0 opens the store; every rank learns its last step, or its error (one
        collective, so that a rank 0 that cannot open leaves no rank waiting)."""
        writer: RunWriter | NullWriter = NullWriter()
        said = None
        if self.ranks.writer:
            try:
                writer = RunWriter(run_dir, **options)
                said = ("ok", writer.last_step)
            except Exception as err:
                self.ranks.gather_objects(("error", f"{type(err).__name__}: {err}"))
                raise
        answer = self.ranks.gather_objects(said)[0]
        if answer[0] == "error":
            raise RuntimeError(
                f"trainprobe: rank 0 could not open the run directory {run_dir} "
                f"({answer[1]}); this rank stops too"
            )
        return writer, answer[1]

    # -- failures ------------------------------------------------------------------------
    def hold(self, probe: Probe, err: Exception, *, skipped: bool = False) -> bool:
        """Keep a coordinated probe's failure (or skip) for the next exchange; False for
        the others, which the monitor decides alone (their values are rank 0's)."""
        if probe.name not in self.coordinated:
            return False
        self._pending[probe.name] = (SKIPPED if skipped else FAILED, err)
        return True

    # -- the exchanges -------------------------------------------------------------------
    def step_ended(
        self,
        handle: StepHandle,
        values: dict[str, Value],
        previous: tuple[StepHandle, dict[str, Value]] | None,
    ) -> None:
        """At a step's end: this step's coordinated probes and the update probes of the step
        before (measured as this one began, into ``previous``'s record), in one exchange."""
        mine = self.coordinated
        names = [p.name for p in handle.due if "update" not in p.needs and p.name in mine]
        carried: dict[str, Value] = {}
        if previous is not None and previous[0].step != handle.step:
            before, carried = previous
            names += [f"{p.name}{UPDATE}" for p in before.due if "update" in p.needs]
            names = [n for n in names if n.removesuffix(UPDATE) in mine]
        self._combine(handle.step, names, values, carried)

    def closing(self, previous: tuple[StepHandle, dict[str, Value]], *, clean: bool) -> None:
        """At close: the last step's update probes, measured just now, decided and combined
        like a step's (one collective, made by every rank as it closes); after an exception
        their sums are dropped rather than stored as one rank's."""
        handle, record = previous
        if not clean:
            for key in [k for k, v in record.items() if _summed(v)]:
                del record[key]
            return
        names = [
            f"{p.name}{UPDATE}"
            for p in handle.due
            if "update" in p.needs and p.name in self.coordinated
        ]
        self._combine(handle.step, names, {}, record)

    def _combine(
        self, step: int, names: list[str], values: dict[str, Value], carried: dict[str, Value]
    ) -> None:
        """Combine the coordinated probes' ``values`` (this step's) and the sums waiting in
        ``carried`` (the record the update probes wrote to) over ranks, in place, and act
        on the verdicts."""
        if not names:
            return
        pending, self._pending = self._pending, {}
        status = {
            name: pending[name.removesuffix(UPDATE)][0]
            for name in names
            if name.removesuffix(UPDATE) in pending
        }
        mine = self.coordinated  # the sums of the others stay rank 0's (the same)
        sums = {k: v for k, v in carried.items() if _summed(v) and k.split("/")[0] in mine}
        own = {k: v for k, v in values.items() if k.split("/")[0] in mine}
        both = {**own, **sums}
        verdict = self.exchange.combine(names, status, both)
        for key in sums:  # back to the update probes' record, combined (or dropped)
            del carried[key]
            if key in both:
                carried[key] = both.pop(key)
        for key in own:
            del values[key]
        values.update(both)
        for name, (worst, rank) in verdict.items():
            if worst != OK:
                record = carried if name.endswith(UPDATE) else values
                self._act(name.removesuffix(UPDATE), worst, rank, step, record, pending)

    def _act(
        self,
        name: str,
        worst: float,
        rank: int,
        step: int,
        record: dict[str, Value],
        pending: Mapping[str, tuple[float, Exception | None]],
    ) -> None:
        """One verdict: the probe's values of this step dropped (measured here, not
        everywhere: not the global value), then skipped, raised or disabled alike."""
        for key in [k for k in record if k.startswith(f"{name}/")]:
            del record[key]
        probe = self.probes[name]
        err = pending.get(name, (OK, None))[1]
        told = f"{type(err).__name__}: {err}" if err is not None else "see that rank's warning"
        if worst == SKIPPED:
            self._skip(probe, step, f"on rank {rank}: {told}")
        elif self.on_probe_error == "raise":
            if err is not None:
                raise err
            raise RuntimeError(f"trainprobe: probe {name!r} raised on rank {rank}")
        else:
            self._disable(probe, f"raised on rank {rank}: {told}")


def _summed(value: Value) -> bool:
    """Whether ``value`` waits to be summed over ranks (``OnHost(reduce="sum")``)."""
    return isinstance(value, OnHost) and value.reduce == "sum"
