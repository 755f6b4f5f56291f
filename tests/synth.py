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


def declared_meta(*names: str) -> dict[str, Any]:
    """Run metadata naming the built-in probes ``names`` with the keys they declare, as the
    monitor writes it (what the dashboard reads its family notes from)."""
    from trainprobe.probes import PROBES  # torch: only for the tests that need it

    return {
        "probes": [
            {"name": n, "keys": [[k.pattern, k.meaning] for k in PROBES[n].keys]} for n in names
        ]
    }


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

    # three groups, so every conflict row draws; the loss above stays
    series.update({k: v for k, v in gradient_series(sched).items() if not k.startswith("scalars/")})
    series.update(grok_series(sched))
    return series


# the gradient-structure panels' run: three classes, the third a minority losing ground
GRADIENT_STEPS = np.arange(0, 300, 10)  # 30 measurements
GROUPS = ("class_0", "class_1", "class_2")
PAIRS = (("class_0", "class_1"), ("class_0", "class_2"), ("class_1", "class_2"))
GRADIENT_PARAMS = ("encoder.0.weight", "encoder.2.weight", "head.weight")


def pair_cosines(n: int) -> dict[tuple[str, str], np.ndarray]:
    """Class 2 turns against class 0 over training; one NaN (a zero gradient) in 1·2."""
    t = np.linspace(0.0, 1.0, n)
    cos = {PAIRS[0]: 0.6 - 0.2 * t, PAIRS[1]: 0.5 - 1.2 * t, PAIRS[2]: 0.1 + 0.0 * t}
    cos[PAIRS[2]][3] = np.nan
    return cos


def gradient_series(steps: np.ndarray = GRADIENT_STEPS, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = steps.size
    series = {"scalars/loss": (steps, 2.0 * np.exp(-steps / 100.0) + 0.1)}
    for (a, b), cos in pair_cosines(n).items():
        series[f"conflict/cos/{a}__{b}"] = (steps, cos)
    cosines = np.stack(list(pair_cosines(n).values()))  # [pairs, n]
    series["conflict/min_cos"] = (steps, np.nanmin(cosines, 0))
    series["conflict/mean_cos"] = (steps, np.nanmean(cosines, 0))
    series["conflict/frac_negative"] = (steps, (cosines < 0).mean(0))
    for i, group in enumerate(GROUPS):  # class_2, the minority, loses ground after step 100
        rising = 0.7 + 0.8 * np.clip(steps - 100, 0, None) / max(steps[-1], 1)
        series[f"conflict/loss/{group}"] = (steps, rising if i == 2 else 0.7 * np.exp(-steps / 90))
    losses = np.stack([series[f"conflict/loss/{g}"][1] for g in GROUPS])  # [G, n]
    for i, group in enumerate(GROUPS):  # the minority's gradient fades as it loses
        series[f"conflict/loss_share/{group}"] = (steps, losses[i] / losses.sum(0))
        series[f"conflict/count/{group}"] = (steps, np.full(n, 4.0 if i == 2 else 30.0))
        series[f"conflict/norm/{group}"] = (steps, np.exp(-steps / 100) if i == 2 else np.ones(n))
    trace_cov = 50.0 * (1 + 0.3 * rng.random(n))
    grad_sq = 0.5 + 0.2 * rng.random(n)
    grad_sq[5] = -0.2  # |G|² estimate below zero: b_simple negative at that step
    b_simple = trace_cov / grad_sq
    b_simple[7] = np.nan
    series.update(
        {
            "grad_noise/trace_cov": (steps, trace_cov),
            "grad_noise/grad_sq": (steps, grad_sq),
            "grad_noise/b_simple": (steps, b_simple),
            "grad_noise/batch_size": (steps, np.full(n, 32.0)),
        }
    )
    for i, name in enumerate(GRADIENT_PARAMS):
        rank = 1.0 + 40.0 * 0.5**i * np.exp(-steps / 200)
        series[f"grad_spectrum/stable_rank/{name}"] = (steps, rank)
        series[f"grad_spectrum/slow_ratio/{name}"] = (steps, np.full(n, 0.2 * (i + 1)))
        series[f"weight_spectrum/spectral_norm/{name}"] = (steps, 0.8 + 0.5 * i + steps / 300)
    for i, module in enumerate(("encoder.0", "encoder.2", "head")):  # deeper: more gradient
        series[f"grad_flow/norm/{module}"] = (steps, 10.0 ** (i - 2) * (1 + 0.1 * np.sin(steps)))
    fading = 0.5 * np.exp(-steps / 60.0)  # a recurrent encoder losing its early positions
    series["grad_flow/first/rnn"] = (steps, 0.02 * fading)
    series["grad_flow/last/rnn"] = (steps, np.full(n, 0.02))
    series["grad_flow/ratio/rnn"] = (steps, fading)
    for i, layer in enumerate(("blocks.0", "blocks.1")):  # blocks.1's logits grow past 1e3
        series[f"attention/max_logit/{layer}"] = (steps, 3.0 * (1 + i * steps / 10))
        series[f"attention/entropy/{layer}"] = (steps, 2.0 * np.exp(-i * steps / 100))
    for key, level in (("log_z_mean", 3.0), ("log_z_max", 5.0), ("log_z_rms", 3.2), ("max", 9.0)):
        series[f"logits/{key}"] = (steps, level + steps / 100)
    for i, name in enumerate(GRADIENT_PARAMS):
        series[f"adam/grad_to_v/{name}"] = (steps, 1.0 + i * (steps > steps[-1] // 2))
        series[f"adam/eps_shrink/{name}"] = (
            steps,
            np.where(steps > steps[-1] // 2, 0.9 / (1 + i), 1.0),
        )
    series["adam/eps_shrink_total"] = (steps, np.where(steps > steps[-1] // 2, 0.5, 1.0))
    return series


GROK_STEPS = np.arange(0, 2000, 20)  # 100 measurements; fit near step 100, generalised near 1400


def grok_series(steps: np.ndarray = GROK_STEPS) -> dict:
    """A run that grokks: train fit early, held-out accuracy late; every key a row reads."""
    t = steps.astype(float)
    train = 1 - 0.98 * np.exp(-t / 30)
    heldout = 0.02 + 0.98 / (1 + np.exp(-(t - 1300) / 40))
    min_ratio = np.linspace(0.05, 0.8, steps.size)
    min_ratio[3] = -0.4  # a direction fit backwards for a while
    series = {
        "heldout/train_acc": (steps, train),
        "heldout/acc": (steps, heldout),
        "robustness/adv_acc": (steps, 0.5 * heldout),
        "robustness/clean_acc": (steps, heldout),
        "heldout/train_loss": (steps, 3 * np.exp(-t / 40) + 1e-5),
        "heldout/loss": (steps, 4 - 3.5 * heldout),
        "grok/param_norm": (steps, 10 + 80 * np.sqrt(t / t[-1])),
        "grok/softmax_collapse": (steps, np.clip((t - 500) / 1000, 0, 0.3)),
        "grok/nlm_cos": (steps, np.tanh(t / 200) * 0.95),
        "ntk/alignment": (steps, 0.1 + 0.5 * heldout),
        "ntk/change": (steps, t / 1000),
        "ntk/trace": (steps, 1e4 + t),
        "attribution/share/easy": (steps, 0.9 + 0 * t),
        "attribution/share/hard": (steps, 0.1 + 0 * t),
        "attribution/ablation/easy": (steps, 2.0 + 0 * t),
        "ntk_response/dir_0": (steps, 1 + 0 * t),
        "ntk_response/min_ratio": (steps, min_ratio),
    }
    for i, point_set in enumerate(("train", "test", "random")):
        count = 100 + 10 * i + 20 * np.sin(t / 400)
        series[f"regions/{point_set}/total"] = (steps, count)
        series[f"regions/{point_set}/layer/fc.1"] = (steps, count / 2)
    return series
