"""The dashboard's rows, top to bottom: :data:`PANELS`."""

from __future__ import annotations

from functools import partial

from .checkpoints import checkpoint_change_panel, checkpoint_update_heatmap
from .curvature import (
    grad_subspace_panel,
    hessian_density_panel,
    hessian_top_panel,
    hessian_trace_panel,
    sharpness_panel,
)
from .curves import loss_panel, lr_panel, metrics_panel, nonfinite_panel, norms_panel
from .gradients import GRADIENT_PANELS
from .grokking import ANALYSIS_PANELS
from .heatmaps import (
    activation_std_heatmap,
    grad_heatmap,
    update_ratio_heatmap,
    weight_norm_heatmap,
    zero_frac_heatmap,
)
from .marks import findings_timeline
from .other import other_series_panel
from .parts import Panel

_DEDICATED: tuple[Panel, ...] = (
    Panel("findings", "Findings", findings_timeline, ()),
    Panel("loss", "Loss and scalars", loss_panel, ("scalars/*",)),
    Panel("metrics", "Accuracy-like scalars", metrics_panel, ("scalars/*",)),
    Panel("lr", "Learning rate", lr_panel, ("optim/lr/*",)),
    Panel(
        "global_norms",
        "Global norms",
        norms_panel,
        ("norms/grad_total", "norms/weight_total", "updates/ratio_total"),
    ),
    Panel(
        "sharpness",
        "Sharpness and the stability threshold",
        sharpness_panel,
        ("sharpness/lambda_max", "sharpness/threshold"),
    ),
    Panel(
        "hessian_top",
        "Top Hessian eigenvalues",
        hessian_top_panel,
        ("hessian/eig_[0-9]*", "hessian/bottom_[0-9]*"),
    ),
    Panel(
        "hessian_trace",
        "Hessian trace",
        hessian_trace_panel,
        ("hessian_trace/trace", "hessian_trace/stderr"),
    ),
    Panel(
        "grad_subspace",
        "Gradient in the top Hessian eigenspace",
        grad_subspace_panel,
        ("grad_subspace/fraction",),
    ),
    Panel(
        "hessian_density",
        "Hessian spectral density",
        hessian_density_panel,
        ("hessian_density/density", "hessian_density/grid"),
    ),
    Panel("grad_heatmap", "Gradient norm per parameter", grad_heatmap, ("norms/grad/*",)),
    Panel(
        "weight_norm_heatmap",
        "Weight norm per parameter",
        weight_norm_heatmap,
        ("norms/weight/*",),
    ),
    Panel(
        "update_ratio_heatmap",
        "Update / weight ratio per parameter",
        update_ratio_heatmap,
        ("updates/ratio/*",),
    ),
    Panel(
        "checkpoint_change",
        "Change since the previous checkpoint",
        checkpoint_change_panel,
        ("scan/update_ratio_total", "scan/update_norm_total", "scan/steps_between"),
    ),
    Panel(
        "checkpoint_update_heatmap",
        "Change per parameter since the previous checkpoint",
        checkpoint_update_heatmap,
        ("scan/update_norm/*",),
    ),
    Panel(
        "activation_std_heatmap",
        "Activation std per module",
        activation_std_heatmap,
        ("activations/std/*",),
    ),
    Panel(
        "zero_frac_heatmap",
        "Activation zero fraction per module",
        zero_frac_heatmap,
        ("activations/zero_frac/*",),
    ),
    *GRADIENT_PANELS,
    *ANALYSIS_PANELS,
    Panel(
        "nonfinite",
        "Non-finite values",
        nonfinite_panel,
        ("nonfinite/loss", "nonfinite/grad", "nonfinite/param"),
    ),
)

PANELS: tuple[Panel, ...] = (
    *_DEDICATED,
    Panel(
        "other_series",
        "Every other recorded series",
        partial(other_series_panel, covered=tuple(p for d in _DEDICATED for p in d.needs)),
        ("*",),
    ),
)
"""Every panel, in row order. ``findings`` reads no key: it draws the findings passed in.
``other_series`` reads whatever no other row reads, so every recorded series is on the page."""
