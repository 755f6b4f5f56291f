"""Rows of an offline scan (``trainprobe scan``): how far the weights moved between
consecutive checkpoints (the keys of :class:`~trainprobe.scan.update.CheckpointUpdate`)."""

from __future__ import annotations

import numpy as np

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run

from .curves import _all_positive, _at, _line, _log_axis, _read
from .heatmaps import HeatStyle, heatmap_part
from .parts import PanelPart

RATIO, NORM = "scan/update_ratio_total", "scan/update_norm_total"
BETWEEN = "scan/steps_between"
UPDATE_NORMS = "scan/update_norm"
"""Per tensor: ``scan/update_norm/<param>``."""

CHECKPOINT_CHANGE_NEEDS = (RATIO, NORM, BETWEEN)


def checkpoint_change_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``scan/update_ratio_total``, log y; the hover adds ``scan/update_norm_total`` and the
    training steps between the two checkpoints (``scan/steps_between``)."""
    series = _read(run, [key for key in CHECKPOINT_CHANGE_NEEDS if key in run])
    ratio = next((s for s in series if s.key == RATIO), None)
    if ratio is None:
        return None
    trace = _line(ratio, "‖Δw‖ / ‖w‖ since the previous checkpoint")
    trace.update(mode="lines+markers", marker={"size": 4})
    extra = {s.key: _at(s, ratio.steps) for s in series if s.key in (NORM, BETWEEN)}
    if extra:
        norm = extra.get(NORM, np.full(len(ratio), np.nan))
        between = extra.get(BETWEEN, np.full(len(ratio), np.nan))
        trace.update(
            customdata=np.stack([norm, between], axis=1),
            hovertemplate="‖Δw‖/‖w‖ %{y:.3g} · ‖Δw‖ %{customdata[0]:.3g} over "
            "%{customdata[1]:.0f} steps<extra></extra>",
        )
    log = _all_positive([ratio])
    return PanelPart(
        [trace],
        "‖Δw‖ / ‖w‖",
        "How far all weights moved since the previous checkpoint, relative to their size: "
        "the sum of the updates in between. A jump is where training changed pace.",
        keys=tuple(s.key for s in series),
        y_log=log,
        y_axis=_log_axis([ratio]) if log else {},
    )


CHECKPOINT_UPDATE_HEATMAP_NEEDS = (f"{UPDATE_NORMS}/*",)


def checkpoint_update_heatmap(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``scan/update_norm/<param>``: log colour, exact zeros on the darkest colour."""
    return heatmap_part(
        run,
        UPDATE_NORMS,
        HeatStyle("‖Δw‖", colorscale="Magma"),
        "‖Δw‖ of each tensor since the previous checkpoint, log colour. A dark row is a "
        "layer that did not move (frozen or starved; darkest = exactly 0).",
    )
