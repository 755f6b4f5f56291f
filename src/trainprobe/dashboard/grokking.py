"""Grokking rows: held-out vs train accuracy with the grokking phases, held-out loss, the
softmax-collapse and NLM signals and the parameter norm (the keys of HeldOut, Robustness's
adversarial accuracy and GrokSignals). Local complexity is in :mod:`.regions`, the NTK and
feature attribution in :mod:`.ntk`.

Every trace name carries its quantity (``"held-out acc"``, ``"regions · train"``): the
dashboard has one legend per row, but a name must still say what it is on its own.
"""

from __future__ import annotations

import plotly.graph_objects as go

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run, Series

from .curves import _all_positive, _coloured, _fraction_floor, _log_axis, _read
from .parts import FRACTION, HELDOUT_COLOUR, TRAIN_COLOUR, PanelPart

TRAIN_ACC, HELDOUT_ACC, ADV_ACC = "heldout/train_acc", "heldout/acc", "robustness/adv_acc"
TRAIN_LOSS, HELDOUT_LOSS = "heldout/train_loss", "heldout/loss"
PARAM_NORM, COLLAPSE, NLM = "grok/param_norm", "grok/softmax_collapse", "grok/nlm_cos"

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


def _step_range(series: list[Series]) -> tuple[int, int]:
    return min(int(s.steps[0]) for s in series), max(int(s.steps[-1]) for s in series)


def _band(x0: float, x1: float, name: str, **fill) -> go.Scatter:
    """A filled rectangle over steps ``[x0, x1]`` and the whole ``[0, 1]`` axis."""
    lo, hi = FRACTION
    return go.Scatter(
        x=[x0, x0, x1, x1, x0],
        y=[lo, hi, hi, lo, lo],
        name=name,
        mode="lines",
        fill="toself",
        line={"width": 0},
        hoverinfo="skip",
        **fill,
    )


def _step_mark(step: int, name: str, colour: str) -> go.Scatter:
    """A dotted vertical line at ``step`` across the ``[0, 1]`` axis."""
    return go.Scatter(
        x=[step, step],
        y=list(FRACTION),
        name=name,
        mode="lines",
        line={"width": 1.5, "dash": "dot", "color": colour},
        hoverinfo="skip",
    )


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
    label = next(
        (name for opening, name in _MEMORISATION if finding.message.startswith(opening)),
        "memorisation",
    )
    traces = []
    if fit > first:
        traces.append(_band(first, fit, "phase · fitting", fillcolor=PHASE_FILLS["fitting"]))
    if end > fit:
        pattern = {"shape": "/", "fgcolor": MEMORISING_COLOUR, "size": 9, "solidity": 0.15}
        traces.append(
            _band(fit, end, f"phase · {label}", fillcolor="rgba(0,0,0,0)", fillpattern=pattern)
        )
    if grokked and last > end:
        traces.append(_band(end, last, "phase · generalised", fillcolor=PHASE_FILLS["generalised"]))
    traces.append(_step_mark(fit, f"fit · step {fit}", "#444"))
    if grokked:
        traces.append(_step_mark(end, f"generalised · step {end}", "#2ca02c"))
    return traces


ACCURACY_NEEDS = (TRAIN_ACC, HELDOUT_ACC, ADV_ACC)


def accuracy_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``heldout/train_acc`` and ``heldout/acc`` on ``[0, 1]``, ``robustness/adv_acc``
    dashed, behind them the phases of the first ``grokking`` finding
    (:func:`grokking_phases`)."""
    series = _read(run, [k for k in ACCURACY_NEEDS if k in run])
    if not series:
        return None
    style = {
        TRAIN_ACC: ("train acc", TRAIN_COLOUR, None),
        HELDOUT_ACC: ("held-out acc", HELDOUT_COLOUR, None),
        ADV_ACC: ("adversarial acc", "#9467bd", "dash"),
    }
    lines = [_coloured(s, *style[s.key][:2], dash=style[s.key][2]) for s in series]
    grok = next((f for f in findings if f.detector == GROKKING), None)
    phases = [] if grok is None else grokking_phases(grok, _step_range(series))
    note = " Hatched: memorisation, fit to generalisation (dotted)." if phases else ""
    return PanelPart(
        (*phases, *lines),
        "accuracy",
        "Accuracy on a fixed train batch and on held-out data, same eval mode. Held-out "
        "rising long after train reaches 1 is grokking." + note,
        keys=tuple(s.key for s in series),
        height=1.2,
        y_axis={"range": list(FRACTION)},
    )


HELDOUT_LOSS_NEEDS = (TRAIN_LOSS, HELDOUT_LOSS)


def heldout_loss_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``heldout/train_loss`` and ``heldout/loss``; log y when every value is positive."""
    series = _read(run, [k for k in HELDOUT_LOSS_NEEDS if k in run])
    if not series:
        return None
    style = {
        TRAIN_LOSS: ("train loss", TRAIN_COLOUR),
        HELDOUT_LOSS: ("held-out loss", HELDOUT_COLOUR),
    }
    log = _all_positive(series)
    return PanelPart(
        [_coloured(s, *style[s.key]) for s in series],
        "loss",
        "Loss on the same fixed batches. Held-out loss climbing while train loss falls: "
        "memorisation; its later fall comes with grokking.",
        keys=tuple(s.key for s in series),
        y_log=log,
        y_axis=_log_axis(series) if log else {},
    )


GROK_SIGNALS_NEEDS = (COLLAPSE, NLM)


def grok_signals_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grok/softmax_collapse`` (a fraction) and ``grok/nlm_cos`` (a cosine) on one axis:
    both unitless. Fixed at the top (1) so that a level reads the same in any run; down
    to 0, or below it as far as the cosine goes (:func:`.curves._fraction_floor`)."""
    series = _read(run, [k for k in GROK_SIGNALS_NEEDS if k in run])
    if not series:
        return None
    style = {COLLAPSE: ("softmax collapse", "#d62728"), NLM: ("NLM cosine", "#8c564b")}
    return PanelPart(
        [_coloured(s, *style[s.key]) for s in series],
        "fraction / cosine",
        "Train examples whose softmax rounds to zero loss or gradient; cos(−∇L, θ) of the "
        "output layer (1: descent only inflates logits). Collapse while memorising stalls "
        "grokking (Prieto et al. 2025).",
        keys=tuple(s.key for s in series),
        y_axis={"range": [_fraction_floor(series), FRACTION[1]]},
    )


PARAM_NORM_NEEDS = (PARAM_NORM,)


def param_norm_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``grok/param_norm`` in its own small row: a norm in parameter units, not a fraction,
    so it would need rescaling to share the signals' axis, and the hover would lose it."""
    series = _read(run, [PARAM_NORM] if PARAM_NORM in run else [])
    if not series:
        return None
    return PanelPart(
        [_coloured(series[0], "param norm", "#17becf")],
        "‖w‖₂",
        "L2 norm of all trainable parameters. Growth while memorising, then a fall under "
        "weight decay, goes with grokking (Liu et al. 2023, Omnigrok).",
        keys=PARAM_NORM_NEEDS,
        height=0.7,
        y_axis={"rangemode": "tozero"},
    )
