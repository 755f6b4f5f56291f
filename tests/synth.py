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
