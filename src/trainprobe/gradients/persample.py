"""Per-example gradients ``g_i = ∇_w ℓ_i(w)`` of a loss, one row per example.

``ℓ_i`` is the user's ``loss(model, batch)`` evaluated on the one-example batch made of
example ``i`` alone (every split leaf indexed ``[i:i+1]``). For a mean-reduced loss
``L(w) = (1/B) Σ_i ℓ_i(w)`` the batch gradient is the mean of the rows:
``∇L = (1/B) Σ_i g_i``.

Two methods, the same function (``torch.func.functional_call`` on detached copies):

- ``"vmap"``: ``vmap(grad_and_value(ℓ))`` over the examples, in chunks of ``c`` examples
  so that the chunk's gradient block ``[c, P]`` stays under ``max_memory`` bytes
  (activations of ``c`` examples come on top). Models vmap cannot batch (``.item()``,
  data-dependent control flow, in-place writes into unbatched tensors, ops without a
  batching rule such as ``nn.GRU`` in torch 2.13) raise a ``RuntimeError`` that names
  ``method="loop"``; a failure is blamed on vmap only once one example alone succeeds.
- ``"loop"``: ``torch.autograd.grad`` once per example, exact for any model.
- ``"auto"``: ``"vmap"``, switching to ``"loop"`` with a ``RuntimeWarning`` where vmap fails.

BatchNorm: evaluated with running statistics (``mode="eval"``, the default). A
one-example batch has no batch statistics worth the name, so ``mode="train"`` with a
BatchNorm layer, or a BatchNorm without running statistics, raises a ``ValueError``
naming ``mode="eval"``. Dropout under ``mode="train"`` draws independent masks per
example (``randomness="different"``) from a forked RNG. Nothing of the model changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import Mode, Objective, ParamLayout, SplitBatch, check_objective
from ..notices import warn_user

Method = Literal["vmap", "loop", "auto"]
METHODS = ("vmap", "loop", "auto")
DEFAULT_MAX_MEMORY = 256 * 2**20
"""Bytes of per-example gradients held at once by default (256 MiB: 64 examples of a
1M-parameter float32 model)."""

Consume = Callable[[int, Tensor, Tensor], None]
"""``consume(start, grads [c, P], losses [c])`` for examples ``start .. start + c - 1``."""


@dataclass(frozen=True)
class PerSampleGradients:
    """Per-example gradients of a batch.

    Attributes:
        grads: ``[B, P]`` row ``i`` is ``g_i`` (parameters' dtype), laid out by ``layout``.
        losses: ``[B]`` the per-example losses ``ℓ_i``.
        layout: parameter names and shapes of the columns.
        chunk_size: examples per vmap call (1 for the loop).
        method: ``"vmap"`` or ``"loop"``, the one that ran.
    """

    grads: Tensor
    losses: Tensor
    layout: ParamLayout
    chunk_size: int
    method: str

    def per_param(self) -> dict[str, Tensor]:
        """``{name: [B, *shape]}`` views of :attr:`grads`."""
        blocks = torch.split(self.grads, self.layout.numels, dim=1)
        named = zip(self.layout.names, blocks, self.layout.shapes, strict=True)
        return {n: b.reshape(-1, *s) for n, b, s in named}


def per_sample_gradients(
    objective: Objective,
    batch: Any,
    *,
    method: Method = "vmap",
    chunk_size: int | None = None,
    max_memory: int | None = None,
) -> PerSampleGradients:
    """Every example's gradient ``[B, P]`` (see the module doc for the definition).

    Args:
        objective: the loss as a function of the selected parameters, e.g.
            ``Objective(model, criterion_loss(nn.CrossEntropyLoss()))``
            (:class:`trainprobe.functional.Objective`: which parameters, which forward
            semantics); its loss closure must be mean-reduced over the examples.
        batch: anything the loss closure takes; tensors of leading size ``B`` are split.
        method: ``"vmap"`` (default), ``"loop"`` or ``"auto"`` (module doc).
        chunk_size: examples per vmap call; default from ``max_memory``.
        max_memory: bytes for one chunk's ``[c, P]`` gradient block (default
            :data:`DEFAULT_MAX_MEMORY`); ``c = max_memory // (P · itemsize)``. The
            returned ``[B, P]`` comes on top; where only reductions are needed,
            :func:`~.noise.per_sample_noise` and :func:`~.groups.group_gradients`
            (``method="persample"``) stream the chunks and never hold it.

    Raises:
        TypeError: ``objective`` is not an ``Objective``.
        ValueError: bad options, BatchNorm under ``mode="train"``, a non-scalar loss.
        RuntimeError: vmap cannot batch the model (the message names ``method="loop"``).

    Examples:
        The per-example gradients of ``ℓ_i = (w x_i)²/2`` are ``w x_i²``:

        >>> import torch
        >>> from torch import nn
        >>> from trainprobe.functional import Objective
        >>> net = nn.Linear(1, 1, bias=False)
        >>> _ = net.weight.data.fill_(2.0)
        >>> objective = Objective(net, lambda m, x: (m(x) ** 2 / 2).mean())
        >>> per_sample_gradients(objective, torch.tensor([[1.0], [3.0]])).grads
        tensor([[ 2.],
                [18.]])
    """
    fl = check_objective(objective)
    split = SplitBatch.of(batch)
    out = torch.empty(split.size, fl.layout.size, dtype=fl.dtype, device=fl.device)  # [B, P]
    losses = torch.empty(split.size, dtype=fl.dtype, device=fl.device)  # [B]

    def keep(start: int, grads: Tensor, values: Tensor) -> None:
        out[start : start + grads.shape[0]] = grads
        losses[start : start + grads.shape[0]] = values

    used, size = for_each_chunk(
        fl, split, keep, method=method, chunk_size=chunk_size, max_memory=max_memory
    )
    return PerSampleGradients(out, losses, fl.layout, size, used)


def for_each_chunk(
    fl: Objective,
    split: SplitBatch,
    consume: Consume,
    *,
    method: Method,
    chunk_size: int | None,
    max_memory: int | None,
) -> tuple[str, int]:
    """Feed every example's gradient to ``consume`` in chunks; returns (method, chunk size)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_batchnorm(fl.model, fl.mode)
    size = chunk_for(fl.layout.size, fl.dtype, split.size, chunk_size, max_memory)
    with fl.scope():
        start = 0
        while start < split.size and method != "loop":
            stop = min(start + size, split.size)
            try:
                grads, values = _vmap_chunk(fl, split, slice(start, stop))  # [c, P], [c]
            except RuntimeError as err:
                method = _vmap_failed(fl, split, start, method, err)
                break
            consume(start, grads, values)
            start = stop
        for i in range(start, split.size):
            consume(i, *_loop_one(fl, split, i))
    return ("vmap" if method != "loop" else "loop"), (size if method != "loop" else 1)


def chunk_for(
    dim: int, dtype: torch.dtype, examples: int, chunk_size: int | None, max_memory: int | None
) -> int:
    """Examples per vmap call: ``chunk_size``, or the most whose ``[c, P]`` block fits."""
    if chunk_size is not None and max_memory is not None:
        raise ValueError("pass chunk_size= or max_memory=, not both")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        return min(chunk_size, examples)
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    row = dim * torch.empty((), dtype=dtype).element_size()
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < row:
        raise ValueError(
            f"max_memory={budget!r} bytes holds less than one example's gradient "
            f"({dim} parameters = {row} bytes); pass max_memory >= {row} or select fewer "
            "parameters with params="
        )
    return min(budget // row, examples)


def _check_batchnorm(model: nn.Module, mode: Mode) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        if mode == "train" or module.running_mean is None:
            why = "under mode='train'" if mode == "train" else "without running statistics"
            raise ValueError(
                f"per-example gradients through BatchNorm {name!r} {why} would normalise each "
                "example by its own statistics, which is meaningless; use mode='eval' (running "
                "statistics) with track_running_stats=True"
            )


def _vmap_chunk(fl: Objective, split: SplitBatch, index: slice) -> tuple[Tensor, Tensor]:
    """``[c, P]`` gradients and ``[c]`` losses of the examples at ``index``, one vmap call."""

    def one(w: dict[str, Tensor], *rows: Tensor) -> Tensor:
        return fl(w, split.rebuild([r.unsqueeze(0) for r in rows]))  # a one-example batch

    rows = split.rows(index)
    dims = (None, *([0] * len(rows)))
    grads, losses = vmap(grad_and_value(one), in_dims=dims, randomness="different")(
        fl.point, *rows
    )  # {name: [c, *shape]}, [c]
    count = losses.shape[0]
    flat = torch.cat([grads[n].reshape(count, -1) for n in fl.layout.names], dim=1)  # [c, P]
    return flat, losses


def _loop_one(fl: Objective, split: SplitBatch, i: int) -> tuple[Tensor, Tensor]:
    """``[1, P]`` gradient and ``[1]`` loss of example ``i`` by one backward pass."""
    w = fl.leaves()
    with torch.enable_grad():
        value = fl(w, split.take(slice(i, i + 1)))
        flat = fl.flat_grad(value, w)  # [P]
    return flat.unsqueeze(0), value.detach().reshape(1)


def _vmap_failed(
    fl: Objective, split: SplitBatch, start: int, method: str, err: RuntimeError
) -> str:
    """Blame vmap only if example ``start`` alone works; then raise or fall back."""
    _loop_one(fl, split, start)  # the model's own error (not vmap's) surfaces here
    reason = str(err).splitlines()[0][:120]
    if method == "vmap":
        raise RuntimeError(
            f"vmap cannot batch this model's per-example gradients ({reason}); use "
            "per_sample_gradients(..., method='loop') (one backward per example, exact), "
            "or method='auto' to fall back automatically"
        ) from err
    warn_user(
        f"per-example gradients: vmap cannot batch this model ({reason}); falling back to "
        "one backward pass per example (method='loop')",
        RuntimeWarning,
    )
    return "loop"
