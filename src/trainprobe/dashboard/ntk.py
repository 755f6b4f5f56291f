"""NTK and gradient-starvation rows: the empirical NTK's alignment with the labels and its
drift (the keys of NTKAlignment), and each input group's attribution share with the
slowest label direction of the initial NTK (FeatureAttribution, NTKResponse)."""

from __future__ import annotations

from plotly.colors import qualitative

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run

from .curves import _coloured, _fraction_floor, _read
from .parts import FRACTION, PanelPart

ALIGNMENT, CHANGE = "ntk/alignment", "ntk/change"
SHARE, MIN_RATIO = "attribution/share", "ntk_response/min_ratio"

NTK_NEEDS = (ALIGNMENT, CHANGE)


def ntk_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``ntk/alignment`` (in ``[-1, 1]``) and ``ntk/change`` (``>= 0``): both unitless
    ratios on one axis. ``ntk/trace`` has units and is left out."""
    series = _read(run, [k for k in NTK_NEEDS if k in run])
    if not series:
        return None
    style = {
        ALIGNMENT: ("NTK alignment", "#2ca02c", None),
        CHANGE: ("NTK change from start", "#9467bd", "dash"),
    }
    return PanelPart(
        [_coloured(s, *style[s.key][:2], dash=style[s.key][2]) for s in series],
        "ratio",
        "Centered alignment of the empirical NTK with the labels, and its relative change "
        "since the first measurement. Both flat: lazy; both rising: rich, feature learning "
        "(Kumar et al. 2024).",
        keys=tuple(s.key for s in series),
    )


STARVATION_NEEDS = (f"{SHARE}/*", MIN_RATIO)


def starvation_panel(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``attribution/share/<group>`` lines in ``[0, 1]`` and ``ntk_response/min_ratio``
    dashed; the axis extends below 0 only if the ratio does (a direction fit backwards)."""
    shares = _read(run, [f"{SHARE}/{g}" for g in run.layers(SHARE)])
    ratio = _read(run, [MIN_RATIO] if MIN_RATIO in run else [])
    if not shares and not ratio:
        return None
    colours = qualitative.Dark2
    traces = [
        _coloured(s, f"share · {s.key[len(SHARE) + 1 :]}", colours[i % len(colours)])
        for i, s in enumerate(shares)
    ]
    if ratio:
        traces.append(_coloured(ratio[0], "NTK response min/max", "#444", dash="dash"))
    return PanelPart(
        traces,
        "share / ratio",
        "Each input group's share of gradient×input; dashed: the slowest label direction "
        "of the initial NTK over the fastest. One stuck near 0: gradient starvation "
        "(Pezeshki et al. 2021).",
        keys=tuple(s.key for s in (*shares, *ratio)),
        y_axis={"range": [_fraction_floor([*shares, *ratio]), FRACTION[1]]},
    )
