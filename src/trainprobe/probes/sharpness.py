"""Sharpness against the stability threshold of the optimizer in use.

Gradient descent on a quadratic with curvature λ diverges once ``λ > 2/η``; networks
trained by full-batch GD sharpen until ``λ_max ≈ 2/η`` and then hover there, the edge
of stability (Cohen et al. 2021). The threshold depends on the optimizer; for Adam it
holds for the *preconditioned* sharpness ``λ_max(P⁻¹H)`` (Cohen et al. 2022):

=============================  ======================================================
optimizer                      stability threshold for ``λ_max``
=============================  ======================================================
SGD, no momentum               ``2 / η``
SGD, heavy-ball momentum β     ``(2 + 2β) / (η (1 − dampening))``
SGD, Nesterov momentum β       ``(2 + 2β) / (η (1 + 2β))``
Adam / AdamW (β₁, β₂, ε)       ``(2 + 2β₁) / ((1 − β₁) η)`` = ``38/η`` at β₁ = 0.9, for
                               ``λ_max(P⁻¹H)``, ``P = (1 − β₁ᵗ) diag(√v̂ₜ + ε)``
=============================  ======================================================

Coupled weight decay ``wd`` (SGD's and Adam's ``weight_decay``) adds ``wd·I`` to the
Hessian the optimizer sees, so it is included in ``λ_max``; AdamW's decoupled decay
only shrinks the weights and is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..curvature.hvp import HessianOperator
from ..keys import Key
from ..notices import warn_user
from ._curvature import CurvatureProbe
from .base import StepContext, Value


@dataclass(frozen=True)
class StabilityRule:
    """How to measure sharpness for an optimizer, and its threshold.

    Attributes:
        threshold: the stability threshold for ``λ_max`` (None: unknown).
        lr: the learning rate η read from the optimizer (None: none found).
        weight_decay: coupled L2 coefficient added to the Hessian: one number, or ``[P]``
            per parameter when the groups differ only in their decay.
        preconditioner: ``[P]`` diagonal of ``P`` (Adam), None for plain ``H``.
        note: why there is no threshold, when there is none.
        pending: the quantity is not defined yet (Adam before its first step has no
            preconditioner): nothing is measured, so that ``lambda_max`` stays one quantity.
    """

    threshold: float | None
    lr: float | None
    weight_decay: float | Tensor = 0.0
    preconditioner: Tensor | None = None
    note: str = ""
    pending: bool = False


def stability_rule(
    optimizer: torch.optim.Optimizer | None,
    params: Mapping[str, Tensor],
    flatten: Flatten | None = None,
) -> StabilityRule:
    """The rule for the live ``optimizer`` over ``params`` (see the module doc).

    Args:
        optimizer: the optimizer training ``params`` (None: no threshold).
        params: the parameters the Hessian is taken in, in vector order; Adam's
            preconditioner ``[P]`` is laid out in this order (float64, on their device).
        flatten: ``{name: tensor shaped like the parameter} -> [P]`` in the operator's
            order (its ``layout.flatten``: FSDP2 shards are gathered); default: concatenated.
    """
    flatten = _concatenated if flatten is None else flatten
    if optimizer is None:
        return StabilityRule(None, None, note="no optimizer given to watch() or mon.step()")
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    groups = [by_id.get(id(p)) for p in params.values()]
    if any(g is None for g in groups):
        return StabilityRule(None, None, note="some parameters are not in the optimizer")
    differ = [k for k in _RULE_KEYS if len({_plain(g.get(k)) for g in groups}) > 1]  # type: ignore[union-attr]
    if [k for k in differ if k != "weight_decay"]:
        return StabilityRule(
            None, None, note=f"parameter groups differ in {', '.join(differ)}: no one threshold"
        )
    group = groups[0]
    lr = float(group["lr"])  # type: ignore[index]
    if isinstance(optimizer, torch.optim.SGD):
        rule = _sgd_rule(group, lr)  # type: ignore[arg-type]
    elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        rule = _adam_rule(optimizer, group, lr, params, flatten)  # type: ignore[arg-type]
    else:
        return StabilityRule(None, lr, note=f"no known threshold for {type(optimizer).__name__}")
    if "weight_decay" in differ and not isinstance(optimizer, torch.optim.AdamW):
        return replace(rule, weight_decay=_decay_vector(groups, params, flatten))  # type: ignore[arg-type]
    return rule


_RULE_KEYS = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay")


Flatten = Callable[[Mapping[str, Tensor]], Tensor]


def _concatenated(tensors: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors.values()])


def _decay_vector(
    groups: list[Mapping[str, Any]], params: Mapping[str, Tensor], flatten: Flatten
) -> Tensor:
    """``[P]`` float64: each parameter's group weight decay, in vector order."""
    return flatten(
        {
            name: torch.full_like(p, float(g.get("weight_decay", 0.0)), dtype=torch.float64)
            for g, (name, p) in zip(groups, params.items(), strict=True)
        }
    ).cpu()


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return float(value)
    return tuple(_plain(v) for v in value) if isinstance(value, tuple | list) else value


def _sgd_rule(group: Mapping[str, Any], lr: float) -> StabilityRule:
    beta, damp = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
    wd = float(group.get("weight_decay", 0.0))
    if beta == 0:
        threshold = 2 / lr
    elif group.get("nesterov", False):
        threshold = (2 + 2 * beta) / (lr * (1 + 2 * beta))
    else:
        threshold = (2 + 2 * beta) / (lr * (1 - damp))
    return StabilityRule(threshold, lr, weight_decay=wd)


def _adam_rule(
    optimizer: torch.optim.Optimizer,
    group: Mapping[str, Any],
    lr: float,
    params: Mapping[str, Tensor],
    flatten: Flatten,
) -> StabilityRule:
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    # AdamW's decoupled decay shrinks the weights and is not in the Hessian: the usual two
    # groups, one decayed and one not, share one threshold
    coupled = 0.0 if isinstance(optimizer, torch.optim.AdamW) else float(group["weight_decay"])
    pieces = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        second = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
        if second is None or "step" not in state:
            return StabilityRule(
                None,
                lr,
                note="Adam has not stepped yet: its preconditioned sharpness is measured from "
                "its first step on",
                pending=True,
            )
        t = float(state["step"])
        diag = (1 - beta1**t) * ((second / (1 - beta2**t)).sqrt() + eps)  # P, diagonal
        pieces[name] = diag.detach()
    p_diag = flatten(pieces).to(torch.float64)  # [P]
    threshold = (2 + 2 * beta1) / ((1 - beta1) * lr)
    return StabilityRule(threshold, lr, weight_decay=coupled, preconditioner=p_diag)


class _Preconditioned:
    """``P^{-1/2} (H + D) P^{-1/2}``, ``D = wd I`` (or ``diag(wd)`` per parameter): symmetric,
    with the eigenvalues of ``P⁻¹(H + D)``."""

    def __init__(self, op: HessianOperator, rule: StabilityRule) -> None:
        self.op = op
        wd = rule.weight_decay
        self.wd = wd.to(op.device, op.dtype)[:, None] if isinstance(wd, Tensor) else wd  # [P, 1]
        p = rule.preconditioner
        self.scale = None if p is None else p.to(op.device, op.dtype).rsqrt()  # [P]
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device

    def matmat(self, vs: Tensor) -> Tensor:
        vs = vs.to(self.dtype)
        if self.scale is None:
            return self.op.matmat(vs) + self.wd * vs
        scaled = vs * self.scale[:, None]  # [P, k]
        return (self.op.matmat(scaled) + self.wd * scaled) * self.scale[:, None]

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v.reshape(-1, 1)).reshape(-1)


@dataclass(frozen=True, kw_only=True, eq=False)
class Sharpness(CurvatureProbe):
    """``λ_max`` of the Hessian the optimizer sees, against its stability threshold.

    Keys: see ``keys`` (``threshold`` and ``ratio`` when the optimizer's threshold is
    known). See the module doc for the thresholds.

    One key, one quantity: with Adam/AdamW ``lambda_max`` is always the preconditioned
    sharpness, so before Adam's first step (no preconditioner yet) nothing is recorded,
    with a one-time note. Parameter groups that differ only in their weight decay share
    one threshold: AdamW's decoupled decay is not in the Hessian, and coupled decay enters
    as ``diag(wd)`` per parameter. An optimizer without a known threshold gets ``λ_max``
    of the plain Hessian only, with a one-time warning saying why.

    Args:
        tol: Lanczos residual tolerance (relative), as :class:`~.hessian.HessianTop`.
        value_tol: eigenvalue-error tolerance (relative), as :class:`~.hessian.HessianTop`.
        warm_start: start from the last measurement's top eigenvector.
        lr: the learning rate of a loop without an optimizer (hand-written updates
            ``w -= lr * g``): the threshold is gradient descent's ``2 / lr``.
        threshold: a stability threshold of your own (e.g. for an optimizer without a
            known one); it replaces the optimizer's, and ``λ_max`` stays the plain (or,
            with Adam, the preconditioned) sharpness.
        data, batches, loss_fn, params, mode, engine, dtype, seed, schedule, name: see
            :class:`~._curvature.CurvatureProbe`.
    """

    name: str = "sharpness"
    keys = (
        Key("sharpness/lambda_max", "λ_max(H + wd I), or λ_max(P⁻¹(H + wd I)) for Adam"),
        Key("sharpness/threshold", "the optimizer's stability threshold for λ_max"),
        Key("sharpness/ratio", "λ_max / threshold; 1 is the edge of stability"),
        Key("sharpness/lr", "the learning rate η read from the optimizer, behind the threshold"),
        Key("sharpness/preconditioned", "1 for Adam's P⁻¹H, else 0"),
        Key(
            "sharpness/directional",
            "gᵀHg / gᵀg, the curvature of the plain Hessian along the loss gradient (one "
            "product): a cheap lower bound of the plain λ_max, close to it when the gradient "
            "lies in the top eigenspace (NaN for a zero gradient)",
        ),
        Key("sharpness/hvps", "Hessian-vector products spent"),
        Key(
            "sharpness/fd_error",
            "the largest estimated relative error of the products when the finite-difference "
            "engine ran (a layer without a double backward; each product is checked and refused "
            "over 1e-2); absent for the exact engines",
        ),
    )

    tol: float = 1e-4
    value_tol: float | None = None
    warm_start: bool = True
    lr: float | None = None
    threshold: float | None = None
    _noted: set[str] = field(default_factory=set, init=False, repr=False)  # warnings given

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        op = self.operator(ctx)
        rule = self._rule(
            ctx.optimizer, {n: ctx.params[n] for n in op.layout.names}, op.layout.flatten
        )
        self._note(rule)
        if rule.pending:
            return {}
        pairs = self.eigenpairs(
            _Preconditioned(op, rule),
            op.dim,
            ctx.step,
            warm=self.warm_start,
            top=1,
            tol=self.tol,
            value_tol=self.value_tol,
        )
        lam = float(pairs.values[0])
        g = op.gradient  # [P]
        directional = (g @ op.matvec(g)) / (g @ g)  # 0-d; NaN for g = 0
        out: dict[str, Value] = {
            f"{self.name}/lambda_max": lam,
            f"{self.name}/directional": directional,
            f"{self.name}/preconditioned": float(rule.preconditioner is not None),
            f"{self.name}/hvps": float(op.matvecs),
            **self.engine_record(op),
        }
        if rule.lr is not None:
            out[f"{self.name}/lr"] = rule.lr
        if rule.threshold is not None:
            out[f"{self.name}/threshold"] = rule.threshold
            out[f"{self.name}/ratio"] = lam / rule.threshold
        return out

    def _rule(
        self,
        optimizer: torch.optim.Optimizer | None,
        params: Mapping[str, Tensor],
        flatten: Flatten | None = None,
    ) -> StabilityRule:
        """The optimizer's rule; ``threshold=`` replaces its threshold, and without an
        optimizer ``lr=`` gives gradient descent's ``2 / lr``."""
        if optimizer is None and self.lr is not None and self.threshold is None:
            return StabilityRule(2.0 / self.lr, self.lr)
        rule = stability_rule(optimizer, params, flatten)
        if self.threshold is None:
            return rule
        lr = self.lr if rule.lr is None else rule.lr
        return replace(rule, threshold=self.threshold, lr=lr, note="")

    def _note(self, rule: StabilityRule) -> None:
        """Say once why nothing (pending) or only λ_max (no threshold) is recorded."""
        if rule.note and rule.note not in self._noted:
            self._noted.add(rule.note)
            why = rule.note if rule.pending else f"λ_max only, no threshold: {rule.note}"
            warn_user(f"Sharpness: {why}", UserWarning)
