"""Grokking: held-out evaluation measured like the train fit, and the cheap signals of the
delay (Power et al. 2022, "Grokking: Generalization Beyond Overfitting on Small
Algorithmic Datasets"; Prieto et al. 2025, "Grokking at the Edge of Numerical
Stability")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..functional import Mode, Objective, check_mode
from ..keys import Key
from .base import ProbeOptions, StepContext, Value
from .batches import inputs_targets, observing
from .heldout import _is_class_target
from .schedules import Schedule, every
from .tensors import stacked_norms, total_norm


@dataclass(frozen=True, kw_only=True, eq=False)
class GrokSignals(ProbeOptions):
    """The cheap signals of a grokking delay: weight norm, Softmax Collapse and the
    alignment of the gradient with naive loss minimisation (Prieto et al. 2025).

    On a fixed batch ``(x, y)`` with class labels, in the model's dtype and ``mode``
    semantics: logits ``z_i ∈ R^C`` (``[B, C]``, or ``[B, ..., C]`` with labels
    ``[B, ...]``, each position an example), the per-example cross-entropy computed as
    PyTorch does, ``ℓ_i = log Σ_c exp(z_ic − m_i) − (z_iy − m_i)`` with ``m_i = max_c z_ic``,
    and its logit gradient ``∇_{z_i} ℓ_i = exp(log_softmax(z_i)) − e_{y_i}``.

    Softmax Collapse (SC): example ``i`` is collapsed when, in floating point, ``ℓ_i == 0``
    or ``∇_{z_i} ℓ_i == 0`` (every entry). With the margins ``δ_c = z_iy − z_ic > 0`` the
    first happens once ``Σ_{c≠y} exp(−δ_c)`` is absorbed by the 1 of the true class
    (``< 2^-24``: ``δ ≳ 16.6`` in float32, ``≳ 36.7`` in float64): ``p_y`` rounds to 1, the
    true class's gradient ``p_y − 1`` is exactly 0 and the example stops teaching the
    model; the second once every ``exp(−δ_c)`` underflows (``δ ≳ 104`` in
    float32; ``∇ = 0`` implies ``ℓ = 0``). Prieto et al. show SC halts learning before
    the model groks (their code counts examples whose ``Σ_c exp(z_c − m)`` rounds to 1).

    Naive loss minimisation (NLM): for the output layer ``θ = (W, b)`` with
    ``z = W h + b``, moving ``θ`` along ``θ`` itself scales every logit
    (``∂z/∂s (sθ)|_{s=1} = z``): predictions stay, the loss of correctly classified
    examples falls (``⟨∇_z ℓ, z⟩ = Σ_c p_c z_c − z_y < 0``). Prieto et al. find the gradient
    aligns with this direction after memorisation, the cause of the logit growth that ends
    in SC. The probe records ``cos(−g, θ)`` with ``g = ∇_θ L`` the gradient of the mean
    cross-entropy on the batch: near 1 the descent only inflates the logits. The gradient,
    not the update ``Δw``: preconditioning and decoupled weight decay (``−ηλw``, anti-aligned
    with ``w`` by construction) would mix into ``Δw``. The output layer, not every weight:
    the scaling identity is exact there for any network (and for the whole ``θ`` only in
    positively homogeneous ones, where Prieto et al.'s ⊥Grad projects it out).

    Keys: see ``keys``.

    Args:
        schedule: when to measure (default every 10 steps; one forward and one backward
            into the output layer on the batch).
        data: a fixed batch ``(x, y)`` with integer class labels (default: the step's).
        output: the output layer, a module or its name (default: the last ``nn.Linear``
            the forward pass calls, found once, at the first measurement); exact when the
            logits are its output (or a bias-free linear map of it).
        mode: ``"eval"`` (default) or ``"train"`` semantics (restored, RNG forked).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "grok"
    across_ranks = "own_data"
    own_data = "data"
    schedule: Schedule = every(10)
    keys = (
        Key(
            "grok/param_norm",
            "‖w‖₂ over all trainable parameters (its growth accompanies memorisation)",
        ),
        Key("grok/softmax_collapse", "the collapsed fraction of the batch's examples"),
        Key("grok/nlm_cos", "cos(−∇_θ L, θ) for the output layer θ"),
    )

    data: Any = field(default=None, repr=False)
    output: str | nn.Module | None = field(default=None, repr=False)
    mode: Mode = "eval"
    _found: str | None = field(default=None, init=False, repr=False)  # the last Linear called

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output is not None and not isinstance(self.output, str | nn.Module):
            raise TypeError(
                f"GrokSignals: output must be a module name or an nn.Module, got "
                f"{type(self.output).__name__}"
            )
        check_mode(self.mode)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        batch = self.data if self.data is not None else ctx.batch
        if batch is None:
            raise ValueError("GrokSignals needs data: pass data=(x, y) or batch= to mon.step()")
        x, y = inputs_targets(batch, "GrokSignals")
        output = self.output
        if output is None:
            if self._found is None:
                self._keep(_found=last_called_linear(ctx.model, x, self.mode))
            output = self._found
        head = output_params(ctx.model, output)
        collapsed, cos = _softmax_signals(ctx.model, x, y, head, self.mode)
        weights = stacked_norms([p.detach() for p in ctx.params.values()])  # [L]
        return {
            f"{self.name}/param_norm": total_norm(weights),
            f"{self.name}/softmax_collapse": collapsed,
            f"{self.name}/nlm_cos": cos,
        }


def output_params(model: nn.Module, output: str | nn.Module) -> list[str]:
    """Names of the output layer's trainable parameters (see :class:`GrokSignals`)."""
    modules = dict(model.named_modules())
    if isinstance(output, str):
        if output not in modules:
            raise ValueError(
                f"GrokSignals: output={output!r} is not a module of the model; names are "
                f"{list(modules)[1:9]}"
            )
        module = modules[output]
    else:
        module = output
    ids = {id(p) for p in module.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in ids and p.requires_grad]
    if not names:
        raise ValueError(
            "GrokSignals: the output layer has no trainable parameter of this model; pass "
            "output= naming the model's (trainable) classification head"
        )
    return names


def last_called_linear(model: nn.Module, x: Any, mode: str) -> str:
    """The name of the last ``nn.Linear`` the forward pass on ``x`` calls (one pass,
    without gradients, under ``mode`` semantics); ``ValueError`` if it calls none."""
    called: list[str] = []
    handles = [
        m.register_forward_hook(lambda *_, name=n: called.append(name))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with observing(model, check_mode(mode)) as eager, torch.no_grad():
            eager(x)
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise ValueError(
            "GrokSignals: the forward pass calls no nn.Linear to take as the output layer; "
            "pass output= (the module whose output is the logits, or its name)"
        )
    return called[-1]


def _softmax_signals(
    model: nn.Module, x: Any, y: Tensor, head: list[str], mode: str
) -> tuple[Tensor, Tensor]:
    """The collapsed fraction and ``cos(−g, θ)`` (class doc), one forward and backward."""
    fl = Objective(model, lambda net, inputs: net(inputs), params=head, mode=check_mode(mode))
    with fl.scope(), torch.enable_grad():
        w = fl.leaves()  # {name: θ leaf}
        logits = fl.raw(w, x)  # [B, ..., C]
        if not _is_class_target(logits, y):
            raise ValueError(
                "GrokSignals needs logits [B, ..., C] and integer class labels [B, ...], got "
                f"{tuple(getattr(logits, 'shape', ()))} and {tuple(y.shape)} {y.dtype}"
            )
        flat = logits.reshape(-1, logits.shape[-1])  # [N, C]
        losses = F.cross_entropy(flat, y.reshape(-1), reduction="none")  # [N]
        total = losses.sum()
        (logit_grad,) = torch.autograd.grad(total, flat, retain_graph=True)  # row i: ∇_{z_i} ℓ_i
        g = fl.flat_grad(total, w).double()  # [P_out], N · ∇_θ L
    collapsed = (losses.detach() == 0) | (logit_grad == 0).all(dim=1)  # [N]
    theta = fl.layout.flatten(fl.point).double()  # [P_out]
    cos = -(g @ theta) / (torch.linalg.vector_norm(g) * torch.linalg.vector_norm(theta))
    return collapsed.double().mean(), cos
