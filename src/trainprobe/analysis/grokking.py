"""Grokking: generalisation arriving long after the training set is fit, or not at all."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import Run
from ._checks import check_fraction, check_positive, check_window
from ._series import finite_series, fmt, rolling_median
from .findings import Finding, Severity

NAME = "grokking"
TRAIN = "heldout/train_acc"
HELDOUT = "heldout/acc"
COLLAPSE = "grok/softmax_collapse"
NLM = "grok/nlm_cos"


@dataclass(frozen=True)
class _Curves:
    """Train and held-out accuracy at the steps measuring both, 3-point medians ``[n]``."""

    steps: np.ndarray
    train: np.ndarray
    heldout: np.ndarray


NEEDS = (TRAIN, HELDOUT)
"""Record keys it needs: train and held-out accuracy (the softmax-collapse and NLM
signals are read when present)."""


def detect_grokking(
    run: Run,
    *,
    fit: float = 0.95,
    delay: float = 2.0,
    gap: float = 0.5,
    rise: float = 0.2,
    collapse: float = 0.5,
    nlm: float = 0.9,
    min_points: int = 5,
) -> list[Finding]:
    """The grokking phases from train and held-out accuracy (``HeldOut`` probe keys).

    Power et al. 2022 ("Grokking: generalization beyond overfitting on small algorithmic
    datasets") saw held-out accuracy jump long after the training set was memorised.
    With ``F`` the step at which train accuracy (3-point running median) first reaches
    ``fit``, and ``delay`` the factor that makes an arrival "long after" (``F`` steps
    to fit, then at least ``delay · F`` more), one finding states where the run is:

    - *grokked* (``INFO``): held-out accuracy reached ``fit`` at ``G >= F + delay · F``;
      the evidence gives the delay ``G − F``.
    - *grokking under way* (``INFO``): not yet there, but after a stretch of
      ``delay · F`` steps at its post-fit level it has risen ``rise`` or more.
    - *memorising* (``INFO``): train fit, held-out at least ``gap`` below it for the last
      ``delay · F`` steps and more, not rising.
    - *stalled* (``WARNING``): memorising while ``grok/softmax_collapse`` (the share of
      examples whose floating-point softmax gives zero loss or gradient) reaches
      ``collapse``, or ``grok/nlm_cos`` (the cosine between the descent direction of
      the output layer and its weights: +1 when descent only scales the logits, naive
      loss minimisation) reaches ``nlm``: Prieto et al. 2025, "Grokking
      at the edge of numerical stability", show that these stop grokking.

    An ordinary run whose held-out accuracy follows the train accuracy (within ``gap``,
    or reaching ``fit`` within ``delay · F`` of the fit) gets no finding; neither does a
    run fit before its first measurement (the steps to fit, the yardstick, are unknown).
    Steps to fit count from the first measurement.

    Args:
        run: the run to read (``heldout/train_acc``, ``heldout/acc``; optionally
            ``grok/softmax_collapse`` and ``grok/nlm_cos``).
        fit: accuracy counted as fit (train) or generalised (held-out).
        delay: how many times the steps-to-fit an arrival must trail the fit by.
        gap: train minus held-out accuracy that counts as memorising.
        rise: held-out gain since the plateau that counts as grokking under way.
        collapse: softmax-collapse share that stalls grokking.
        nlm: naive-loss-minimisation cosine named in a stall finding.
        min_points: fewest measurements of both accuracies.

    Returns:
        At most one finding.

    Raises:
        ValueError: a level outside ``[0, 1)``, ``delay <= 0`` or ``min_points < 3``.
    """
    for name, value in (
        ("fit", fit),
        ("gap", gap),
        ("rise", rise),
        ("collapse", collapse),
        ("nlm", nlm),
    ):
        check_fraction(name, value)
    check_positive("delay", delay)
    check_window("min_points", min_points)
    curves = _curves(run, min_points)
    if curves is None:
        return []
    fitted = np.flatnonzero(curves.train >= fit)
    if not fitted.size:
        return []
    fit_at = int(fitted[0])
    if fit_at == 0:
        return []  # fit before the first measurement: the time to fit, the yardstick, is unknown
    fit_step = int(curves.steps[fit_at])
    wait = delay * (fit_step - int(curves.steps[0]))
    settings = {
        "fit": fit,
        "delay": delay,
        "gap": gap,
        "rise": rise,
        "fit_step": fit_step,
        "fit_steps": fit_step - int(curves.steps[0]),
    }
    general = np.flatnonzero(curves.heldout[fit_at:] >= fit)
    if general.size:
        gen_step = int(curves.steps[fit_at + general[0]])
        if gen_step - fit_step < wait:
            return []  # held-out followed the train accuracy: an ordinary run
        return [_grokked(curves, (fit_at, fit_step, wait), gen_step, settings)]
    return _not_yet(run, curves, fit_at, wait, settings, (collapse, nlm))


def _curves(run: Run, min_points: int) -> _Curves | None:
    steps, train = finite_series(run, TRAIN)
    held_steps, heldout = finite_series(run, HELDOUT)
    steps, a, b = np.intersect1d(steps, held_steps, return_indices=True)
    if steps.size < max(min_points, 3):
        return None
    smooth = [np.concatenate([x[:1], rolling_median(x, 3), x[-1:]]) for x in (train[a], heldout[b])]
    return _Curves(steps, smooth[0], smooth[1])


ONSET_SHARE = 0.25
"""Share of the climb from the post-fit plateau to ``fit`` that marks the onset."""


def onset(curves: _Curves, fit_at: int, wait: float, until: int) -> tuple[int, float]:
    """Where the held-out climb began, and the plateau it left: ``plateau`` is the median
    held-out accuracy over the ``wait`` steps after the fit (or up to ``until``), and the
    onset the first measurement from which held-out accuracy stays above ``plateau +
    ONSET_SHARE * (top - plateau)`` through ``until`` (``top`` its value there)."""
    steps, heldout = curves.steps, curves.heldout
    plateau_end = int(np.searchsorted(steps, steps[fit_at] + wait))
    plateau_end = min(max(plateau_end, fit_at + 1), until + 1)
    plateau = float(np.median(heldout[fit_at:plateau_end]))
    level = plateau + ONSET_SHARE * (float(heldout[until]) - plateau)
    below = np.flatnonzero(heldout[fit_at : until + 1] < level)
    first = fit_at + (int(below[-1]) + 1 if below.size else 0)
    return int(steps[min(first, until)]), plateau


def _grokked(
    curves: _Curves, fit: tuple[int, int, float], gen_step: int, settings: dict
) -> Finding:
    fit_at, fit_step, wait = fit
    lag = gen_step - fit_step
    began, plateau = onset(curves, fit_at, wait, int(np.searchsorted(curves.steps, gen_step)))
    return Finding(
        NAME,
        Severity.INFO,
        fit_step,
        gen_step,
        f"Grokked: train accuracy reached {fmt(settings['fit'])} at step {fit_step}, held-out "
        f"accuracy only at step {gen_step}, {lag} steps later ({fmt(lag / settings['fit_steps'])}x "
        f"the steps it took to fit); its climb from {fmt(plateau)} began near step {began}",
        "Generalisation came late: regularisation (weight decay) and more training data "
        "shorten the delay; compare checkpoints before and after it to see what changed.",
        {
            **settings,
            "generalised_step": gen_step,
            "onset_step": began,
            "heldout_at_plateau": plateau,
            "delay_steps": lag,
            "final_heldout_acc": float(curves.heldout[-1]),
        },
        (TRAIN, HELDOUT),
    )


def _not_yet(
    run: Run, curves: _Curves, fit_at: int, wait: float, settings: dict, stall: tuple
) -> list[Finding]:
    steps, heldout = curves.steps, curves.heldout
    fit_step = int(steps[fit_at])
    if steps[-1] - fit_step < wait:
        return []  # too early to tell
    plateau_end = int(np.searchsorted(steps, fit_step + wait))
    plateau = float(np.median(heldout[fit_at : max(plateau_end, fit_at + 1)]))
    last, gap_now = float(heldout[-1]), float(curves.train[-1] - heldout[-1])
    evidence = {
        **settings,
        "heldout_at_plateau": plateau,
        "heldout_last": last,
        "train_last": float(curves.train[-1]),
    }
    end = int(steps[-1])
    if last - plateau >= settings["rise"]:
        began, _ = onset(curves, fit_at, wait, steps.size - 1)
        evidence["onset_step"] = began
        return [
            Finding(
                NAME,
                Severity.INFO,
                fit_step,
                end,
                f"Grokking under way: train fit since step {fit_step}, held-out accuracy rose "
                f"from {fmt(plateau)} to {fmt(last)} long after it, from near step {began}",
                "Keep training: held-out accuracy is still climbing after the fit; the "
                "grokking detector will report the delay once it arrives.",
                evidence,
                (TRAIN, HELDOUT),
            )
        ]
    if gap_now < settings["gap"]:
        return []  # a generalisation gap, not memorisation
    return [_memorising(run, fit_step, end, evidence, stall)]


def _memorising(run: Run, fit_step: int, end: int, evidence: dict, stall: tuple) -> Finding:
    collapse, nlm = stall
    collapsed = _recent_level(run, COLLAPSE, fit_step)
    aligned = _recent_level(run, NLM, fit_step)
    if aligned is not None:
        evidence = {**evidence, "nlm_cos": aligned}
    message = (
        f"Memorising: train fit since step {fit_step}, held-out accuracy still "
        f"{fmt(evidence['heldout_last'])} at step {end}"
    )
    if collapsed is None or collapsed < collapse:
        return Finding(
            NAME,
            Severity.INFO,
            fit_step,
            end,
            message,
            "Held-out accuracy has not followed: add weight decay or data, or train longer "
            "if you expect grokking (it can take many times the steps needed to fit).",
            evidence,
            (TRAIN, HELDOUT),
        )
    nlm_note = f", NLM cosine {fmt(aligned)}" if aligned is not None and aligned >= nlm else ""
    return Finding(
        NAME,
        Severity.WARNING,
        fit_step,
        end,
        f"Grokking stalled: {message[len('Memorising: ') :]}, with softmax collapse on "
        f"{fmt(collapsed)} of the training examples{nlm_note}",
        "Numerical stability blocks generalisation (Prieto et al. 2025): add weight decay, "
        "use a stable softmax alternative (StableMax) or orthogonal-gradient updates (⊥Grad), "
        "or train in float64.",
        {**evidence, "softmax_collapse": collapsed},
        (TRAIN, HELDOUT, *(k for k in (COLLAPSE, NLM) if k in run)),
    )


def _recent_level(run: Run, key: str, since: int) -> float | None:
    """The level of ``key`` at the end of the run: the median of its last tenth (at least 3)
    of measurements since ``since``, or None without any. A collapse that takes over only
    late is where the run is now, which a median over the last quarter would dilute."""
    steps, values = finite_series(run, key)
    recent = values[steps >= since]
    return float(np.median(recent[-max(3, recent.size // 10) :])) if recent.size else None
