"""Gradient-structure panels: gradient spectra, the noise scale and the weights' spectral
norms (the keys of GradSpectrum, GradNoise, WeightSpectrum); the conflict panels are in
:mod:`.conflict`."""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run, Series

from .curves import _all_positive, _line, _log_axis, _read
from .grid import layer_matrix, ordered_layers, short_names
from .heatmaps import HeatStyle, heatmap_part
from .parts import PanelPart

STABLE_RANK = "grad_spectrum/stable_rank"
SLOW_RATIO = "grad_spectrum/slow_ratio"
SPECTRAL_NORM = "weight_spectrum/spectral_norm"
B_SIMPLE, TRACE_COV = "grad_noise/b_simple", "grad_noise/trace_cov"
GRAD_SQ, BATCH = "grad_noise/grad_sq", "grad_noise/batch_size"

NOISE_WINDOW = 10
"""Measurements (not steps) in the trailing window of the smoothed noise scale."""
MAX_LAYER_LINES = 8
"""Most per-layer lines in a line panel; beyond it, the highest and lowest half of them."""
_REFERENCE = {"width": 1, "dash": "dot", "color": "#888"}


STABLE_RANK_HEATMAP_NEEDS = (f"{STABLE_RANK}/*",)


def stable_rank_heatmap_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grad_spectrum/stable_rank/<param>``: layer x step heatmap, log colour.

    Always log: a stable rank is ``>= 1`` and changes by factors; over less than a
    decade the log scale is nearly linear, and its ticks show real values either way.
    """
    return heatmap_part(
        run,
        STABLE_RANK,
        HeatStyle("stable rank", colorscale="Plasma"),
        "||G||_F²/σ_0² of each weight matrix's gradient, log colour. A row darkening "
        "towards 1: the layer is pushed along fewer and fewer directions.",
    )


def _layer_lines(
    run: Run, prefix: str, score: Callable[[np.ndarray], float], by: str, what: str
) -> tuple[list[go.Scatter], list[Series], str] | None:
    """Thin per-layer lines, Viridis by model order, named ``"<what> · <layer>"`` (the
    legend is shared by every row); the hover names the whole layer.

    At most :data:`MAX_LAYER_LINES` layers are drawn: past it, the half with the highest
    and the half with the lowest ``score`` of their finite values. Returns the traces,
    every series read and a sentence saying which layers are drawn.
    """
    series = _read(run, [f"{prefix}/{name}" for name in ordered_layers(run, prefix)])
    if not series:
        return None
    finite = [s.values[np.isfinite(s.values)] for s in series]
    scores = [score(v) if v.size else -np.inf for v in finite]  # no finite value: lowest
    order = sorted(range(len(series)), key=scores.__getitem__)
    half = MAX_LAYER_LINES // 2
    shown = sorted(order if len(order) <= MAX_LAYER_LINES else order[:half] + order[-half:])
    names = [series[i].key[len(prefix) + 1 :] for i in shown]
    _, labels = short_names(names, limit=30)
    colours = sample_colorscale("Viridis", [0.85 * i / max(len(series) - 1, 1) for i in shown])
    traces = []
    for i, name, label, colour in zip(shown, names, labels, colours, strict=True):
        hover = f"{html.escape(name)}: %{{y:.4g}}<extra></extra>"
        traces.append(_line(series[i], f"{what} · {label}"))
        traces[-1].update(line={"width": 1.2, "color": colour}, opacity=0.85, hovertemplate=hover)
    note = f" Drawn: the {half} highest and {half} lowest of {len(series)} by {by}."
    return traces, series, "" if len(shown) == len(series) else note


def _median_line(series: list[Series]) -> go.Scatter:
    """Bold median over the layers at every step (NaN, no warning, where none is finite)."""
    steps, values = layer_matrix(series)  # [T], [L, T]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(values, axis=0)  # [T]
    return go.Scatter(
        x=steps,
        y=median,
        name="median over layers",
        mode="lines",
        line={"width": 3, "color": "#222"},
        yhoverformat=".4g",
    )


SLOW_RATIO_NEEDS = (f"{SLOW_RATIO}/*",)


def slow_ratio_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grad_spectrum/slow_ratio/<param>`` in ``[0, 1]``: per-layer lines, and in bold their
    median over all layers (ratios are scale-free, so the median is a fair summary)."""
    drawn = _layer_lines(run, SLOW_RATIO, np.mean, "mean", "slow")
    if drawn is None:
        return None
    traces, series, note = drawn
    traces += [_median_line(series)] if len(series) > 1 else []
    return PanelPart(
        traces,
        "slow share",
        "Energy share of each gradient's slow EMA part (Grokfast): near 1 a steady "
        "direction, near 0 noise; bold: median." + note,
        keys=tuple(s.key for s in series),
        y_axis={"range": [-0.03, 1.03]},
    )


WEIGHT_SPECTRAL_NORM_NEEDS = (f"{SPECTRAL_NORM}/*",)


def reference_line(series: list[Series], y: float, name: str) -> go.Scatter:
    """A dotted horizontal line at ``y`` across the steps of ``series``."""
    lo = min(int(s.steps[0]) for s in series)
    hi = max(int(s.steps[-1]) for s in series)
    return go.Scatter(
        x=[lo, hi], y=[y, y], mode="lines", name=name, hoverinfo="skip", line=_REFERENCE
    )


def layer_lines_part(
    run: Run,
    lines: tuple[str, Callable[[np.ndarray], float], str, str],
    y_title: str,
    description: str,
    *,
    reference: tuple[float, str] | None = None,
    total: tuple[str, str] | None = None,
) -> PanelPart | None:
    """A per-layer line row: ``lines`` = ``(prefix, score, by, what)`` as
    :func:`_layer_lines` takes them, the dashed ``total`` = ``(key, label)`` over the
    layers that a detector reads when the run has it, a dotted ``reference`` =
    ``(level, label)`` (a detector's limit), on a log axis when every value drawn is
    positive. None when the run has no such layer."""
    drawn = _layer_lines(run, *lines)
    if drawn is None:
        return None
    traces, series, note = drawn
    if total is not None and total[0] in run:
        overall = _read(run, [total[0]])
        traces += [_line(s, total[1], dash="dash") for s in overall]
        series = [*series, *overall]
    if reference is not None:
        traces = [*traces, reference_line(series, *reference)]
    log = _all_positive(series)
    return PanelPart(
        traces,
        y_title,
        description + note,
        keys=tuple(s.key for s in series),
        y_log=log,
        y_axis=_log_axis(series) if log else {},
    )


def weight_spectral_norm_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``weight_spectrum/spectral_norm/<param>`` per matrix with a dotted reference at 1.

    No median: norms of matrices of different shapes and roles do not pool.
    """
    return layer_lines_part(
        run,
        (SPECTRAL_NORM, np.max, "peak", "σ_0"),
        "spectral norm",
        "Largest singular value per weight matrix. A recurrent one growing far past 1 can "
        "make gradients explode (Pascanu et al. 2013).",
        reference=(1.0, "σ_0 = 1"),
    )


def smoothed_noise_scale(
    trace_cov: Series, grad_sq: Series, *, window: int = NOISE_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [n], B_noise [n])``, ``B_noise = mean(S) / mean(|G|²)`` over the trailing
    ``window`` measurements (fewer at the start) where both are finite.

    McCandlish et al. 2018: ``S`` (``trace_cov``) and ``|G|²`` (``grad_sq``) are unbiased,
    their ratio on one batch is not; averaged before dividing, the bias fades. NaN where
    the window's mean ``|G|²`` is ``<= 0`` (no signal above the noise).
    """
    steps, at_s, at_g = np.intersect1d(trace_cov.steps, grad_sq.steps, return_indices=True)
    s, g = trace_cov.values[at_s], grad_sq.values[at_g]
    keep = np.isfinite(s) & np.isfinite(g)
    steps, s, g = steps[keep], s[keep], g[keep]
    kernel = np.ones(window)
    sum_s = np.convolve(s, kernel)[: s.size]  # [n] trailing sums: the counts cancel
    sum_g = np.convolve(g, kernel)[: g.size]
    return steps, np.divide(sum_s, sum_g, out=np.full(s.size, np.nan), where=sum_g > 0)


NOISE_SCALE_NEEDS = (B_SIMPLE, TRACE_COV, GRAD_SQ, BATCH)


def noise_scale_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grad_noise/b_simple`` per step, the smoothed noise scale and the batch size (dashed).

    Log y when the smoothed scale and the batch size (else ``b_simple``) are all positive;
    per-step values ``<= 0`` are then dropped from the log axis, counted in the legend.
    """
    found = {s.key: s for s in _read(run, [k for k in NOISE_SCALE_NEEDS if k in run])}
    smooth = None
    if TRACE_COV in found and GRAD_SQ in found:
        smooth = Series("smoothed", *smoothed_noise_scale(found[TRACE_COV], found[GRAD_SQ]))
        smooth = smooth if len(smooth) else None
    if smooth is None and B_SIMPLE not in found:
        return None
    reference = [s for s in (smooth, found.get(BATCH)) if s is not None]
    log = _all_positive(reference or [found[B_SIMPLE]])
    traces = [_per_step(found[B_SIMPLE], log=log)] if B_SIMPLE in found else []
    if smooth is not None:
        traces.append(_line(smooth, f"B_noise, ratio of {NOISE_WINDOW}-point means"))
        traces[-1].update(line={"width": 2.6, "color": "#1f77b4"})
    if BATCH in found:
        traces.append(_line(found[BATCH], "batch size", dash="dash"))
        traces[-1].update(line_color="#d62728")
    shown = [s for s in (*reference, found.get(B_SIMPLE)) if s is not None]
    return PanelPart(
        traces,
        "examples",
        "Gradient noise scale (McCandlish et al. 2018): about the batch size past which "
        "larger batches stop paying. Batch far below it: room to grow the batch.",
        keys=tuple(found),
        y_log=log,
        height=1.1,
        y_axis=_log_axis(shown) if log else {},
    )


def _per_step(b_simple: Series, *, log: bool) -> go.Scatter:
    """Thin, light per-step ``B_simple``; on a log axis without its values ``<= 0``."""
    steps, values = b_simple.steps, b_simple.values
    name = "B_simple per step"
    if log:
        dropped = int(np.sum(np.isfinite(values) & (values <= 0)))
        keep = ~(values <= 0)  # NaN stays: a gap
        steps, values = steps[keep], values[keep]
        name += f" ({dropped} ≤ 0 not drawn)" if dropped else ""
    return go.Scatter(
        x=steps,
        y=values,
        name=name,
        mode="lines+markers",
        opacity=0.45,
        line={"width": 1, "color": "#7f7f7f"},
        marker={"size": 3},
        yhoverformat=".4g",
    )
