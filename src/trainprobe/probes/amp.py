"""The loss scale of fp16 mixed precision and the steps the scaler skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..keys import Key
from .base import ProbeOptions, StepContext, Value
from .schedules import Schedule, every


@dataclass(frozen=True, kw_only=True, eq=False)
class LossScale(ProbeOptions):
    """The ``torch.amp.GradScaler`` scale each step used, and whether the scaler skipped
    the step (its gradients overflowed: ``scaler.step`` did not call the optimizer and
    ``scaler.update`` backed the scale off).

    Read when the next step begins (after ``scaler.update()``), from the scale saved
    when the step's block ended: the step was skipped exactly when the scale went down
    (``update`` only lowers it after an overflow). Device tensors only, no sync. Added by
    ``watch(..., scaler=...)`` when the probes do not include one. At a skipped step the
    update probes record a zero update (nothing moved) and the gradient probes the
    overflowing gradient, as the optimizer saw it.

    Keys: see ``keys``.

    Args:
        schedule: when to read it (default every step).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "amp"
    schedule: Schedule = every(1)
    keys = (
        Key("amp/scale", "the loss scale the step's backward used"),
        Key("amp/skipped", "1.0 when the scaler skipped the step (an inf/NaN gradient), else 0.0"),
    )
    needs = frozenset({"update", "scaler"})

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if ctx.loss_scale is None:
            return {}
        used, after = ctx.loss_scale
        return {
            f"{self.name}/scale": used.reshape(()),
            f"{self.name}/skipped": (after < used).to(used.dtype).reshape(()),
        }
