"""Per-tensor heatmap rows: gradient norm, weight norm and update ratio per parameter, and
activation std and zero fraction per module (the keys of LayerNorms, UpdateNorms and
ActivationStats), one row per tensor or module and one column per recorded step."""

from __future__ import annotations

import math

from trainprobe.analysis.findings import Finding
from trainprobe.store import Run

from .grid import real_label
from .heatmaps import HeatStyle, heatmap_part
from .parts import HEALTHY_UPDATE_RATIO, PanelPart

GRAD_NORMS, WEIGHT_NORMS = "norms/grad", "norms/weight"
UPDATE_RATIOS = "updates/ratio"
ACTIVATION_STD, ZERO_FRAC = "activations/std", "activations/zero_frac"

RATIO_HALF_DECADES = 2.0
"""Least half-width (decades) of the update-ratio colours around the healthy ratio: full
red at 100x it (1e-1, the update_ratio detector's warning level), full blue at 1/100x."""

GRAD_HEATMAP_NEEDS = (f"{GRAD_NORMS}/*",)


def grad_heatmap(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``norms/grad/<param>``: log colour, exact zeros on the darkest colour."""
    return heatmap_part(
        run,
        GRAD_NORMS,
        HeatStyle("grad norm"),
        "log colour. A dark row is a layer that stopped learning (starved or "
        "dead; darkest = exactly 0); a bright column is a gradient spike.",
    )


WEIGHT_NORM_HEATMAP_NEEDS = (f"{WEIGHT_NORMS}/*",)


def weight_norm_heatmap(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``norms/weight/<param>``: log colour."""
    return heatmap_part(
        run,
        WEIGHT_NORMS,
        HeatStyle("weight norm", colorscale="Viridis"),
        "||w|| per tensor, log colour. A row brightening without end is unchecked weight "
        "growth (more weight decay); a row fading to dark is decay winning over the gradient.",
    )


UPDATE_RATIO_HEATMAP_NEEDS = (f"{UPDATE_RATIOS}/*",)


def update_ratio_heatmap(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``updates/ratio/<param>``: log colour centred (white) on the healthy ratio, at least
    :data:`RATIO_HALF_DECADES` each side."""
    style = HeatStyle(
        "update ratio",
        colorscale="RdBu_r",
        centre=HEALTHY_UPDATE_RATIO,
        min_half_width=RATIO_HALF_DECADES,
    )
    healthy = real_label(math.log10(HEALTHY_UPDATE_RATIO))
    return heatmap_part(
        run,
        UPDATE_RATIOS,
        style,
        f"||Δw||/||w||, log colour; white ≈ {healthy} is healthy, red = steps too "
        "large (lower LR), blue = barely moving, darkest blue = 0 (frozen).",
    )


ACTIVATION_STD_HEATMAP_NEEDS = (f"{ACTIVATION_STD}/*",)


def activation_std_heatmap(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``activations/std/<module>``: log colour."""
    return heatmap_part(
        run,
        ACTIVATION_STD,
        HeatStyle("activation std", colorscale="Cividis"),
        "log colour. Std shrinking with depth = vanishing signal; growing = exploding activations.",
    )


ZERO_FRAC_HEATMAP_NEEDS = (f"{ZERO_FRAC}/*",)


def zero_frac_heatmap(run: Run, findings: tuple[Finding, ...]) -> PanelPart | None:
    """``activations/zero_frac/<module>``: linear colour over [0, 1]."""
    style = HeatStyle(
        "zero fraction", log=False, colorscale="Reds", hover_format=".1%", span=(0.0, 1.0)
    )
    return heatmap_part(
        run,
        ZERO_FRAC,
        style,
        "Fraction of outputs exactly zero (linear colour). Rows near 100% are dead ReLUs.",
    )
