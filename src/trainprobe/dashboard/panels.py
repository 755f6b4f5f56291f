"""The dashboard's rows, top to bottom: :data:`PANELS`.

Each row names its function and the key patterns the function reads. Those patterns are
declared once, beside the function, as ``<NAME>_NEEDS`` (``curves.loss_panel`` ->
``curves.LOSS_NEEDS``, ``layers.grad_heatmap`` -> ``layers.GRAD_HEATMAP_NEEDS``): this
registry references them and spells no key of its own.
"""

from __future__ import annotations

from functools import partial

from . import (
    attention,
    catch_all,
    checkpoints,
    conflict,
    curvature,
    curves,
    density,
    flow,
    gradients,
    grokking,
    groups,
    layers,
    marks,
    ntk,
    regions,
)
from .parts import Panel

GRADIENT_PANELS: tuple[Panel, ...] = (
    Panel(
        "conflict_heatmap",
        "Gradient conflict per group pair",
        conflict.conflict_heatmap_panel,
        conflict.CONFLICT_HEATMAP_NEEDS,
    ),
    Panel(
        "conflict_worst_partner",
        "Worst-conflicting partner per group",
        conflict.cosine_matrix_panel,
        conflict.COSINE_MATRIX_NEEDS,
    ),
    Panel("group_loss", "Loss per group", groups.group_loss_panel, groups.GROUP_LOSS_NEEDS),
    Panel(
        "group_share",
        "Gradient and loss share per group",
        groups.group_share_panel,
        groups.GROUP_SHARE_NEEDS,
    ),
    Panel(
        "conflict_summary",
        "Conflict over all pairs",
        conflict.conflict_summary_panel,
        conflict.CONFLICT_SUMMARY_NEEDS,
    ),
    Panel(
        "noise_scale",
        "Gradient noise scale",
        gradients.noise_scale_panel,
        gradients.NOISE_SCALE_NEEDS,
    ),
    Panel(
        "grad_stable_rank",
        "Gradient stable rank per matrix",
        gradients.stable_rank_heatmap_panel,
        gradients.STABLE_RANK_HEATMAP_NEEDS,
    ),
    Panel(
        "grad_slow_ratio",
        "Slow (EMA) share of each gradient",
        gradients.slow_ratio_panel,
        gradients.SLOW_RATIO_NEEDS,
    ),
    Panel(
        "weight_spectral_norm",
        "Weight spectral norm per matrix",
        gradients.weight_spectral_norm_panel,
        gradients.WEIGHT_SPECTRAL_NORM_NEEDS,
    ),
    Panel("grad_flow", "Gradient reaching each module", flow.grad_flow_panel, flow.GRAD_FLOW_NEEDS),
    Panel(
        "attention_logits",
        "Largest attention logit per layer",
        attention.attention_logits_panel,
        attention.ATTENTION_LOGITS_NEEDS,
    ),
    Panel(
        "attention_entropy",
        "Attention entropy per layer",
        attention.attention_entropy_panel,
        attention.ATTENTION_ENTROPY_NEEDS,
    ),
    Panel(
        "output_logits",
        "Output logits: log Z",
        attention.output_logits_panel,
        attention.OUTPUT_LOGITS_NEEDS,
    ),
    Panel(
        "adam", "Adam: gradient² against second moment", attention.adam_panel, attention.ADAM_NEEDS
    ),
    Panel(
        "adam_eps",
        "Adam: the step ε leaves",
        attention.adam_eps_panel,
        attention.ADAM_EPS_NEEDS,
    ),
    Panel(
        "grad_through_time",
        "Gradient through time",
        flow.grad_through_time_panel,
        flow.GRAD_THROUGH_TIME_NEEDS,
    ),
)
"""The gradient-structure rows (GradConflict, GradNoise, GradSpectrum, WeightSpectrum,
GradientFlow), in
order, after the per-tensor heatmaps."""

ANALYSIS_PANELS: tuple[Panel, ...] = (
    Panel(
        "heldout_accuracy",
        "Train vs held-out accuracy",
        grokking.accuracy_panel,
        grokking.ACCURACY_NEEDS,
    ),
    Panel(
        "heldout_loss",
        "Train vs held-out loss",
        grokking.heldout_loss_panel,
        grokking.HELDOUT_LOSS_NEEDS,
    ),
    Panel(
        "grok_signals",
        "Softmax collapse and NLM cosine",
        grokking.grok_signals_panel,
        grokking.GROK_SIGNALS_NEEDS,
    ),
    Panel("param_norm", "Parameter norm", grokking.param_norm_panel, grokking.PARAM_NORM_NEEDS),
    Panel(
        "local_complexity",
        "Local complexity (linear regions)",
        regions.local_complexity_panel,
        regions.LOCAL_COMPLEXITY_NEEDS,
    ),
    Panel("ntk", "NTK alignment and drift", ntk.ntk_panel, ntk.NTK_NEEDS),
    Panel(
        "starvation",
        "Feature shares and NTK response",
        ntk.starvation_panel,
        ntk.STARVATION_NEEDS,
    ),
)
"""The grokking, local-complexity and starvation rows, in order."""

_DEDICATED: tuple[Panel, ...] = (
    Panel("findings", "Findings", marks.findings_timeline, marks.FINDINGS_TIMELINE_NEEDS),
    Panel("loss", "Loss and scalars", curves.loss_panel, curves.LOSS_NEEDS),
    Panel("metrics", "Accuracy-like scalars", curves.metrics_panel, curves.METRICS_NEEDS),
    Panel("lr", "Learning rate", curves.lr_panel, curves.LR_NEEDS),
    Panel("global_norms", "Global norms", curves.norms_panel, curves.NORMS_NEEDS),
    Panel(
        "sharpness",
        "Sharpness and the stability threshold",
        curvature.sharpness_panel,
        curvature.SHARPNESS_NEEDS,
    ),
    Panel(
        "hessian_top",
        "Top Hessian eigenvalues",
        curvature.hessian_top_panel,
        curvature.HESSIAN_TOP_NEEDS,
    ),
    Panel(
        "hessian_trace",
        "Hessian trace",
        curvature.hessian_trace_panel,
        curvature.HESSIAN_TRACE_NEEDS,
    ),
    Panel(
        "grad_subspace",
        "Gradient in the top Hessian eigenspace",
        curvature.grad_subspace_panel,
        curvature.GRAD_SUBSPACE_NEEDS,
    ),
    Panel(
        "hessian_density",
        "Hessian spectral density",
        density.hessian_density_panel,
        density.HESSIAN_DENSITY_NEEDS,
    ),
    Panel(
        "grad_heatmap",
        "Gradient norm per parameter",
        layers.grad_heatmap,
        layers.GRAD_HEATMAP_NEEDS,
    ),
    Panel(
        "weight_norm_heatmap",
        "Weight norm per parameter",
        layers.weight_norm_heatmap,
        layers.WEIGHT_NORM_HEATMAP_NEEDS,
    ),
    Panel(
        "update_ratio_heatmap",
        "Update / weight ratio per parameter",
        layers.update_ratio_heatmap,
        layers.UPDATE_RATIO_HEATMAP_NEEDS,
    ),
    Panel(
        "checkpoint_change",
        "Change since the previous checkpoint",
        checkpoints.checkpoint_change_panel,
        checkpoints.CHECKPOINT_CHANGE_NEEDS,
    ),
    Panel(
        "checkpoint_update_heatmap",
        "Change per parameter since the previous checkpoint",
        checkpoints.checkpoint_update_heatmap,
        checkpoints.CHECKPOINT_UPDATE_HEATMAP_NEEDS,
    ),
    Panel(
        "activation_std_heatmap",
        "Activation std per module",
        layers.activation_std_heatmap,
        layers.ACTIVATION_STD_HEATMAP_NEEDS,
    ),
    Panel(
        "zero_frac_heatmap",
        "Activation zero fraction per module",
        layers.zero_frac_heatmap,
        layers.ZERO_FRAC_HEATMAP_NEEDS,
    ),
    *GRADIENT_PANELS,
    *ANALYSIS_PANELS,
    Panel("nonfinite", "Non-finite values", curves.nonfinite_panel, curves.NONFINITE_NEEDS),
)

_COVERED = tuple(pattern for panel in _DEDICATED for pattern in panel.needs)

PANELS: tuple[Panel, ...] = (
    *_DEDICATED,
    Panel(
        "other_series",
        "Every other recorded series",
        partial(catch_all.other_series_panel, covered=_COVERED),
        catch_all.OTHER_SERIES_NEEDS,
    ),
)
"""Every panel, in row order. ``findings`` reads no key: it draws the findings passed in.
``other_series`` reads whatever no other row reads, so every recorded series is on the page."""
