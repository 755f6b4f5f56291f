"""Gradient starvation: one predictive feature learned, another left unlearned."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_fraction, check_window
from ._series import finite_series, fmt
from .findings import Finding, Severity

NAME = "gradient_starvation"
SHARE = "attribution/share"
RESPONSE = "ntk_response/min_ratio"


NEEDS = (f"{SHARE}/* | {RESPONSE}",)
"""Record keys it needs: feature attribution shares or the NTK response (either will do)."""


def detect_gradient_starvation(
    run: Run, *, ratio: float = 0.1, tail: float = 0.25, min_points: int = 3
) -> list[Finding]:
    """A feature (or label-carrying direction) learned an order of magnitude less than
    the others until the end of the run (Pezeshki et al. 2021, "Gradient Starvation: A
    Learning Proclivity in Neural Networks").

    Cross-entropy training stops pushing once the examples are fit by the easiest
    feature, so a second feature that also predicts the label stays unlearned: its
    gradient is starved by the first one. A saturated loss or tiny per-example gradients
    do not show this (healthy runs have both); what does, over the last ``tail`` of the
    measured steps (medians, at least ``min_points`` measurements):

    - ``attribution/share/<group>`` (:class:`~trainprobe.probes.FeatureAttribution`): the
      smallest feature group's share of the input-gradient attribution is at most
      ``ratio`` times the largest's, for feature groups you named as predictive
      (``features=``; the probe's default chunks of the input are not read: an
      uninformative chunk would look starved);
    - ``ntk_response/min_ratio`` (:class:`~trainprobe.probes.NTKResponse`): the network's
      response along the weakest label-carrying eigendirection of the initial neural
      tangent kernel, relative to the strongest (each normalised by the label energy in
      it, the paper's Figure 2), is at most ``ratio``.

    One ``WARNING`` with whichever signals fired.

    Args:
        run: the run to read.
        ratio: weakest over strongest that counts as starved (default 0.1: an order of
            magnitude).
        tail: share of the measured steps, at the end, that is read.
        min_points: fewest measurements in the tail.

    Returns:
        At most one finding.

    Raises:
        ValueError: ``ratio`` or ``tail`` outside ``(0, 1)``, ``min_points < 3``.
    """
    for name, value in (("ratio", ratio), ("tail", tail)):
        check_fraction(name, value)
        if value <= 0:
            raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
    check_window("min_points", min_points)
    evidence: dict[str, float | int | str] = {"ratio": ratio, "tail": tail}
    spans, keys, parts = [], [], []
    named = _named_groups(run)
    groups = [f"{SHARE}/{g}" for g in run.layers(SHARE)] if named else []
    shares = _tail_medians(run, groups, tail, min_points)
    if len(shares) >= 2:
        weakest = min(shares, key=lambda k: shares[k][0])
        strongest = max(shares, key=lambda k: shares[k][0])
        low, high = shares[weakest][0], shares[strongest][0]
        if high > 0 and low <= ratio * high:
            name, top = weakest.rsplit("/", 1)[1], strongest.rsplit("/", 1)[1]
            parts.append(
                f"feature group '{name}' gets {fmt(low)} of the attribution against "
                f"{fmt(high)} for '{top}'"
            )
            evidence |= {"starved_group": name, "starved_share": low, "dominant_share": high}
            spans.append(shares[weakest][1])
            keys += [weakest, strongest]
    response = _tail_medians(run, [RESPONSE], tail, min_points)
    if RESPONSE in response and response[RESPONSE][0] <= ratio:
        value, span = response[RESPONSE]
        parts.append(
            f"the weakest label direction of the initial NTK responds {fmt(value)}x "
            "as much as the strongest"
        )
        evidence["ntk_min_ratio"] = value
        spans.append(span)
        keys.append(RESPONSE)
    if not parts:
        return []
    return [
        Finding(
            NAME,
            Severity.WARNING,
            min(s[0] for s in spans),
            max(s[1] for s in spans),
            "Gradient starvation: " + "; ".join(parts) + ", to the end of the run",
            "A dominant feature starves the others: regularise the logits (Pezeshki et al.'s "
            "spectral decoupling, an L2 penalty on the logits), reduce the easy feature's margin "
            "(data augmentation), or reweight the examples it already fits.",
            evidence,
            tuple(keys),
        )
    ]


def _named_groups(run: Run) -> bool:
    """Whether the attribution groups are the user's (``FeatureAttribution(features=...)``,
    predictive by the user's knowledge) rather than its default chunks of the input, where
    an uninformative chunk would look starved. Runs without probe metadata count as named.
    """
    for probe in run.meta.get("probes", []):
        if probe.get("name") == "attribution":
            return probe.get("settings", {}).get("features") is not None
    return True


def _tail_medians(
    run: Run, keys: list[str], tail: float, min_points: int
) -> dict[str, tuple[float, tuple[int, int]]]:
    """``{key: (median over the last tail share, (first, last) step of that tail)}``."""
    out = {}
    for key in keys:
        steps, values = finite_series(run, key)
        if steps.size < min_points:
            continue
        cut = steps[-1] - tail * (steps[-1] - steps[0])
        first = min(int(np.searchsorted(steps, cut)), steps.size - min_points)
        out[key] = (float(np.median(values[first:])), (int(steps[first]), int(steps[-1])))
    return out
