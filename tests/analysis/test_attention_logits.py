"""detect_attention_logit_growth on synthetic series: growth past the saturation level
fires with its span, layers and entropy; large-but-steady, one-hot-head and brief
excursions do not."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synth import write_run
from trainprobe.analysis import Severity, analyze, detect_attention_logit_growth

STEPS = np.arange(0, 400, 10)


def _run(tmp_path, top: np.ndarray, *, entropy: np.ndarray | None = None, loss=None):
    series = {
        "attention/max_logit_max": (STEPS, top),
        "attention/max_logit/blocks.0": (STEPS, top),
        "attention/max_logit/blocks.1": (STEPS, np.minimum(top, 30.0)),
    }
    if entropy is not None:
        series["attention/entropy/blocks.0"] = (STEPS, entropy)
        series["attention/entropy/blocks.1"] = (STEPS, np.full(STEPS.size, 1.5))
    if loss is not None:
        series["scalars/loss"] = (STEPS, loss)
    return write_run(tmp_path / "r", series)


def test_logits_growing_into_saturation_are_reported_with_layers_and_entropy(tmp_path):
    top = np.concatenate([[2.0, 50.0], np.geomspace(2e3, 2e5, STEPS.size - 2)])
    entropy = np.concatenate([[2.0, 1.0], np.full(STEPS.size - 2, 1e-6)])
    (finding,) = detect_attention_logit_growth(_run(tmp_path, top, entropy=entropy))
    assert finding.severity == Severity.WARNING
    assert (finding.start_step, finding.end_step) == (20, 390)
    assert finding.evidence["layers"] == "blocks.0"
    assert finding.evidence["lowest_entropy_layer"] == "blocks.0"
    assert finding.evidence["growth"] == pytest.approx(1e5)
    assert "QK-layernorm" in finding.action and "attention/entropy/blocks.0" in finding.keys


def test_a_non_finite_loss_inside_the_span_makes_it_critical(tmp_path):
    top = np.concatenate([[2.0], np.full(STEPS.size - 1, 5e3)])
    loss = np.full(STEPS.size, 2.0)
    loss[30:] = np.nan
    (finding,) = detect_attention_logit_growth(_run(tmp_path, top, loss=loss))
    assert finding.severity == Severity.CRITICAL


@pytest.mark.parametrize(
    "top",
    [
        np.full(STEPS.size, 30.0),  # one-hot previous-token heads: logits of ~30
        np.linspace(4, 210, STEPS.size),  # the borderline rate: ~200, unharmed
        np.full(STEPS.size, 5e3),  # large from the start: not growth
        np.where(np.arange(STEPS.size) % 10 == 5, 5e3, 3.0),  # single excursions
    ],
    ids=["one_hot_heads", "borderline", "large_from_the_start", "brief"],
)
def test_no_finding_without_sustained_growth_past_the_limit(tmp_path, top):
    assert detect_attention_logit_growth(_run(tmp_path, top)) == []


def test_analyze_runs_it_when_the_attention_keys_are_there(tmp_path):
    top = np.concatenate([[2.0], np.full(STEPS.size - 1, 5e3)])
    names = {f.detector for f in analyze(_run(tmp_path, top))}
    assert "attention_logit_growth" in names


def test_bad_thresholds_are_refused(tmp_path):
    run = _run(tmp_path, np.full(STEPS.size, 3.0))
    with pytest.raises(ValueError, match="limit"):
        detect_attention_logit_growth(run, limit=0)
    with pytest.raises(ValueError, match="min_points"):
        detect_attention_logit_growth(run, min_points=0)
