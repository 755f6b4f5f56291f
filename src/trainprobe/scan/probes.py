"""Which probes a scan runs: the defaults, ``--probes`` names, and what checkpoints lack."""

from __future__ import annotations

from collections.abc import Sequence

from ..probes import PROBES, HessianTop, LayerNorms, LocalComplexity
from ..probes.base import Probe
from ..probes.schedules import every
from .update import CheckpointUpdate

#: The probes a scan runs when none are given (names of :data:`trainprobe.probes.PROBES`).
DEFAULT_SCAN_PROBES = ("norms", "hessian", "regions")


def default_scan_probes() -> list[Probe]:
    """Weight norms, the top Hessian eigenvalue and local complexity, at every checkpoint.

    The Hessian's top eigenvalue (Lanczos, warm-started from the previous checkpoint)
    costs tens of Hessian-vector products on the scan's batch per checkpoint: seconds
    for small models, and the quantity most worth having offline (sharpness, edge of
    stability). The trace, density and sharpness probes are left to ``--probes``.
    """
    return [
        LayerNorms(schedule=every(1)),
        HessianTop(schedule=every(1)),
        LocalComplexity(schedule=every(1)),
    ]


def probes_from_names(names: Sequence[str]) -> list[Probe]:
    """Probe instances, due at every checkpoint, from :data:`~trainprobe.probes.PROBES` names.

    Raises:
        ValueError: an unknown name (the message lists the known ones), a name given
            twice, or a probe that cannot be built without options (use the Python API).
    """
    probes: list[Probe] = []
    for name in names:
        if name not in PROBES:
            raise ValueError(f"unknown probe {name!r}; choose from: {', '.join(sorted(PROBES))}")
        if any(p.name == name for p in probes):
            raise ValueError(f"probe {name!r} is listed twice; list each probe once")
        try:
            probes.append(PROBES[name](schedule=every(1)))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"probe {name!r} needs options that --probes cannot give ({err}); build it "
                "yourself and pass it to trainprobe.scan.scan(probes=[...])"
            ) from err
    return probes


def split_probes(
    probes: Sequence[Probe], *, has_optimizer: bool
) -> tuple[list[Probe], dict[str, str]]:
    """``(runnable, {name: reason})``: probes that need what a checkpoint scan cannot give
    are left out with a stated reason, and :class:`CheckpointUpdate` is added."""
    runnable: list[Probe] = []
    left_out: dict[str, str] = {}
    for probe in probes:
        if "update" in probe.needs:
            left_out[probe.name] = (
                "needs the update of one optimizer step, which checkpoints do not hold; the "
                "scan records the change between checkpoints as scan/update_* instead"
            )
        elif "optimizer" in probe.needs and not has_optimizer:
            left_out[probe.name] = (
                "needs the optimizer state: save it in the checkpoints (an 'optimizer' "
                "entry) and pass optimizer_fn= (CLI: --optimizer MODULE:FUNCTION)"
            )
        elif probe.name == CheckpointUpdate.name:
            raise ValueError(
                f"probe name {probe.name!r} is reserved for the scan's own update measurement; "
                "rename the probe"
            )
        else:
            runnable.append(probe)
    return [*runnable, CheckpointUpdate()], left_out
