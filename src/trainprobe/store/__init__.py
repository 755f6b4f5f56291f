"""Run storage: an append-only SQLite writer and the read-only :class:`Run`."""

from .lifecycle import RunInUseError, RunState
from .run import Run, RunError, Series
from .writer import Record, RunWriter

__all__ = ["Record", "Run", "RunError", "RunInUseError", "RunState", "RunWriter", "Series"]
