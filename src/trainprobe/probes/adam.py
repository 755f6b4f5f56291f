"""Adam's health per parameter tensor: ε against the second moment, the gradient against
its running average, and the size of the normalised step.

Adam moves each weight by ``lr · m̂ / (√v̂ + ε)``. Three things go wrong quietly:

- **ε domination** (Everett et al. 2024, *Scaling Exponents Across Parameterizations
  and Optimizers*, §4): where ``√v̂`` is at or below ``ε``, the step is about
  ``lr · m̂ / ε``, no longer Adam's normalised one: a tensor whose gradients are small
  (wide layers, late training, a large ``ε``) trains like SGD with a tiny rate;
- **a gradient far above its second moment**: ``g² / v̂`` is about 1 in steady
  training and bounded by ``1 / (1 − β₂)`` right after a step; a jump means the
  gradient grew faster than ``v̂`` can follow (``β₂`` = 0.999 averages over ~1000
  steps), the situation in which loss spikes start (Wortsman et al. 2023, *Small-scale
  proxies for large-scale Transformer training instabilities*, §3.4; the OLMo 2 report);
- **the normalised step's size**: the RMS of ``m̂ / (√v̂ + ε)`` is 1 for a sign-coherent
  gradient and falls as its direction turns noisy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..functional.shards import local_part
from ..keys import Key
from .base import PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every

MAX_ELEMENTS = 1 << 16
"""Leading elements of each tensor the statistics read (an unbiased sample of a tensor
whose layout carries no meaning for them), so a due step costs a few small ops per
tensor however large the model."""


@dataclass(frozen=True, kw_only=True, eq=False)
class AdamHealth(ProbeOptions):
    """ε domination, gradient against second moment and step size of Adam or AdamW, per
    parameter tensor (module doc). Any optimizer whose state holds ``exp_avg``,
    ``exp_avg_sq`` and ``step`` is read the same way (NAdam and RAdam too, though their
    steps differ from Adam's, so ``update_rms`` is Adam's step for their moments).

    Read when the step block ends, from the first ``max_elements`` elements of each
    tensor: after ``opt.step()`` when the loop steps inside the block (the state then
    includes this step's gradient, and ``g² / v̂ <= 1 / (1 − β₂)``), else before it
    (``g² / v̂`` then compares the new gradient with the history alone). Parameters the
    optimizer has no state for yet (before its first step) get no keys; an optimizer
    without Adam's state gives none at all.

    Keys: see ``keys``.

    Args:
        max_elements: elements of each tensor read (None: all).
        schedule: when to measure (default every 10 steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "adam"
    schedule: Schedule = every(10)
    across_ranks = "same"  # DDP: replicated state; FSDP2: this rank's shard (a sample)
    max_elements: int | None = MAX_ELEMENTS
    keys = (
        Key(
            "adam/eps_share/<param>",
            "share of the tensor's elements with 0 < √v̂ <= ε (of those with v̂ > 0: an "
            "element whose gradient was always zero, an unused embedding row, does not "
            "count): there Adam's step is about m̂/ε, not normalised (Everett et al. 2024)",
        ),
        Key("adam/eps_share_total", "the same over every tensor's elements read (NaN: none)"),
        Key(
            "adam/grad_to_v/<param>",
            "mean g² / mean v̂: about 1 in steady training; far above, the gradient grew "
            "faster than the second moment follows (a loss-spike precursor)",
        ),
        Key("adam/grad_to_v_max", "the largest grad_to_v over the tensors"),
        Key(
            "adam/eps_shrink/<param>",
            "RMS of m̂ / (√v̂ + ε) over RMS of m̂ / √v̂ (elements with v̂ > 0): the factor ε "
            "shrinks Adam's step by; 1: ε is negligible, 0.1: steps 10× smaller than lr "
            "intends",
        ),
        Key("adam/eps_shrink_total", "the same over every tensor's elements read (NaN: none)"),
        Key(
            "adam/update_rms/<param>",
            "RMS of m̂ / (√v̂ + ε), Adam's step before the learning rate (1 for a "
            "sign-coherent gradient)",
        ),
    )
    needs = frozenset({"optimizer", "grads"})

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.max_elements
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(
                f"AdamHealth(max_elements=...) must be a positive int or None, got {m!r}"
            )

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        names = {id(p): n for n, p in ctx.params.items()}
        rows = []
        for group in ctx.optimizer.param_groups if ctx.optimizer is not None else []:
            for p in group["params"]:
                state = ctx.optimizer.state.get(p, {})
                if id(p) in names and _is_adam(state) and p.grad is not None:
                    rows.append((names[id(p)], self._stats(ctx, p, state, group)))
        if not rows:
            return {}
        tensors = tuple(n for n, _ in rows)
        stats = torch.stack([s for _, s in rows])  # [L, 7]
        eps_count, count = stats[:, 0], stats[:, 1]
        ratio = stats[:, 2] / stats[:, 3]  # mean g² / mean v̂
        with_eps, without = stats[:, 5], stats[:, 6]  # Σ over v̂ > 0 of the squared steps
        return {
            f"{self.name}/eps_share": PerLayer(tensors, eps_count / count),
            f"{self.name}/eps_share_total": eps_count.sum() / count.sum(),
            f"{self.name}/eps_shrink": PerLayer(tensors, (with_eps / without).sqrt()),
            f"{self.name}/eps_shrink_total": (with_eps.sum() / without.sum()).sqrt(),
            f"{self.name}/grad_to_v": PerLayer(tensors, ratio),
            f"{self.name}/grad_to_v_max": ratio.max(),
            f"{self.name}/update_rms": PerLayer(tensors, stats[:, 4]),
        }

    def _stats(self, ctx: StepContext, p: Tensor, state: dict, group: dict) -> Tensor:
        """``[7]`` float32: ε-dominated count and count of the elements with ``v̂ > 0``,
        mean g², mean v̂, RMS of the step, and over the elements with ``v̂ > 0`` the sums of
        the squared step with ε and without it."""
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        m, v = (self._lead(local_part(state[k].detach())) for k in ("exp_avg", "exp_avg_sq"))
        g = self._lead(ctx.unscaled(local_part(p.grad.detach())))
        step = state["step"]
        correction1 = 1 - beta1 ** _as_float(step)
        correction2 = 1 - beta2 ** _as_float(step)
        v_hat = v.float() / correction2
        root = v_hat.sqrt()
        m_hat = m.float() / correction1
        update = m_hat / (root + eps)
        seen = root > 0  # elements whose gradient was never non-zero do not move at all
        bare = torch.where(seen, m_hat / torch.where(seen, root, 1.0), 0.0)  # no ε
        return torch.stack(
            [
                (seen & (root <= eps)).sum().float(),
                seen.sum().float(),
                g.float().square().mean(),
                v_hat.mean(),
                update.square().mean().sqrt(),
                torch.where(seen, update, 0.0).square().sum(),
                bare.square().sum(),
            ]
        ).to(torch.float32)

    def _lead(self, t: Tensor) -> Tensor:
        flat = t.reshape(-1)
        return flat if self.max_elements is None else flat[: self.max_elements]


def _is_adam(state: Mapping[str, Any]) -> bool:
    return all(k in state for k in ("exp_avg", "exp_avg_sq", "step"))


def _as_float(step: Any) -> Any:
    """The step count: a float for a host tensor or number (no sync); a device tensor
    (``capturable``/``fused`` optimizers) stays on its device."""
    if isinstance(step, Tensor):
        return step.float() if step.device.type != "cpu" else float(step)
    return float(step)
