"""Synthetic runs for detector and dashboard tests: series written through the real store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainprobe.store import Record, Run, RunWriter


def write_run(
    run_dir: str | Path,
    series: Mapping[str, tuple[Sequence[int], Sequence[float] | np.ndarray]],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Run:
    """Write ``{key: (steps, values)}`` into a new run and open it read-only.

    Scalar series give ``values`` as ``[n]``; array series as ``[n, ...]``.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for key, (steps, values) in series.items():
        values = np.asarray(values)
        for i, step in enumerate(steps):
            by_step.setdefault(int(step), {})[key] = (
                values[i] if values.ndim > 1 else float(values[i])
            )
    writer = RunWriter(run_dir)
    writer.set_meta(dict(meta or {}))
    writer.append(Record(step, values) for step, values in sorted(by_step.items()))
    writer.close()
    return Run(run_dir)


PARAMS = [
    "features.0.weight",
    "features.0.bias",
    "features.3.weight",
    "encoder.layers.11.self_attention.output_projection.weight",
    "classifier.2.weight",
]
MODULES = ["features.1", "features.4", "classifier.1"]


def full_series(steps: int = 400, every: int = 10, seed: int = 0) -> dict:
    """Every key the dashboard reads, with plausible shapes; a spike around step 0.6 T."""
    rng = np.random.default_rng(seed)
    s = np.arange(steps)
    sched = np.arange(0, steps, every)
    spike = np.where(np.abs(s - int(0.6 * steps)) < 3, 8.0, 1.0)
    series = {
        "scalars/loss": (s, 2.3 * np.exp(-s / (steps / 4)) * spike + 0.05),
        "scalars/accuracy": (s, 1 - 0.9 * np.exp(-s / (steps / 5))),
        "optim/lr/0": (s, 1e-3 * np.minimum(1, (s + 1) / (steps / 10))),
        "nonfinite/loss": (s, (s == int(0.6 * steps)).astype(float)),
        "nonfinite/grad": (s, np.zeros(steps)),
        "nonfinite/param": (s, np.zeros(steps)),
        "nonfinite/first_grad": (s, np.full(steps, -1.0)),  # an index, not a count
        "norms/grad_total": (sched, 1 + rng.random(sched.size)),
        "norms/weight_total": (sched, 20 + sched / steps),
        "updates/ratio_total": (sched, 1e-3 * (1 + rng.random(sched.size))),
    }
    for i, name in enumerate(PARAMS):
        scale = 10.0 ** -(i + 1)
        series[f"norms/grad/{name}"] = (sched, scale * (1 + rng.random(sched.size)))
        series[f"norms/weight/{name}"] = (sched, (i + 1) * (1 + sched / steps))
        series[f"scan/update_norm/{name}"] = (sched[1:], 0.01 * (i + 1) * np.ones(sched.size - 1))
        series[f"updates/ratio/{name}"] = (sched, 10.0 ** (-2 - i / 2) * np.ones(sched.size))
    for i, name in enumerate(MODULES):
        series[f"activations/std/{name}"] = (sched, (0.5**i) * np.ones(sched.size))
        series[f"activations/zero_frac/{name}"] = (sched, np.full(sched.size, 0.3 * i))
    curv = sched[::4]  # the curvature probes run rarely
    sharp = 40.0 * np.minimum(0.2 + curv / (steps / 2), 1.0)
    grid = np.linspace(-1.0, 1.0, 41)[None, :] * (1.0 + curv[:, None] / steps)  # [n, 41]
    series.update(
        {
            "sharpness/lambda_max": (curv, sharp),
            "sharpness/threshold": (curv, np.full(curv.size, 40.0)),
            "hessian/eig_0": (curv, sharp),
            "hessian/eig_1": (curv, sharp / 3),
            "hessian/bottom_0": (curv, -sharp / 40),
            "hessian_trace/trace": (curv, 5 * sharp),
            "hessian_trace/stderr": (curv, sharp / 4),
            "hessian_density/grid": (curv, grid),
            "hessian_density/density": (curv, np.exp(-8.0 * grid**2)),
            "grad_subspace/fraction": (curv, 0.9 - 0.2 * curv / steps),
            # what an offline scan adds: the change since the previous checkpoint
            "scan/update_ratio_total": (sched[1:], 1e-2 * np.ones(sched.size - 1)),
            "scan/update_norm_total": (sched[1:], 0.2 * np.ones(sched.size - 1)),
            "scan/steps_between": (sched[1:], np.full(sched.size - 1, float(every))),
        }
    )
    from tests.test_dashboard_gradients import gradient_series  # lazily: they build on this module
    from tests.test_dashboard_grokking import grok_series

    # three groups, so every conflict row draws; the loss above stays
    series.update({k: v for k, v in gradient_series(sched).items() if not k.startswith("scalars/")})
    series.update(grok_series(sched))
    return series
