"""Curvature panels: sharpness against the stability threshold, the Hessian's top eigenvalues,
its trace and the gradient's share in the top eigenspace over training (the keys of
Sharpness, HessianTop, HessianTrace and GradientSubspace); the spectral density row is in
:mod:`.density`."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run, Series

from .curves import _all_positive, _finite, _line, _log_axis, _read
from .parts import PanelPart

LAMBDA = "sharpness/lambda_max"
THRESHOLD = "sharpness/threshold"
SUBSPACE = "grad_subspace/fraction"
TRACE = "hessian_trace/trace"
STDERR = "hessian_trace/stderr"
HESSIAN, EIG, BOTTOM = "hessian", "eig", "bottom"
"""``hessian/eig_<i>`` (the top eigenvalues, largest first) and ``hessian/bottom_<i>``."""

_TRACE_COLOUR = "#1f77b4"
_BAND_FILL = "rgba(31, 119, 180, 0.2)"  # the trace colour, translucent
_EIGEN_KEY = re.compile(rf"{HESSIAN}/({EIG}|{BOTTOM})_(\d+)")

SHARPNESS_NEEDS = (LAMBDA, THRESHOLD)


def sharpness_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``sharpness/lambda_max`` with ``sharpness/threshold`` dashed; the hover gives their ratio.

    Log y when every value is positive (a warmup from a tiny learning rate starts the
    threshold ``2 / lr`` decades above the sharpness).
    """
    series = _read(run, [key for key in SHARPNESS_NEEDS if key in run])
    sharp = next((s for s in series if s.key == LAMBDA), None)
    if sharp is None:
        return None
    traces = [_line(sharp, "λ_max")]
    threshold = next((s for s in series if s.key == THRESHOLD), None)
    if threshold is not None:
        traces[0].update(
            customdata=_ratio_at(sharp, threshold),
            hovertemplate="λ_max %{y:.4g} · %{customdata:.3g}× the threshold<extra></extra>",
        )
        traces.append(_line(threshold, "stability threshold", dash="dash"))
        traces[-1].update(line_color="#d62728")
    return PanelPart(
        traces,
        "eigenvalue",
        "Top Hessian eigenvalue (Adam: of P⁻¹H) and the stability threshold (2/lr for GD). "
        "Rising to the line and hovering is the edge of stability; far above it with a "
        "spiky loss is instability.",
        keys=tuple(s.key for s in series),
        height=1.1,
        **_y_scale(series, decades=0),
    )


def _ratio_at(sharp: Series, threshold: Series) -> np.ndarray:
    """``[n]`` ``lambda_max / threshold`` at the sharpness steps (NaN where no threshold)."""
    ratio = np.full(len(sharp), np.nan)
    _, at_sharp, at_threshold = np.intersect1d(sharp.steps, threshold.steps, return_indices=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio[at_sharp] = sharp.values[at_sharp] / threshold.values[at_threshold]
    return ratio


HESSIAN_TOP_NEEDS = tuple(f"{HESSIAN}/{kind}_[0-9]*" for kind in (EIG, BOTTOM))


def hessian_top_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``hessian/eig_<i>`` (solid, Viridis by rank) and ``hessian/bottom_<i>`` (dotted)."""
    keys = sorted(
        (key for key in run.keys(f"{HESSIAN}/") if _EIGEN_KEY.fullmatch(key)), key=_eigen_rank
    )
    series = _read(run, keys)
    if not series:
        return None
    traces = []
    for kind, dash in ((EIG, None), (BOTTOM, "dot")):
        ranked = [s for s in series if _eigen_rank(s.key)[0] == (kind == BOTTOM)]
        colours = sample_colorscale("Viridis", list(np.linspace(0.0, 0.85, max(len(ranked), 2))))
        for s, colour in zip(ranked, colours, strict=False):
            traces.append(_line(s, f"{kind} {_eigen_rank(s.key)[1]}", dash=dash))
            traces[-1].update(line_color=colour)
    return PanelPart(
        traces,
        "eigenvalue",
        "Top Hessian eigenvalues (Lanczos), eig 0 the largest; dotted: the most negative. "
        "One far above the rest is an outlier direction; large negative ones, a saddle.",
        keys=tuple(s.key for s in series),
        **_y_scale(series, decades=2),
    )


def _y_scale(series: Sequence[Series], *, decades: int) -> dict:
    """``y_log`` and ``y_axis`` of a PanelPart: log y when every value is positive and the
    largest is ``10**decades`` times the smallest or more."""
    values = _finite(series)
    log = _all_positive(series) and values.max() >= 10.0**decades * values.min()
    return {"y_log": bool(log), "y_axis": _log_axis(series) if log else {}}


def _eigen_rank(key: str) -> tuple[bool, int]:
    """``(is_bottom, index)`` of ``hessian/eig_<i>`` / ``hessian/bottom_<i>``: top first."""
    kind, index = _EIGEN_KEY.fullmatch(key).groups()
    return kind == BOTTOM, int(index)


HESSIAN_TRACE_NEEDS = (TRACE, STDERR)


def hessian_trace_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``hessian_trace/trace`` with a ±1 ``hessian_trace/stderr`` band (Hutch++ or Hutchinson)."""
    series = _read(run, [key for key in HESSIAN_TRACE_NEEDS if key in run])
    trace = next((s for s in series if s.key == TRACE), None)
    if trace is None:
        return None
    traces = [_line(trace, "trace")]
    traces[0].update(line_color=_TRACE_COLOUR)
    stderr = next((s for s in series if s.key == STDERR), None)
    if stderr is not None:
        steps, at_trace, at_err = np.intersect1d(trace.steps, stderr.steps, return_indices=True)
        centre, err = trace.values[at_trace], stderr.values[at_err]
        keep = np.isfinite(centre) & np.isfinite(err)
        steps, centre, err = steps[keep], centre[keep], err[keep]
        if steps.size:
            traces.insert(0, _band(steps, centre - err, centre + err, "trace ± stderr"))
    return PanelPart(
        traces,
        "trace",
        "Hessian trace (Hutch++ by default), the shaded band ±1 standard error. A rising "
        "trace is the whole spectrum sharpening, not just its top.",
        keys=tuple(s.key for s in series),
        height=0.9,
    )


def _band(steps: np.ndarray, low: np.ndarray, high: np.ndarray, name: str) -> go.Scatter:
    """A filled polygon between ``low [n]`` and ``high [n]``, one legend entry, no hover."""
    return go.Scatter(
        x=np.concatenate([steps, steps[::-1]]),
        y=np.concatenate([high, low[::-1]]),
        fill="toself",
        fillcolor=_BAND_FILL,
        line={"width": 0},
        mode="lines",
        name=name,
        hoverinfo="skip",
    )


GRAD_SUBSPACE_NEEDS = (SUBSPACE,)


def grad_subspace_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grad_subspace/fraction`` in ``[0, 1]``."""
    series = _read(run, [SUBSPACE] if SUBSPACE in run else [])
    if not series:
        return None
    return PanelPart(
        [_line(series[0], "gradient in top-k eigenspace")],
        "fraction",
        "Share of the gradient's squared norm inside the top-k Hessian eigenspace. Near 1 "
        "soon after the start is normal (Gur-Ari et al. 2018); training then moves mostly "
        "along a few sharp directions.",
        keys=GRAD_SUBSPACE_NEEDS,
        height=0.7,
        y_axis={"range": [-0.03, 1.03]},
    )
