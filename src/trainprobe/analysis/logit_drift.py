"""Output-logit drift: ``log Z = logsumexp(logits)`` moving steadily away from its early
level, every logit with it (Wortsman et al. 2023; Stollenwerk et al. 2026)."""

from __future__ import annotations

import numpy as np

from ..store import Run
from ._checks import check_count, check_positive
from ._series import finite_series, fmt, true_runs
from .findings import Finding, Severity

NAME = "output_logit_drift"
KEY = "logits/log_z_mean"

LIMIT = 20.0
"""The default drift of mean log Z, in nats, read as a drift (see
:func:`detect_output_logit_drift`)."""

NEEDS = (KEY,)
"""Record keys it needs: ``OutputLogits``' mean log Z."""


def detect_output_logit_drift(
    run: Run, *, limit: float = LIMIT, early: int = 3, min_points: int = 5
) -> list[Finding]:
    """The output logits drifting together: mean ``log Z`` ``limit`` nats or more from its
    early level, and still there at the end of the run.

    The cross-entropy is unchanged when every logit moves by the same amount, so nothing
    in its gradient holds their common level: with Adam, whose per-coordinate steps move
    the rarely seen tokens' output embeddings at full rate, the mean output embedding
    ``μ`` grows and every logit drifts with ``μ · h`` (Stollenwerk et al. 2026). Large
    models at high learning rates then diverge, the logits very negative first
    (Wortsman et al. 2023, §3.2); PaLM and OLMo 2 add a z-loss ``1e-4 · (log Z)²``
    against it. In float32 the drift alone costs nothing; in bfloat16 each logit is
    rounded to a step that doubles with every doubling of its size.

    Reported (``INFO``) where the median of the last ``min_points`` measurements and each
    of them lie ``limit`` nats or more from the median of the first ``early`` ones, on the
    same side. Info, not a warning: on the corpus decoders (``benchmarks/corpus/
    logit_drift_cases.py``, 3 seeds) a drift of 45-48 nats left the loss within 0.02 nats
    of the z-loss remedy's at the same rate, so no harm of it has been measured here; at
    scale it is where divergence starts. Thresholds from those runs: the drifting
    decoders moved 45-48 nats, the remedy (a z-loss of 1e-3) 9-12 and the control under
    1; the 33 other corpus decoders at most 1.8.

    Args:
        run: the run to read.
        limit: the drift in nats (default 20: above the remedy's 12, under half the
            drifting runs' 45).
        early: leading measurements that set the early level (default 3).
        min_points: trailing measurements that must all be past ``limit`` (default 5).
    """
    check_positive("limit", limit)
    check_count("early", early, minimum=1, what="leading measurements")
    check_count("min_points", min_points, minimum=1, what="trailing measurements")
    steps, values = finite_series(run, KEY)
    if values.size < early + min_points:
        return []
    start_level = float(np.median(values[:early]))
    shift = values - start_level  # [n]
    end_shift = float(np.median(shift[-min_points:]))
    side = np.sign(end_shift)
    past = side * shift >= limit  # [n]
    if not past[-min_points:].all():
        return []
    first = true_runs(past)[-1][0]  # the stretch that reaches the end
    left = _left_level(shift, first, side, limit)
    start, end = int(steps[left]), int(steps[-1])
    span = steps[left:]
    rate = float(np.polyfit(span, values[left:], 1)[0]) * 1000 if span.size > 1 else 0.0
    final = float(np.median(values[-min_points:]))
    direction = "below" if side < 0 else "above"
    evidence: dict[str, float | int | str] = {
        "early_log_z": start_level,
        "final_log_z": final,
        "drift": end_shift,
        "per_1000_steps": rate,
        "limit": limit,
        "past_limit_from": int(steps[first]),
    }
    return [
        Finding(
            detector=NAME,
            severity=Severity.INFO,
            start_step=start,
            end_step=end,
            message=(
                f"the output logits drifted together: mean log Z went from {fmt(start_level)} "
                f"to {fmt(final)}, {fmt(abs(end_shift))} nats {direction} its early level "
                f"({fmt(rate)} per 1000 steps from step {start}). The loss cannot see a "
                "common shift, but at scale this drift precedes output-logit divergence, and "
                "in bfloat16 the logits lose precision as they grow"
            ),
            action=(
                "add a z-loss (1e-4 · (log Z)², as PaLM and OLMo 2; 1e-3 held it within "
                "2 nats on the corpus decoder where 1e-4 only slowed it), or centre the "
                "output embeddings after each step, or give the final norm a gain"
            ),
            evidence=evidence,
            keys=(KEY,),
        )
    ]


def _left_level(shift: np.ndarray, first: int, side: float, limit: float) -> int:
    """Where the drift that passed ``limit`` at index ``first`` began: the last index
    before it still within a quarter of ``limit`` of the early level (0 when none)."""
    near = np.nonzero(side * shift[: first + 1] < limit / 4)[0]
    return int(near[-1]) if near.size else 0
