"""Class competition that does harm: a class losing ground, unlearned, or starved of gradient."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import Run
from ._checks import check_count, check_fraction, check_positive, check_window
from ._series import finite_series, fmt, rolling_median, true_runs
from .findings import Finding, Severity

NAME = "class_competition"
LOSS = "conflict/loss"
COUNT = "conflict/count"
NORM = "conflict/norm"
CLASS = "class_"


@dataclass(frozen=True)
class _ClassSeries:
    """One class at the steps where it was measured (arrays ``[n]``)."""

    name: str
    steps: np.ndarray
    loss: np.ndarray
    count: np.ndarray
    norm: np.ndarray


@dataclass(frozen=True)
class _Harm:
    name: str
    kind: str  # "rising", "unlearned" or "starved"
    start_step: int
    end_step: int
    points: int
    evidence: dict


NEEDS = tuple(f"{key}/{CLASS}*" for key in (LOSS, COUNT, NORM))
"""Record keys it needs: the per-class losses, counts and gradient norms of
``GradConflict(by="class")``."""


def detect_class_competition(
    run: Run,
    *,
    window: int = 3,
    rise: float = 0.5,
    minority: float = 0.5,
    fall: float = 0.1,
    min_points: int = 3,
    starve_ratio: float = 0.1,
    min_loss_share: float = 0.1,
    steady: float = 0.1,
    lasting: int = 50,
    top: int = 3,
) -> list[Finding]:
    """Classes that lose the competition for the shared parameters, on evidence of harm.

    Reads the per-class keys of :class:`~trainprobe.probes.GradConflict` with
    ``by="class"``: ``conflict/loss/class_<c>``, ``conflict/count/class_<c>`` and
    ``conflict/norm/class_<c>``. Per-class gradients pointing against each other are
    *not* evidence (every class pushes its own logit up and the others down: cosines
    near −0.9 are normal in healthy balanced training), so this detector looks for harm:

    - *Losing ground* (Francazi et al. 2023, "A Theoretical Analysis of the Learning
      Dynamics under Class Imbalance": under imbalance the minority's loss rises early
      while the total falls, the majority dominating the gradient): a minority class
      (its share of the examples below ``minority / C`` for ``C`` classes; in a
      balanced run a class's loss wobbling against its peers is not this mechanism)
      whose loss (rolling median over ``window`` measurements) is ``rise`` above its
      lowest value so far, by at least ``rise`` times the current batch loss
      ``Σ_c n_c L_c / Σ_c n_c`` (rolling median; so a learned class drifting from
      0.001 to 0.003 does not count), while the batch loss has fallen ``fall`` below
      its value at the class's low; both the rise and the fall must be at least
      ``fall`` times the highest level the batch loss held (its start, as a rule: a
      converged run's class losses wobbling 0.003 -> 0.07 are not a competition), for
      ``min_points`` measurements or more. The early rise is fast: measure every step
      or two over the first hundred steps, on a fixed batch (``GradConflict(data=...)``:
      a minority with a handful of examples per mini-batch gives a per-class loss too
      noisy to read).
    - *Unlearned* (class-specific deterioration): a class, of any share, whose loss rises
      as in *losing ground* (``rise`` above its lowest value, by ``rise`` times the batch
      loss and ``fall`` times the highest level it held) while the loss of the other
      classes (``Σ_{j≠c} n_j L_j / Σ_{j≠c} n_j``, rolling median) stays within ``steady``
      times that rise of its value at the class's low, for ``min_points`` measurements
      spanning ``lasting`` steps or more. The batch loss need not fall: after convergence
      a class whose labels changed (or whose inputs broke) climbs alone while the rest
      stays learned, and the batch loss rises by the class's share of its rise. A global
      deterioration (every class rising, a learning rate too high) is not class-specific
      and is left to the instability detectors; peers trading places early in training
      (one rising while the others fall) are not steady. In the corpus's classification
      runs (balanced, mildly imbalanced, minority and float-floor runs, ``GradConflict``
      every 1 to 10 steps) a class rising with the others steady lasts at most 6
      measurements, 10 steps (a converged balanced class wobbling from 8e-4 to 0.24 and
      back); even with ``steady=1`` at most 18 measurements, 34 steps. The holdout's
      relabelled minority rises 0.81 -> 5.6 over 180 steps (37 measurements) while the
      others move by 0.03; ``lasting=50`` is 5x the corpus's longest.
    - *Starved of gradient*: a class whose share of the gradient's magnitude
      ``n_c ‖g_c‖ / Σ_j n_j ‖g_j‖`` stays below ``starve_ratio`` times its share of the
      loss ``n_c L_c / Σ_j n_j L_j`` while that loss share is at least
      ``min_loss_share``: the class carries a real part of the loss but hardly moves
      the parameters (dead units on its inputs, saturated features). Magnitudes, not
      projections on the update: with anti-aligned classes a projection share swings
      sign in healthy training.

    One ``WARNING`` per kind lists its classes (the longest stretch of each).

    Args:
        run: the run to read.
        window: measurements per rolling median (default 3).
        minority: a class counts as a minority below this share of the average class
            count (default 0.5).
        rise: rise of a class loss over its minimum so far, relative to that minimum and
            to the batch loss then (default 0.5: an oscillating class dips and recovers
            by less).
        fall: relative fall of the batch loss over the same stretch (default 0.1).
        min_points: fewest measurements in a stretch (default 3).
        starve_ratio: gradient share over loss share below which a class is starved.
        min_loss_share: smallest loss share a starved class must carry (default 0.1).
        steady: largest change of the other classes' loss, as a share of the class's
            rise, for the rise to be class-specific (default 0.1).
        lasting: fewest steps an unlearned stretch spans (default 50).
        top: classes named in the message.

    Returns:
        Up to three findings (losing ground, unlearned, starved).

    Raises:
        ValueError: a window below 3 points, ``top < 1``, ``lasting < 1``, a non-positive
            ``rise``, ``fall``, ``starve_ratio`` or ``steady``, or a share outside
            ``[0, 1)``.
        TypeError: a window, ``top`` or ``lasting`` that is not an int.
    """
    check_window("window", window)
    check_window("min_points", min_points)
    check_count("top", top, minimum=1, what="classes named per finding")
    check_count("lasting", lasting, minimum=1, what="steps an unlearned stretch spans")
    for name, value in (
        ("rise", rise),
        ("fall", fall),
        ("starve_ratio", starve_ratio),
        ("steady", steady),
    ):
        check_positive(name, value)
    check_fraction("min_loss_share", min_loss_share)
    check_fraction("fall", fall)
    check_positive("minority", minority)
    classes = _read(run)
    if len(classes) < 2:
        return []
    total_steps, total, counts = _batch_loss(classes)
    harms: list[_Harm] = []
    for cls in classes:
        at = np.searchsorted(total_steps, cls.steps)  # cls.steps is a subset of total_steps
        present = counts[at] > 0  # a class recorded with a count of 0 everywhere: no share
        share = float(np.mean(cls.count[present] / counts[at][present])) if present.any() else 0.0
        if share < minority / len(classes):  # the imbalance mechanism: minorities lose ground
            harms += _losing_ground(cls, total[at], share, window, (rise, fall), min_points)
        others = _others(cls, total[at], counts[at])
        change = (rise, fall, steady)
        harms += _unlearned(cls, total[at], others, window, change, (min_points, lasting))
        harms += _starved(cls, classes, window, starve_ratio, min_loss_share, min_points)
    settings = {
        "window": window,
        "rise": rise,
        "fall": fall,
        "min_points": min_points,
        "starve_ratio": starve_ratio,
        "min_loss_share": min_loss_share,
        "minority": minority,
        "steady": steady,
        "lasting": lasting,
    }
    return [
        _finding(found, top, settings)
        for kind in ("rising", "unlearned", "starved")
        if (found := [h for h in harms if h.kind == kind])
    ]


def _read(run: Run) -> list[_ClassSeries]:
    out = []
    for name in run.layers(LOSS):
        if not name.startswith(CLASS):
            continue
        steps, loss = finite_series(run, f"{LOSS}/{name}")
        parts = [finite_series(run, f"{key}/{name}") for key in (COUNT, NORM)]
        common = np.intersect1d(steps, np.intersect1d(parts[0][0], parts[1][0]))
        if common.size:
            pick = [np.searchsorted(s, common) for s in (steps, parts[0][0], parts[1][0])]
            out.append(
                _ClassSeries(
                    name, common, loss[pick[0]], parts[0][1][pick[1]], parts[1][1][pick[2]]
                )
            )
    return out


def _batch_loss(classes: list[_ClassSeries]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps ``[m]``, the batch loss ``Σ n_c L_c / Σ n_c`` over the classes present, and
    ``Σ n_c`` ``[m]``."""
    steps = np.unique(np.concatenate([c.steps for c in classes]))
    weighted, counts = np.zeros(steps.size), np.zeros(steps.size)
    for c in classes:
        at = np.searchsorted(steps, c.steps)
        weighted[at] += c.count * c.loss
        counts[at] += c.count
    return steps, weighted / np.maximum(counts, 1e-300), counts


def _losing_ground(
    cls: _ClassSeries,
    total: np.ndarray,
    count_share: float,
    window: int,
    change: tuple[float, float],
    points: int,
) -> list[_Harm]:
    rise, fall = change
    if cls.loss.size < window + points - 1:
        return []
    own, batch, _, at_low, grew = _rise(cls, total, window, rise, fall)
    # the batch loss must fall by a share of the highest level it held, so a converged
    # run's noisy per-class losses (1e-6 to 0.5 from step to step while the batch loss
    # wobbles near 0.08) are not a competition
    held = np.maximum.accumulate(batch)  # [m]
    fell = (batch < (1 - fall) * total[at_low]) & (total[at_low] - batch > fall * held)
    harm = grew & fell
    stretch = _longest(harm, points)
    if stretch is None:
        return []
    first, last = stretch
    peak = first + int(np.argmax(own[first : last + 1]))
    start = int(at_low[first])
    evidence = {
        f"loss_low[{cls.name}]": float(cls.loss[start]),
        f"loss_peak[{cls.name}]": float(own[peak]),
        f"batch_loss_at_low[{cls.name}]": float(total[start]),
        f"batch_loss_at_peak[{cls.name}]": float(batch[peak]),
        f"count_share[{cls.name}]": count_share,
    }
    end = int(cls.steps[last + window - 1])  # a rolling median belongs to its window's end
    return [_Harm(cls.name, "rising", int(cls.steps[start]), end, last - first + 1, evidence)]


def _rise(
    cls: _ClassSeries, total: np.ndarray, window: int, rise: float, fall: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The class's rolling-median loss, the batch's, its running low, the raw index of
    that low, and whether the loss has risen (each ``[m]``, ``m = n - window + 1``)."""
    # the current level is a rolling median (one noisy reading is not a rise), the
    # reference the raw running minimum: the early rise can take a single step, which a
    # smoothed reference would already contain
    own, batch = rolling_median(cls.loss, window), rolling_median(total, window)  # [m]
    low = np.minimum.accumulate(cls.loss)[window - 1 :]  # [m]: min over raw[: j + window]
    at_low = _last_minimum(cls.loss)[window - 1 :]  # [m] raw indices
    # the rise must matter next to the batch loss now: a learned class going from 0.001 to
    # 0.003 is a relative rise of 3x that nobody would call losing ground (against the
    # batch loss at the class's low, the inflated loss at initialisation would hide the
    # early minority rise), and next to the highest level the batch loss held. Comparisons
    # are strict: losses sitting at exactly 0 (the float32 floor) neither rise nor fall.
    held = np.maximum.accumulate(batch)  # [m]
    grew = (own > (1 + rise) * low) & (own - low > rise * batch) & (own - low > fall * held)
    return own, batch, low, at_low, grew


def _others(cls: _ClassSeries, total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[n]`` the loss of the other classes, ``Σ_{j≠c} n_j L_j / Σ_{j≠c} n_j`` (NaN where
    no other class was present)."""
    rest = counts - cls.count  # [n]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rest > 0, (total * counts - cls.count * cls.loss) / rest, np.nan)


def _unlearned(
    cls: _ClassSeries,
    total: np.ndarray,
    others: np.ndarray,
    window: int,
    change: tuple[float, float, float],
    length: tuple[int, int],
) -> list[_Harm]:
    """The class-specific rise: the class's loss climbs while the others' stays put."""
    rise, fall, steady = change
    points, lasting = length
    if cls.loss.size < window + points - 1:
        return []
    own, batch, low, at_low, grew = _rise(cls, total, window, rise, fall)
    rest = rolling_median(others, window)  # [m]
    with np.errstate(invalid="ignore"):
        still = np.abs(rest - others[at_low]) <= steady * (own - low)  # NaN: not still
    steps = cls.steps[window - 1 :]  # a rolling median belongs to its window's end
    runs = [
        (a, b)
        for a, b in true_runs(grew & still)
        if b - a + 1 >= points and steps[b] - steps[a] >= lasting
    ]
    if not runs:
        return []
    first, last = max(runs, key=lambda r: r[1] - r[0])
    peak = first + int(np.argmax(own[first : last + 1]))
    start = int(at_low[first])
    # the turn: the last measurement still within the rise of the low (the loss can sit
    # at its low for a long time before the class is unlearned)
    level = np.flatnonzero(cls.loss[: first + window] <= (1 + rise) * low[first])
    turn = int(level[-1]) if level.size else start
    evidence = {
        f"loss_low[{cls.name}]": float(cls.loss[start]),
        f"loss_peak[{cls.name}]": float(own[peak]),
        f"others_loss_at_low[{cls.name}]": float(others[start]),
        f"turn_step[{cls.name}]": int(cls.steps[turn]),
        f"others_loss_at_peak[{cls.name}]": float(rest[peak]),
        f"batch_loss_at_low[{cls.name}]": float(total[start]),
        f"batch_loss_at_peak[{cls.name}]": float(batch[peak]),
    }
    return [
        _Harm(
            cls.name,
            "unlearned",
            int(cls.steps[turn]),
            int(steps[last]),
            last - first + 1,
            evidence,
        )
    ]


def _last_minimum(x: np.ndarray) -> np.ndarray:
    """``[n]``: for each ``j``, the index of the last minimum of ``x[: j + 1]``."""
    out = np.zeros(x.size, dtype=np.int64)
    for j in range(1, x.size):
        out[j] = j if x[j] <= x[out[j - 1]] else out[j - 1]
    return out


def _starved(
    cls: _ClassSeries,
    classes: list[_ClassSeries],
    window: int,
    ratio: float,
    min_share: float,
    points: int,
) -> list[_Harm]:
    grad_total, loss_total = np.zeros(cls.steps.size), np.zeros(cls.steps.size)
    for other in classes:
        _, mine, theirs = np.intersect1d(cls.steps, other.steps, return_indices=True)
        grad_total[mine] += other.count[theirs] * other.norm[theirs]
        loss_total[mine] += other.count[theirs] * other.loss[theirs]
    grad_share = cls.count * cls.norm / np.maximum(grad_total, 1e-300)
    loss_share = cls.count * cls.loss / np.maximum(loss_total, 1e-300)
    if cls.steps.size < window + points - 1:
        return []
    g, share = rolling_median(grad_share, window), rolling_median(loss_share, window)
    stretch = _longest((share >= min_share) & (g <= ratio * share), points)
    if stretch is None:
        return []
    first, last = stretch
    steps = cls.steps[window - 1 :]
    evidence = {
        f"grad_share[{cls.name}]": float(np.median(g[first : last + 1])),
        f"loss_share[{cls.name}]": float(np.median(share[first : last + 1])),
    }
    return [
        _Harm(cls.name, "starved", int(steps[first]), int(steps[last]), last - first + 1, evidence)
    ]


def _longest(mask: np.ndarray, points: int) -> tuple[int, int] | None:
    runs = [(a, b) for a, b in true_runs(mask) if b - a + 1 >= points]
    return max(runs, key=lambda r: r[1] - r[0]) if runs else None


def _finding(harms: list[_Harm], top: int, settings: dict) -> Finding:
    harms = sorted(harms, key=lambda h: -h.points)
    kind = harms[0].kind
    named = ", ".join(f"{h.name} (steps {h.start_step}-{h.end_step})" for h in harms[:top])
    more = f" and {len(harms) - top} more" if len(harms) > top else ""
    if kind == "rising":
        message = (
            f"Class loss rising while the batch loss falls: {named}{more}; the "
            "other classes are learned at these classes' expense"
        )
        action = (
            "Rebalance the classes: oversample them or reweight their loss (e.g. by "
            "inverse frequency), or use a class-balanced loss; per-class gradient "
            "normalisation also counters this early imbalance effect."
        )
    elif kind == "unlearned":
        message = (
            f"Class loss rising while the other classes' loss holds steady: {named}{more}; "
            "the model is unlearning these classes alone (the batch loss rises only by "
            "their share of it)"
        )
        action = (
            "Check these classes' data from the step their loss turned: labels changed or "
            "corrupted (a relabelled or mislabelled shard), inputs shifted or broken by a "
            "pipeline or augmentation change. If the new labels are intended, the model is "
            "unlearning the old ones and this loss should come down."
        )
    else:
        message = (
            f"Classes starved of gradient: {named}{more} carry at least "
            f"{fmt(settings['min_loss_share'])} of the loss but under "
            f"{fmt(settings['starve_ratio'])}x that share of the gradient magnitude"
        )
        action = (
            "Check what blocks their gradient (dead ReLUs or saturated features on "
            "their inputs, a detached branch) and rebalance their loss weight."
        )
    evidence: dict[str, float | int | str] = {"classes": len(harms), **settings}
    for h in harms[:top]:
        evidence.update(h.evidence)
    return Finding(
        NAME,
        Severity.WARNING,
        min(h.start_step for h in harms),
        max(h.end_step for h in harms),
        message,
        action,
        evidence,
        tuple(f"{LOSS}/{h.name}" for h in harms),
    )
