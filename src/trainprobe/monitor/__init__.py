"""The only orchestrator: :func:`watch` and the :class:`Monitor` it returns choose the
probes due at each step, apply the error policy, buffer and flush; a
:class:`StepHandle` owns one step's hooks, parameter copy and logged values;
:mod:`.transfer` moves values to the host in one transfer, :mod:`.checks` validates at
the public boundary and :mod:`.meta` describes the run."""

from .monitor import Monitor
from .step import StepHandle
from .watch import watch

__all__ = ["Monitor", "StepHandle", "watch"]
