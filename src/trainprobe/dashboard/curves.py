"""Line panels: user scalars, learning rate, global norms and non-finite counts; the line
helpers the other rows share (:func:`_read`, :func:`_line`, :func:`_coloured`, log axes).

Each panel function has its key patterns beside it, ``<NAME>_NEEDS`` (the registry in
:mod:`.panels` reads them); every key it reads is spelled once, in the constants here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run, Series

from .grid import axis_log_ticks, real_label
from .parts import FRACTION, HEALTHY_UPDATE_RATIO, PanelPart

SCALARS = "scalars"
"""The family of the values a user logs: ``scalars/<name>``."""
LOSS = f"{SCALARS}/loss"
LR = "optim/lr"
GRAD_TOTAL, WEIGHT_TOTAL = "norms/grad_total", "norms/weight_total"
RATIO_TOTAL = "updates/ratio_total"
NONFINITE = "nonfinite"

_HEALTHY = real_label(math.log10(HEALTHY_UPDATE_RATIO))  # "1e-3"
_GLOBAL_NORMS = (
    (GRAD_TOTAL, "grad total", None),
    (WEIGHT_TOTAL, "weight total", None),
    (RATIO_TOTAL, "update ratio total", "dash"),
)


def _read(run: Run, keys: Sequence[str]) -> list[Series]:
    """The non-empty scalar series of ``keys`` that the run has."""
    series = [run.series(key) for key in keys if key in run]
    return [s for s in series if s.values.ndim == 1 and len(s) > 0]


def _line(series: Series, name: str, *, dash: str | None = None, shape: str = "linear"):
    return go.Scatter(
        x=series.steps,
        y=series.values,
        name=name,
        mode="lines",
        line={"width": 1.6, "dash": dash, "shape": shape},
        yhoverformat=".4g",
    )


def _coloured(series: Series, name: str, colour: str, *, dash: str | None = None) -> go.Scatter:
    trace = _line(series, name, dash=dash)
    trace.update(line_color=colour)
    return trace


def _at(series: Series, steps: np.ndarray) -> np.ndarray:
    """``series`` at ``steps`` (NaN where it has no value)."""
    out = np.full(steps.size, np.nan)
    _, mine, theirs = np.intersect1d(series.steps, steps, return_indices=True)
    out[theirs] = series.values[mine]
    return out


def _finite(series: Sequence[Series]) -> np.ndarray:
    values = np.concatenate([s.values for s in series])
    return values[np.isfinite(values)]


def _all_positive(series: Sequence[Series]) -> bool:
    values = _finite(series)
    return values.size > 0 and bool(np.all(values > 0))


def _log_axis(series: Sequence[Series]) -> dict:
    """Log y-axis settings that label the axis whatever the data's range: plotly's own
    decade labels where the data hold three powers of ten or more, else ticks chosen from
    the data's range, each labelled with its value (:func:`.grid.axis_log_ticks`)."""
    values = _finite(series)
    values = values[values > 0]
    ticks = axis_log_ticks(float(values.min()), float(values.max())) if values.size else None
    if ticks is None:
        return {"exponentformat": "power", "minorloglabels": "none"}
    tickvals, ticktext = ticks
    return {"tickmode": "array", "tickvals": tickvals, "ticktext": ticktext}


def _fraction_floor(series: Sequence[Series]) -> float:
    """The bottom of a ``[0, 1]``-like axis: ``FRACTION[0]``, or lower to show the lowest
    finite value (a cosine or a ratio below 0)."""
    values = _finite(series)
    return min(FRACTION[0], float(values.min()) - 0.03) if values.size else FRACTION[0]


def _is_fraction(series: Series) -> bool:
    """Accuracy-like: every finite value in [0, 1] and not named like a loss."""
    values = series.values[np.isfinite(series.values)]
    name = series.key.rsplit("/", 1)[-1]
    return "loss" not in name and values.size > 0 and bool(np.all((values >= 0) & (values <= 1)))


LOSS_NEEDS = (f"{SCALARS}/*",)


def loss_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``scalars/*`` that are not accuracy-like, ``scalars/loss`` first."""
    series = [s for s in _read(run, run.keys(f"{SCALARS}/")) if not _is_fraction(s)]
    if not series:
        return None
    series.sort(key=lambda s: s.key != LOSS)
    traces = [_line(s, s.key.removeprefix(f"{SCALARS}/")) for s in series]
    log = _all_positive(series)
    scale = "log y; " if log else ""
    return PanelPart(
        traces,
        "loss" if len(series) == 1 else "value",
        f"Logged scalars ({scale}gaps are NaN). Spikes, plateaus and divergence show here first.",
        keys=tuple(s.key for s in series),
        y_log=log,
        height=1.3,
        y_axis=_log_axis(series) if log else {},
    )


METRICS_NEEDS = (f"{SCALARS}/*",)


def metrics_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``scalars/*`` whose values all lie in [0, 1] (accuracy, ...)."""
    series = [s for s in _read(run, run.keys(f"{SCALARS}/")) if _is_fraction(s)]
    if not series:
        return None
    traces = [_line(s, s.key.removeprefix(f"{SCALARS}/")) for s in series]
    return PanelPart(
        traces,
        "fraction",
        "Scalars in [0, 1]. Validation rising long after train saturates is "
        "grokking; a gap that widens is overfitting.",
        keys=tuple(s.key for s in series),
        y_axis={"range": [-0.03, 1.03]},
    )


LR_NEEDS = (f"{LR}/*",)


def lr_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``optim/lr/<group>``, on a log y-axis when it spans two decades or more."""
    series = _read(run, run.keys(f"{LR}/"))
    if not series:
        return None
    names = [s.key.removeprefix(f"{LR}/") for s in series]
    traces = [
        _line(s, f"group {n}" if n.isdigit() else n) for s, n in zip(series, names, strict=True)
    ]
    values = _finite(series)
    log = _all_positive(series) and values.max() >= 100 * values.min()
    y_axis = _log_axis(series) if log else {"rangemode": "tozero"}
    if not log and values.size and values.max() == values.min() != 0:  # a constant LR
        y_axis = {"range": sorted([0.0, 2.0 * float(values.max())])}
    return PanelPart(
        traces,
        "learning rate",
        "Learning rate per param group. Instability right after warm-up ends "
        "points at a peak LR too high.",
        keys=tuple(s.key for s in series),
        y_log=bool(log),
        height=0.7,
        y_axis=y_axis,
    )


NORMS_NEEDS = tuple(key for key, _, _ in _GLOBAL_NORMS)


def norms_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """Global gradient and weight norms and the total update ratio, log y."""
    present = [(key, name, dash) for key, name, dash in _GLOBAL_NORMS if key in run]
    series = _read(run, [key for key, _, _ in present])
    if not series:
        return None
    style = {key: (name, dash) for key, name, dash in present}
    traces = [_line(s, style[s.key][0], dash=style[s.key][1]) for s in series]
    if any(s.key == RATIO_TOTAL for s in series):
        lo, hi = min(int(s.steps[0]) for s in series), max(int(s.steps[-1]) for s in series)
        traces.append(
            go.Scatter(
                x=[lo, hi],
                y=[HEALTHY_UPDATE_RATIO] * 2,
                mode="lines",
                name=f"ratio {_HEALTHY} (typical)",
                hoverinfo="skip",
                line={"width": 1, "dash": "dot", "color": "#888"},
            )
        )
    return PanelPart(
        traces,
        "L2 norm / ratio",
        "Whole-model norms (log y). Grad-norm spikes precede loss spikes; an update "
        f"ratio far above {_HEALTHY} means steps too large.",
        keys=tuple(s.key for s in series),
        y_log=True,
        height=1.1,
        y_axis=_log_axis(series),
    )


NONFINITE_NEEDS = tuple(f"{NONFINITE}/{count}" for count in ("loss", "grad", "param"))


def nonfinite_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``nonfinite/loss|grad|param`` counts per step (not the ``first_*`` indices).

    Traces are named ``"non-finite loss"`` etc., distinct from the loss panel's ``"loss"``.
    """
    series = _read(run, [k for k in NONFINITE_NEEDS if k in run])
    if not series:
        return None
    traces = [
        _line(s, f"non-finite {s.key.removeprefix(f'{NONFINITE}/')}", shape="hv") for s in series
    ]
    return PanelPart(
        traces,
        "count",
        "Tensors holding NaN/Inf per step (loss: 0/1); all zero is healthy. The "
        "first non-zero step is where to look.",
        keys=tuple(s.key for s in series),
        height=0.6,
        y_axis={"rangemode": "tozero"},
    )
