"""The instability signals transformer-training teams watch: attention logits and
entropy, and the output logits' normaliser.

- **Attention-logit growth** (Dehghani et al. 2023, *Scaling Vision Transformers to 22
  Billion Parameters*, §3.1.1; Wortsman et al. 2023, *Small-scale proxies for
  large-scale Transformer training instabilities*, §3.1): the pre-softmax logits
  ``q·k/√d`` grow without bound, the attention turns one-hot and training stalls or
  diverges; QK-layernorm prevents it. **Entropy collapse** (Zhai et al. 2023,
  *Stabilizing Transformer Training by Preventing Attention Entropy Collapse*): the
  attention distributions' entropy falls towards 0.
- **Output-logit divergence** (Wortsman et al. 2023, §3.2; the z-loss of PaLM and OLMo 2):
  ``log Z = logsumexp(logits)`` drifts far from 0 and the loss turns unstable; a z-loss
  ``1e-4 · (log Z)²`` holds it near 0.

:class:`AttentionStats` reads ``q`` and ``k`` where attention is computed, on due steps
only, through a ``torch.overrides.TorchFunctionMode`` entered for the model's forward:

- ``torch.nn.functional.scaled_dot_product_attention`` (nanoGPT-style modules, Hugging
  Face ``attn_implementation="sdpa"``): its ``q``, ``k``, mask, ``is_causal``, ``scale``
  and grouped-query heads;
- ``torch.nn.functional.multi_head_attention_forward`` (``nn.MultiheadAttention``, and so
  ``nn.TransformerEncoderLayer``/``DecoderLayer``): ``q`` and ``k`` from its input
  projections, with its boolean or additive masks and key-padding mask;
- a softmax over the last dimension of a 4-D ``[batch, heads, queries, keys]`` tensor
  (Hugging Face ``"eager"`` attention, hand-written attention): its input is the masked,
  scaled logits.

Kernels that never pass ``q`` and ``k`` through a torch function (the ``flash-attn``
package, xformers) are not seen: no key is written for them. The statistics are computed
on the first ``max_sequences`` sequences of each call, under ``no_grad``, from detached
tensors; the call itself runs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..keys import Key
from .activations import _is_compiled
from .base import PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .tensors import stack_scalars

SOFTMAXES = (F.softmax, torch.softmax, Tensor.softmax)


def attention_stats(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(max logit [H], mean entropy [H])`` of ``[B, H, T, S]`` pre-softmax logits
    (``-inf`` where masked), float32: per head, the largest finite logit and the mean
    over sequences and queries of ``−Σ_s p log p`` (nats) of ``p = softmax(logits)``.
    A query row with every key masked contributes no entropy."""
    x = logits.float()
    heads = x.shape[1]
    per_head = x.transpose(0, 1).reshape(heads, -1)  # [H, B·T·S]
    finite = torch.where(torch.isfinite(per_head), per_head, torch.finfo(x.dtype).min)
    top = finite.amax(dim=1)  # [H]
    p = torch.softmax(x, dim=-1)  # [B, H, T, S]; NaN rows where all are masked
    entropy = torch.special.entr(p).sum(dim=-1)  # [B, H, T]
    valid = torch.isfinite(entropy)
    summed = torch.where(valid, entropy, 0.0).sum(dim=(0, 2))  # [H]
    rows = valid.sum(dim=(0, 2)).clamp(min=1)
    return top, summed / rows


def _causal(t: int, s: int, device: torch.device) -> Tensor:
    """``[T, S]`` bool, True where query ``i`` may attend key ``j`` (top-left aligned, as
    ``scaled_dot_product_attention(is_causal=True)``)."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril()


def _masked(logits: Tensor, mask: Tensor | None, attend_is_true: bool) -> Tensor:
    """``logits`` with a boolean mask applied (``-inf`` where not attended) or an
    additive float mask added; broadcast over ``[B, H, T, S]``."""
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        blocked = ~mask if attend_is_true else mask
        return logits.masked_fill(blocked, float("-inf"))
    return logits + mask.float()


class _Tap(TorchFunctionMode):
    """Sees every torch function call of the forward it is entered for; hands the
    attention ones' logits to ``record`` and runs every call unchanged."""

    def __init__(self, record: Any, max_sequences: int) -> None:
        super().__init__()
        self.record, self.rows = record, max_sequences

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            logits = self._logits(func, args, kwargs)
        except Exception:  # an unexpected signature: measure nothing, never break the step
            logits = None
        if logits is not None:
            with torch.no_grad():
                self.record(logits)
        return func(*args, **kwargs)

    def _logits(self, func: Any, args: tuple, kwargs: dict) -> Tensor | None:
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return _mha_logits(self.rows, *args, **kwargs)
        if func in SOFTMAXES:
            x = args[0] if args else kwargs.get("input")
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(x, Tensor) and x.ndim == 4 and dim in (-1, 3):
                return x.detach()[: self.rows]
        return None

    def _sdpa(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor | None:
        if query.ndim != 4:
            return None
        q, k = query.detach()[: self.rows].float(), key.detach()[: self.rows].float()
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves a group
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        logits = (q @ k.transpose(-2, -1)) * scale  # [b, H, T, S]
        if is_causal:
            logits = _masked(logits, _causal(q.shape[2], k.shape[2], q.device), True)
        mask = attn_mask
        if mask is not None and mask.ndim == 4:
            mask = mask[: self.rows]
        return _masked(logits, mask, attend_is_true=True)


def _mha_logits(rows: int, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kw: Any):
    """Pre-softmax logits ``[b, H, T, S]`` of ``F.multi_head_attention_forward`` (its
    sequence-first ``[T, B, E]`` inputs, as ``nn.MultiheadAttention`` passes them)."""
    names = [
        "embed_dim_to_check",
        "num_heads",
        "in_proj_weight",
        "in_proj_bias",
        "bias_k",
        "bias_v",
        "add_zero_attn",
        "dropout_p",
        "out_proj_weight",
        "out_proj_bias",
        "training",
        "key_padding_mask",
        "need_weights",
        "attn_mask",
        "use_separate_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "static_k",
        "static_v",
        "average_attn_weights",
        "is_causal",
    ]
    a = dict(zip(names, args, strict=False)) | kw
    if a.get("bias_k") is not None or a.get("add_zero_attn") or a.get("static_k") is not None:
        return None  # extra key slots: not modelled here
    if query.ndim == 2:  # unbatched [T, E]
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    q_in, k_in = query.detach()[:, :rows].float(), key.detach()[:, :rows].float()
    e, heads = q_in.shape[-1], a["num_heads"]
    if a.get("use_separate_proj_weight"):
        w_q, w_k = a["q_proj_weight"], a["k_proj_weight"]
    else:
        w_q, w_k = a["in_proj_weight"][:e], a["in_proj_weight"][e : 2 * e]
    bias = a.get("in_proj_bias")
    b_q, b_k = (None, None) if bias is None else (bias[:e], bias[e : 2 * e])
    q = F.linear(q_in, w_q.detach().float(), None if b_q is None else b_q.detach().float())
    k = F.linear(k_in, w_k.detach().float(), None if b_k is None else b_k.detach().float())
    t, b, s = q.shape[0], q.shape[1], k.shape[0]
    q = q.reshape(t, b, heads, e // heads).permute(1, 2, 0, 3)  # [b, H, T, d]
    k = k.reshape(s, b, heads, e // heads).permute(1, 2, 0, 3)  # [b, H, S, d]
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(e // heads)  # [b, H, T, S]
    mask = a.get("attn_mask")
    if mask is not None:
        if mask.ndim == 3:  # [B·H, T, S]
            mask = mask.reshape(-1, heads, t, s)[:rows]
        logits = _masked(logits, mask, attend_is_true=False)
    elif a.get("is_causal"):
        logits = _masked(logits, _causal(t, s, logits.device), True)
    padding = a.get("key_padding_mask")
    if padding is not None:
        logits = _masked(logits, padding[:rows, None, None, :], attend_is_true=False)
    return logits


@dataclass(frozen=True, kw_only=True, eq=False)
class AttentionStats(ProbeOptions):
    """Largest attention logit and attention entropy per attention layer and head, from
    the training forward itself on due steps (module doc: what is covered).

    A layer is named after the innermost module whose forward made the call. A module
    called several times in one step (shared blocks) pools its calls.

    Keys: see ``keys``.

    Args:
        max_sequences: sequences of each call the statistics read (the leading ones).
        schedule: when to measure (default every 10 steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "attention"
    schedule: Schedule = every(10)
    across_ranks = "local"
    max_sequences: int = 4
    keys = (
        Key(
            "attention/max_logit/<layer>",
            "largest pre-softmax logit q·k/√d of the layer (masked positions excluded); "
            "growing without bound: attention-logit growth (Dehghani et al. 2023)",
        ),
        Key("attention/max_logit_max", "the largest max_logit over the layers"),
        Key(
            "attention/entropy/<layer>",
            "mean entropy (nats) of the layer's attention distributions over heads, queries "
            "and sequences; log(keys) for uniform attention, 0 for one-hot",
        ),
        Key(
            "attention/entropy_min_head/<layer>",
            "the lowest of the layer's per-head mean entropies (one collapsed head)",
        ),
        Key("attention/heads/<layer>", "attention heads seen in the layer"),
    )
    needs = frozenset({"activations"})
    _calls: dict[str, list[tuple[Tensor, Tensor]]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.max_sequences
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"AttentionStats(max_sequences=...) must be a positive int, got {m!r}")

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        if _is_compiled(model):
            raise ValueError(
                "AttentionStats cannot see inside a torch.compile'd module (its attention "
                "runs in the compiled graph); watch the uncompiled module (model._orig_mod)"
            )
        self._calls.clear()
        stack: list[str] = []
        tap = _Tap(
            lambda logits: self._record(stack[-1] if stack else "", logits), self.max_sequences
        )
        handles = []
        try:
            for name, module in model.named_modules():
                handles.append(module.register_forward_pre_hook(_push(stack, name)))
                handles.append(module.register_forward_hook(_pop(stack), always_call=True))
            handles.append(model.register_forward_pre_hook(_enter(tap)))
            handles.append(model.register_forward_hook(_leave(tap), always_call=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _record(self, layer: str, logits: Tensor) -> None:
        self._calls.setdefault(layer or "model", []).append(attention_stats(logits))

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        calls = dict(self._calls)
        self._calls.clear()
        if not calls:
            return {}
        layers = tuple(calls)
        tops, means, mins, heads = [], [], [], []
        for per_call in calls.values():
            top = torch.stack([t for t, _ in per_call]).amax(dim=0)  # [H]
            entropy = torch.stack([e for _, e in per_call]).mean(dim=0)  # [H]
            tops.append(top.max())
            means.append(entropy.mean())
            mins.append(entropy.min())
            # torch.full, not torch.tensor(..., device=...): a host value copied to an
            # accelerator by torch.tensor is a blocking copy that waits for the stream
            heads.append(torch.full((), float(entropy.numel()), device=entropy.device))
        top = stack_scalars(tops)
        return {
            f"{self.name}/max_logit": PerLayer(layers, top),
            f"{self.name}/max_logit_max": top.max(),
            f"{self.name}/entropy": PerLayer(layers, stack_scalars(means)),
            f"{self.name}/entropy_min_head": PerLayer(layers, stack_scalars(mins)),
            f"{self.name}/heads": PerLayer(layers, stack_scalars(heads)),
        }


def _enter(tap: _Tap):
    def hook(_module: nn.Module, _inputs: Any) -> None:  # None: the inputs stay as they are
        tap.__enter__()

    return hook


def _leave(tap: _Tap):
    def hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        tap.__exit__(None, None, None)

    return hook


def _push(stack: list[str], name: str):
    def hook(_module: nn.Module, _inputs: Any) -> None:
        stack.append(name)

    return hook


def _pop(stack: list[str]):
    def hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        if stack:
            stack.pop()

    return hook


def output_logits(output: Any) -> Tensor | None:
    """The logits in a model's output: the tensor itself, a ``logits`` attribute or key
    (Hugging Face ``ModelOutput``), or the first tensor of a tuple; floating, ``ndim >= 2``."""
    found = output
    if not isinstance(found, Tensor):
        found = getattr(output, "logits", None)
    if found is None and isinstance(output, Mapping):
        found = output.get("logits")
    if found is None and isinstance(output, tuple | list) and output:
        found = output[0]
    if isinstance(found, Tensor) and found.is_floating_point() and found.ndim >= 2:
        return found
    return None


@dataclass(frozen=True, kw_only=True, eq=False)
class OutputLogits(ProbeOptions):
    """The output logits' normaliser ``log Z = logsumexp(logits)`` over the last
    dimension (classes or vocabulary) and the largest logit, from the training forward
    on due steps (module doc). The logits are the model's output (a tensor, a
    ``logits`` attribute or key, or a tuple's first tensor), or the output of
    ``module``; the statistics read its leading ``max_rows`` rows (positions).

    Keys: see ``keys``.

    Args:
        module: the name of the module whose output holds the logits (default the model).
        max_rows: rows (sequence positions × batch) read per call.
        schedule: when to measure (default every 10 steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "logits"
    schedule: Schedule = every(10)
    across_ranks = "local"
    module: str | None = None
    max_rows: int = 4096
    keys = (
        Key(
            "logits/log_z_mean",
            "mean over positions of log Z = logsumexp(logits); drifting far from 0: output-"
            "logit divergence, which a z-loss holds (Wortsman et al. 2023)",
        ),
        Key("logits/log_z_max", "the largest log Z over the positions read"),
        Key("logits/log_z_rms", "sqrt(mean (log Z)²): what a z-loss 1e-4·(log Z)² penalises"),
        Key("logits/max", "the largest logit"),
    )
    needs = frozenset({"activations"})
    _sums: list[Tensor] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.max_rows
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"OutputLogits(max_rows=...) must be a positive int, got {m!r}")

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        self._sums.clear()
        named = dict(model.named_modules())
        if self.module is not None and self.module not in named:
            raise ValueError(
                f"OutputLogits: no module named {self.module!r} in the model; choose from "
                f"{[n for n in named if n][:20]}"
            )
        target = model if self.module is None else named[self.module]

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            logits = output_logits(output)
            if logits is not None:
                with torch.no_grad():
                    self._sums.append(_logit_sums(logits, self.max_rows))

        return [target.register_forward_hook(hook)]

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        sums = list(self._sums)
        self._sums.clear()
        if not sums:
            return {}
        rows = torch.stack(sums)  # [calls, 5]: n, Σ log Z, Σ (log Z)², max log Z, max logit
        n = rows[:, 0].sum()
        return {
            f"{self.name}/log_z_mean": rows[:, 1].sum() / n,
            f"{self.name}/log_z_max": rows[:, 3].max(),
            f"{self.name}/log_z_rms": (rows[:, 2].sum() / n).sqrt(),
            f"{self.name}/max": rows[:, 4].max(),
        }


def _logit_sums(logits: Tensor, max_rows: int) -> Tensor:
    """``[5]`` float32: rows, Σ log Z, Σ (log Z)², max log Z and max logit of the leading
    ``max_rows`` rows of ``logits`` flattened to ``[rows, classes]``."""
    x = logits.detach().reshape(-1, logits.shape[-1])[:max_rows].float()
    log_z = torch.logsumexp(x, dim=-1)  # [rows]
    count = torch.full((), float(x.shape[0]), device=x.device)  # no host copy (no sync)
    return torch.stack([count, log_z.sum(), log_z.square().sum(), log_z.max(), x.max()])
