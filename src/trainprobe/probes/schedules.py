"""When a probe is due: ``every(n)``, ``log_spaced()``, ``at_steps(...)``, and unions.

A schedule is any callable ``step -> bool`` with a ``describe() -> str``; these
are frozen dataclasses so they serialise into the run metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_step_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _Union:
    def __or__(self, other: Schedule) -> AnyOf:
        return AnyOf((self, other))


@dataclass(frozen=True)
class Every(_Union):
    """Due at ``start, start + n, start + 2n, ...``."""

    n: int
    start: int = 0

    def __post_init__(self) -> None:
        _check_step_int("every(n): n", self.n, minimum=1)
        _check_step_int("every(n, start=...): start", self.start, minimum=0)

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0

    def describe(self) -> str:
        return f"every({self.n}" + (f", start={self.start})" if self.start else ")")


@dataclass(frozen=True)
class LogSpaced(_Union):
    """Due at step 0 and at ``round(10 ** (i / per_decade))`` for ``i = 0, 1, ...``.

    Dense early in training, sparse later: about ``per_decade`` steps per factor of 10.
    """

    per_decade: int = 10

    def __post_init__(self) -> None:
        _check_step_int("log_spaced(per_decade)", self.per_decade, minimum=1)

    def __call__(self, step: int) -> bool:
        if step <= 1:
            return step >= 0
        i = round(self.per_decade * math.log10(step))
        return any(round(10 ** (j / self.per_decade)) == step for j in (i - 1, i, i + 1))

    def describe(self) -> str:
        return f"log_spaced(per_decade={self.per_decade})"


@dataclass(frozen=True)
class AtSteps(_Union):
    """Due exactly at the given steps."""

    steps: frozenset[int]

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def describe(self) -> str:
        shown = sorted(self.steps)
        tail = ", ..." if len(shown) > 8 else ""
        return f"at_steps({', '.join(map(str, shown[:8]))}{tail})"


@dataclass(frozen=True)
class AnyOf(_Union):
    """Due when any of its schedules is due (``every(100) | log_spaced()``)."""

    parts: tuple

    def __call__(self, step: int) -> bool:
        return any(part(step) for part in self.parts)

    def describe(self) -> str:
        return " | ".join(part.describe() for part in self.parts)


Schedule = Every | LogSpaced | AtSteps | AnyOf


def every(n: int, *, start: int = 0) -> Every:
    """Due every ``n`` steps from ``start`` (``every(1)``: every step)."""
    return Every(n, start)


def log_spaced(per_decade: int = 10) -> LogSpaced:
    """Due at log-spaced steps, about ``per_decade`` per factor of ten."""
    return LogSpaced(per_decade)


def at_steps(*steps: int) -> AtSteps:
    """Due exactly at ``steps`` (non-negative integers)."""
    for step in steps:
        _check_step_int("at_steps(...) step", step, minimum=0)
    return AtSteps(frozenset(steps))


def check_schedule(schedule: object, owner: str) -> None:
    """Raise ``TypeError`` unless ``schedule`` is callable with a ``describe()``."""
    if not callable(schedule) or not callable(getattr(schedule, "describe", None)):
        raise TypeError(
            f"{owner}: schedule must be a trainprobe schedule such as every(10), log_spaced() "
            f"or at_steps(0, 100), got {schedule!r}"
        )
