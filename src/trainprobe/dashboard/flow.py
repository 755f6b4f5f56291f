"""Gradient flow rows: the gradient reaching each module, and through time (GradientFlow)."""

from __future__ import annotations

import numpy as np

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run

from .gradients import layer_lines_part
from .parts import PanelPart

NORM = "grad_flow/norm"
RATIO = "grad_flow/ratio"
VANISHED = 1e-3
"""The first/last ratio below which the vanishing detector reads a sequence as lost."""

GRAD_FLOW_NEEDS = (f"{NORM}/*",)


def grad_flow_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grad_flow/norm/<module>``: ``‖∂L/∂y‖`` at each module's output, in model order."""
    return layer_lines_part(
        run,
        (NORM, np.median, "median", "‖∂L/∂y‖"),
        "‖∂L/∂y‖",
        "The gradient reaching each module's output from above. Decades between the last "
        "modules and the first: the signal fades with depth before it reaches them.",
    )


GRAD_THROUGH_TIME_NEEDS = (f"{RATIO}/*",)


def grad_through_time_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grad_flow/ratio/<module>``: first over last position of each sequence module's
    input gradient, with a dotted line where the vanishing detector reads it as lost."""
    return layer_lines_part(
        run,
        (RATIO, np.median, "median", "first/last"),
        "‖∂L/∂x_first‖ / ‖∂L/∂x_last‖",
        "How much gradient reaches the first position of each sequence against the last. "
        f"Below {VANISHED:g} (dotted) the gradient vanishes through time: what the early "
        "positions carry is not learned.",
        reference=(VANISHED, f"first/last = {VANISHED:g}"),
    )
