"""The gradient noise scale and per-layer gradient signal-to-noise ratio."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..gradients import METHODS, microbatch_noise, per_sample_noise
from ..keys import Key
from .base import PerLayer, StepContext, Value
from .schedules import Schedule, every
from .source import LossProbe


@dataclass(frozen=True, kw_only=True, eq=False)
class GradNoise(LossProbe):
    """Simple noise scale ``B_simple = tr(Σ) / ‖G‖²`` (McCandlish et al. 2018, "An
    Empirical Model of Large-Batch Training", appendix A), per step, from unbiased
    estimates.

    ``G`` is the expected gradient and ``Σ`` the covariance of per-example gradients
    ``g_i`` (the gradient of the loss on a one-example batch). With ``B`` per-example
    gradients and their mean ``ḡ`` (the batch gradient of a mean-reduced loss),
    ``E‖ḡ‖² = ‖G‖² + tr(Σ)/B`` and ``E[mean_i ‖g_i‖²] = ‖G‖² + tr(Σ)``, so

        ``S    = B/(B−1) · (mean_i ‖g_i‖² − ‖ḡ‖²)``        (unbiased for ``tr Σ``),
        ``|G|² = (B ‖ḡ‖² − mean_i ‖g_i‖²) / (B − 1)``      (unbiased for ``‖G‖²``).

    With ``microbatches=m`` the batch is cut into ``m`` consecutive micro-batches of
    sizes ``b_k`` and their gradients take the place of the ``g_i``: McCandlish's
    two-batch-size estimator, ``S = (mean_k ‖g_k‖² − ‖ḡ‖²) / (mean_k 1/b_k − 1/B)``,
    ``|G|² = ‖ḡ‖² − S/B`` (derivation: :mod:`trainprobe.gradients.noise`). ``S / |G|²``
    is a ratio of unbiased estimates, not itself unbiased on one batch: for an unbiased
    ``B_simple`` average ``trace_cov`` and ``grad_sq`` over steps before dividing.

    Keys: see ``keys``. ``b_simple`` is negative when ``|G|² < 0``: the signal is below
    one batch's noise. ``snr/<param>`` is ``|G_l|² / (S_l / B) = B / B_simple,l``: near 0
    for pure noise, while the plug-in ``‖ḡ_l‖² / (S_l / B)`` is near 1.

    Args:
        microbatches: None (default): per-example gradients; ``m >= 2``: ``m``
            micro-batch gradients (``m`` backward passes, any model, less precise).
        method: per-example method, ``"auto"`` (default: vmap, falling back once, with
            a warning, to one backward per example where vmap cannot batch the model),
            ``"vmap"`` or ``"loop"``; see :func:`trainprobe.gradients.per_sample_gradients`.
        schedule: when to measure (default every 10 steps; a measurement is one batch
            gradient vmapped over the examples: about two batch gradients on a small CPU
            CNN, 1.23x the training step every 10 steps; ``benchmarks/gradients.py``).
        max_memory: bytes per chunk of per-example gradients (default 256 MiB).
        data, loss_fn, params, mode: where the loss is taken, see
            :class:`~.source.LossProbe` (``mode="train"`` includes dropout noise and is
            refused with BatchNorm, see :mod:`trainprobe.gradients.persample`).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "grad_noise"
    schedule: Schedule = every(10)
    across_ranks = "combined"  # on the step's batch: every rank's examples pooled
    keys = (
        Key(
            "grad_noise/b_simple",
            "S / |G|², about the batch size beyond which larger batches stop speeding up training",
        ),
        Key("grad_noise/trace_cov", "S, the trace of the per-example gradient covariance"),
        Key("grad_noise/grad_sq", "|G|², the unbiased squared norm of the true gradient"),
        Key(
            "grad_noise/snr/<param>",
            "|G_l|² / (S_l / B), tensor l's squared signal over its batch mean's noise: below 1, "
            "mostly noise",
        ),
        Key("grad_noise/batch_size", "B, the examples in the batch"),
    )

    microbatches: int | None = None
    method: str = "auto"
    max_memory: int | None = None
    _method: str | None = field(default=None, init=False, repr=False)  # "loop" after a fallback

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.microbatches
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 2):
            raise ValueError(
                f"GradNoise: microbatches must be None (per-example) or an integer >= 2, got {m!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"GradNoise: method must be one of {METHODS}, got {self.method!r}")

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        objective, batch = self.objective(ctx)
        # under ranks, on the step's batch: every rank's examples pooled (one all-reduce)
        reduce = ctx.ranks.sum if ctx.ranks is not None and self.data is None else None
        if self.microbatches is None:
            noise, used = per_sample_noise(
                objective,
                batch,
                method=self._method or self.method,
                max_memory=self.max_memory,
                reduce=reduce,
            )
            if used == "loop":  # "auto" fell back once (with a warning): for good
                self._keep(_method="loop")
        else:
            noise = microbatch_noise(objective, batch, self.microbatches, reduce=reduce)
        return {
            f"{self.name}/b_simple": noise.b_simple,
            f"{self.name}/trace_cov": noise.trace_cov.sum(),
            f"{self.name}/grad_sq": noise.grad_sq.sum(),
            f"{self.name}/snr": PerLayer(noise.names, noise.snr),
            f"{self.name}/batch_size": float(noise.batch_size),
        }
