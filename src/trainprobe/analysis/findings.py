"""What a detector reports: :class:`Finding` and its :class:`Severity`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum


class Severity(IntEnum):
    """How urgent a finding is; ``CRITICAL`` makes ``trainprobe report`` exit with 1."""

    INFO = 0
    WARNING = 1
    CRITICAL = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    """One diagnosis over a span of steps.

    Attributes:
        detector: name of the detector that produced it (e.g. ``"loss_spike"``).
        severity: info, warning or critical.
        start_step: first step of the span the evidence covers.
        end_step: last step of that span (``>= start_step``).
        message: what was seen, with the numbers (one sentence).
        action: what to do about it (one actionable sentence).
        evidence: the measured numbers and the thresholds they were compared with.
        keys: record keys carrying the evidence (the dashboard links panels by them).
    """

    detector: str
    severity: Severity
    start_step: int
    end_step: int
    message: str
    action: str
    evidence: Mapping[str, float | int | str] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.end_step < self.start_step:
            raise ValueError(
                f"Finding span must satisfy start_step <= end_step, got "
                f"{self.start_step}..{self.end_step}"
            )
        object.__setattr__(self, "severity", Severity(self.severity))

    def to_dict(self) -> dict:
        """JSON-ready form (severity as its lower-case name)."""
        return {
            "detector": self.detector,
            "severity": str(self.severity),
            "start_step": int(self.start_step),
            "end_step": int(self.end_step),
            "message": self.message,
            "action": self.action,
            "evidence": dict(self.evidence),
            "keys": list(self.keys),
        }
