"""Grokking, local-complexity and starvation rows: held-out vs train accuracy with the
grokking phases, held-out loss, the softmax-collapse and NLM signals, the parameter norm,
local complexity, the NTK and feature attribution (the keys of HeldOut, Robustness,
GrokSignals, LocalComplexity, NTKAlignment, FeatureAttribution and NTKResponse).
:data:`ANALYSIS_PANELS` lists them, in row order.

Every trace name carries its quantity (``"held-out acc"``, ``"regions · train"``): the
dashboard has one legend per row, but a name must still say what it is on its own.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run, Series

from .curves import _all_positive, _line, _log_axis, _read
from .parts import Panel, PanelPart

TRAIN_ACC, HELDOUT_ACC, ADV_ACC = "heldout/train_acc", "heldout/acc", "robustness/adv_acc"
TRAIN_LOSS, HELDOUT_LOSS = "heldout/train_loss", "heldout/loss"
PARAM_NORM, COLLAPSE, NLM = "grok/param_norm", "grok/softmax_collapse", "grok/nlm_cos"
REGION_SETS = ("train", "test", "random")
ALIGNMENT, CHANGE = "ntk/alignment", "ntk/change"
SHARE, MIN_RATIO = "attribution/share", "ntk_response/min_ratio"

TRAIN_COLOUR, HELDOUT_COLOUR = "#1f77b4", "#ff7f0e"
SET_COLOURS = {"train": TRAIN_COLOUR, "test": HELDOUT_COLOUR, "random": "#7f7f7f"}
"""One colour per point set, the same as train / held-out accuracy: test points are held out."""
FRACTION = (-0.03, 1.03)
"""The y range of rows in ``[0, 1]`` (a margin so that 0 and 1 stay visible)."""

PHASE_FILLS = {"fitting": "rgba(127,127,127,0.16)", "generalised": "rgba(44,160,44,0.16)"}
MEMORISING_COLOUR = "#d62728"
"""The memorisation band is hatched in this colour, so that it still reads over the
finding's own span, which the dashboard shades on every row (:func:`.marks.draw_spans`)."""
GROKKING = "grokking"
_MEMORISATION = (
    ("Grokked", "memorisation"),
    ("Grokking under way", "memorisation, held-out rising"),
    ("Grokking stalled", "memorisation, stalled"),
    ("Memorising", "memorisation"),
)  # the grokking detector's message openings -> the band's name


def _coloured(series: Series, name: str, colour: str, *, dash: str | None = None) -> go.Scatter:
    trace = _line(series, name, dash=dash)
    trace.update(line_color=colour)
    return trace


def _step_range(series: list[Series]) -> tuple[int, int]:
    return min(int(s.steps[0]) for s in series), max(int(s.steps[-1]) for s in series)


def _floor(series: list[Series]) -> float:
    """The bottom of a ``[0, 1]``-like axis: ``FRACTION[0]``, or lower to show the lowest
    finite value (a cosine or a ratio below 0)."""
    values = np.concatenate([s.values for s in series])
    values = values[np.isfinite(values)]
    return min(FRACTION[0], float(values.min()) - 0.03) if values.size else FRACTION[0]


def _band(x0: float, x1: float, name: str, **fill) -> go.Scatter:
    """A filled rectangle over steps ``[x0, x1]`` and the whole ``[0, 1]`` axis."""
    lo, hi = FRACTION
    return go.Scatter(x=[x0, x0, x1, x1, x0], y=[lo, hi, hi, lo, lo], name=name,
                      mode="lines", fill="toself", line={"width": 0}, hoverinfo="skip",
                      **fill)  # fmt: skip


def _step_mark(step: int, name: str, colour: str) -> go.Scatter:
    """A dotted vertical line at ``step`` across the ``[0, 1]`` axis."""
    return go.Scatter(x=[step, step], y=list(FRACTION), name=name, mode="lines",
                      line={"width": 1.5, "dash": "dot", "color": colour},
                      hoverinfo="skip")  # fmt: skip


def grokking_phases(finding: Finding, extent: tuple[int, int]) -> list[go.Scatter]:
    """Bands and step marks of the grokking phases of ``finding`` over ``extent`` (steps).

    The detector's span runs from the fit step ``F`` to the generalisation step ``G``
    (message ``"Grokked..."``) or to the last step (under way, memorising, stalled).
    Bands: *fitting* from the first step to ``F``, *memorisation* from ``F`` to the span's
    end (hatched), *generalised* from ``G`` to the last step (grokked only); dotted marks
    at ``F`` and ``G``. Empty bands are left out.
    """
    first, last = extent
    fit, end = finding.start_step, finding.end_step
    grokked = finding.message.startswith("Grokked")
    label = next((name for opening, name in _MEMORISATION
                  if finding.message.startswith(opening)), "memorisation")  # fmt: skip
    traces = []
    if fit > first:
        traces.append(_band(first, fit, "phase · fitting", fillcolor=PHASE_FILLS["fitting"]))
    if end > fit:
        pattern = {"shape": "/", "fgcolor": MEMORISING_COLOUR, "size": 9, "solidity": 0.15}
        traces.append(_band(fit, end, f"phase · {label}", fillcolor="rgba(0,0,0,0)",
                            fillpattern=pattern))  # fmt: skip
    if grokked and last > end:
        traces.append(_band(end, last, "phase · generalised",
                            fillcolor=PHASE_FILLS["generalised"]))  # fmt: skip
    traces.append(_step_mark(fit, f"fit · step {fit}", "#444"))
    if grokked:
        traces.append(_step_mark(end, f"generalised · step {end}", "#2ca02c"))
    return traces


def accuracy_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``heldout/train_acc`` and ``heldout/acc`` on ``[0, 1]``, ``robustness/adv_acc``
    dashed, behind them the phases of the first ``grokking`` finding
    (:func:`grokking_phases`)."""
    series = _read(run, [k for k in (TRAIN_ACC, HELDOUT_ACC, ADV_ACC) if k in run])
    if not series:
        return None
    style = {TRAIN_ACC: ("train acc", TRAIN_COLOUR, None),
             HELDOUT_ACC: ("held-out acc", HELDOUT_COLOUR, None),
             ADV_ACC: ("adversarial acc", "#9467bd", "dash")}  # fmt: skip
    lines = [_coloured(s, *style[s.key][:2], dash=style[s.key][2]) for s in series]
    grok = next((f for f in findings if f.detector == GROKKING), None)
    phases = [] if grok is None else grokking_phases(grok, _step_range(series))
    note = " Hatched: memorisation, fit to generalisation (dotted)." if phases else ""
    return PanelPart(
        (*phases, *lines), "accuracy",
        "Accuracy on a fixed train batch and on held-out data, same eval mode. Held-out "
        "rising long after train reaches 1 is grokking." + note,
        keys=tuple(s.key for s in series), height=1.2, y_axis={"range": list(FRACTION)},
    )  # fmt: skip


def heldout_loss_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``heldout/train_loss`` and ``heldout/loss``; log y when every value is positive."""
    series = _read(run, [k for k in (TRAIN_LOSS, HELDOUT_LOSS) if k in run])
    if not series:
        return None
    style = {TRAIN_LOSS: ("train loss", TRAIN_COLOUR),
             HELDOUT_LOSS: ("held-out loss", HELDOUT_COLOUR)}  # fmt: skip
    log = _all_positive(series)
    return PanelPart(
        [_coloured(s, *style[s.key]) for s in series], "loss",
        "Loss on the same fixed batches. Held-out loss climbing while train loss falls: "
        "memorisation; its later fall comes with grokking.",
        keys=tuple(s.key for s in series), y_log=log, y_axis=_log_axis(series) if log else {},
    )  # fmt: skip


def grok_signals_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grok/softmax_collapse`` (a fraction) and ``grok/nlm_cos`` (a cosine) on one axis:
    both unitless. Fixed at the top (1) so that a level reads the same in any run; down
    to 0, or below it as far as the cosine goes (:func:`_floor`)."""
    series = _read(run, [k for k in (COLLAPSE, NLM) if k in run])
    if not series:
        return None
    style = {COLLAPSE: ("softmax collapse", "#d62728"), NLM: ("NLM cosine", "#8c564b")}
    return PanelPart(
        [_coloured(s, *style[s.key]) for s in series], "fraction / cosine",
        "Train examples whose softmax rounds to zero loss or gradient; cos(−∇L, θ) of the "
        "output layer (1: descent only inflates logits). Collapse while memorising stalls "
        "grokking (Prieto et al. 2025).",
        keys=tuple(s.key for s in series), y_axis={"range": [_floor(series), FRACTION[1]]},
    )  # fmt: skip


def param_norm_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grok/param_norm`` in its own small row: a norm in parameter units, not a fraction,
    so it would need rescaling to share the signals' axis, and the hover would lose it."""
    series = _read(run, [PARAM_NORM] if PARAM_NORM in run else [])
    if not series:
        return None
    return PanelPart(
        [_coloured(series[0], "param norm", "#17becf")], "‖w‖₂",
        "L2 norm of all trainable parameters. Growth while memorising, then a fall under "
        "weight decay, goes with grokking (Liu et al. 2023, Omnigrok).",
        keys=(PARAM_NORM,), height=0.7, y_axis={"rangemode": "tozero"},
    )  # fmt: skip


def local_complexity_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``regions/<set>/total`` for train, test and random points, one colour per set
    (:data:`SET_COLOURS`); markers show the (usually log-spaced) measurements."""
    keys = [f"regions/{s}/total" for s in REGION_SETS]
    series = _read(run, [k for k in keys if k in run])
    if not series:
        return None
    traces = []
    for s in series:
        point_set = s.key.split("/")[1]
        traces.append(_coloured(s, f"regions · {point_set}", SET_COLOURS[point_set]))
        traces[-1].update(mode="lines+markers", marker={"size": 4})
    return PanelPart(
        traces, "neurons cut",
        "Neurons whose ReLU state changes near each point (mean over the set). Falling "
        "near train points: regions migrate away from the data, as the network groks "
        "(Humayun et al. 2024).",
        keys=tuple(s.key for s in series),
    )  # fmt: skip


def ntk_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``ntk/alignment`` (in ``[-1, 1]``) and ``ntk/change`` (``>= 0``): both unitless
    ratios on one axis. ``ntk/trace`` has units and is left out."""
    series = _read(run, [k for k in (ALIGNMENT, CHANGE) if k in run])
    if not series:
        return None
    style = {ALIGNMENT: ("NTK alignment", "#2ca02c", None),
             CHANGE: ("NTK change from start", "#9467bd", "dash")}  # fmt: skip
    return PanelPart(
        [_coloured(s, *style[s.key][:2], dash=style[s.key][2]) for s in series], "ratio",
        "Centered alignment of the empirical NTK with the labels, and its relative change "
        "since the first measurement. Both flat: lazy; both rising: rich, feature learning "
        "(Kumar et al. 2024).",
        keys=tuple(s.key for s in series),
    )  # fmt: skip


def starvation_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``attribution/share/<group>`` lines in ``[0, 1]`` and ``ntk_response/min_ratio``
    dashed; the axis extends below 0 only if the ratio does (a direction fit backwards)."""
    shares = _read(run, [f"{SHARE}/{g}" for g in run.layers(SHARE)])
    ratio = _read(run, [MIN_RATIO] if MIN_RATIO in run else [])
    if not shares and not ratio:
        return None
    colours = qualitative.Dark2
    traces = [_coloured(s, f"share · {s.key[len(SHARE) + 1 :]}", colours[i % len(colours)])
              for i, s in enumerate(shares)]  # fmt: skip
    if ratio:
        traces.append(_coloured(ratio[0], "NTK response min/max", "#444", dash="dash"))
    return PanelPart(
        traces, "share / ratio",
        "Each input group's share of gradient×input; dashed: the slowest label direction "
        "of the initial NTK over the fastest. One stuck near 0: gradient starvation "
        "(Pezeshki et al. 2021).",
        keys=tuple(s.key for s in (*shares, *ratio)),
        y_axis={"range": [_floor([*shares, *ratio]), FRACTION[1]]},
    )  # fmt: skip


ANALYSIS_PANELS: tuple[Panel, ...] = (
    Panel("heldout_accuracy", "Train vs held-out accuracy", accuracy_panel,
          (TRAIN_ACC, HELDOUT_ACC, ADV_ACC)),
    Panel("heldout_loss", "Train vs held-out loss", heldout_loss_panel,
          (TRAIN_LOSS, HELDOUT_LOSS)),
    Panel("grok_signals", "Softmax collapse and NLM cosine", grok_signals_panel,
          (COLLAPSE, NLM)),
    Panel("param_norm", "Parameter norm", param_norm_panel, (PARAM_NORM,)),
    Panel("local_complexity", "Local complexity (linear regions)", local_complexity_panel,
          ("regions/*/total",)),  # one glob: a run may record any of the sets
    Panel("ntk", "NTK alignment and drift", ntk_panel, (ALIGNMENT, CHANGE)),
    Panel("starvation", "Feature shares and NTK response", starvation_panel,
          (f"{SHARE}/*", MIN_RATIO)),
)  # fmt: skip
"""The grokking, local-complexity and starvation rows, in order, for
:data:`~trainprobe.dashboard.panels.PANELS`."""
