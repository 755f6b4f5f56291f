"""Calling a module with other tensors in place of its parameters and buffers.

:func:`call` is the one place where trainprobe swaps tensors into a user's module; every
functional evaluation (HVPs, per-example and group gradients, regions, attacks) goes
through it. It wraps ``torch.func.functional_call`` and fixes two things that call
gets wrong or does not do for us:

- **Shared modules.** A module reachable under two names (``self.b = self.a``, or
  ``nn.ModuleList([block] * 3)``) is one object with one ``_parameters`` dict. With
  ``tie_weights=True``, ``functional_call`` swaps ``a.weight`` and then ``b.weight``
  (the same slot), saving the already-swapped tensor as the "original" of the second
  swap; restoring leaves a plain ``Tensor`` where the ``Parameter`` was, and the
  shared block silently stops training (torch 2.13). Here every slot, an
  ``(owning module, attribute)`` pair, is swapped exactly once, under one of its
  paths, so the restore puts back the very ``Parameter`` objects (``is``).
- **Tied tensors.** One ``Parameter`` held by two modules (``head.weight =
  emb.weight``) sits in two slots; both get the tensor given for its canonical name
  (the name ``named_parameters()`` reports), so the function sees the tie.
- **Compiled models.** ``torch.compile``'s wrapper is unwrapped (:func:`unwrap`): the
  call runs the eager module. Calling the compiled one with swapped tensors, other
  batch shapes or under ``vmap`` recompiles it (and, with automatic dynamic shapes,
  changes the kernels the training step then runs: a drift of ~1e-7 per step), and
  its graphs have no double backward. Names keep the wrapper's ``_orig_mod.`` prefix,
  as ``model.named_parameters()`` reports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

WRAPPER = "_orig_mod"
"""The attribute under which ``torch.compile``'s ``OptimizedModule`` holds the module."""


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module inside ``torch.compile`` wrappers (``model`` itself if none)."""
    inner = getattr(model, WRAPPER, None)
    while isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, WRAPPER, None)
    return model


def inner_name(name: str) -> str:
    """``name`` (as the possibly compiled model reports it) inside :func:`unwrap`'s module."""
    prefix = WRAPPER + "."
    while name.startswith(prefix):
        name = name[len(prefix) :]
    return name


class Slots:
    """Every ``(module, attribute)`` slot of a module's parameters and buffers, once.

    Attributes:
        paths: ``{canonical name: (path, ...)}``: the canonical name is the one
            ``named_parameters()``/``named_buffers()`` report; the paths are one dotted
            path per distinct slot holding that tensor (one for a shared module, two for
            a weight tied between two modules).
    """

    def __init__(self, module: nn.Module) -> None:
        canonical = {id(t): n for n, t in (*module.named_parameters(), *module.named_buffers())}
        paths: dict[str, list[str]] = {}
        seen: set[tuple[int, str]] = set()
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for local, tensor in (*sub._parameters.items(), *sub._buffers.items()):
                if tensor is None or (id(sub), local) in seen:
                    continue
                seen.add((id(sub), local))
                name = canonical.get(id(tensor))
                if name is not None:  # a non-persistent or unregistered tensor is left alone
                    paths.setdefault(name, []).append(f"{prefix}.{local}" if prefix else local)
        self.paths = {n: tuple(p) for n, p in paths.items()}

    def expand(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{path: tensor}`` for every slot of the canonical names in ``tensors``."""
        out: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            paths = self.paths.get(name)
            if paths is None:
                raise KeyError(
                    f"{name!r} is not a parameter or buffer of the module; names are "
                    f"{list(self.paths)[:8]}"
                )
            for path in paths:
                out[path] = tensor
        return out


def call(
    module: nn.Module,
    tensors: Mapping[str, Tensor],
    args: tuple[Any, ...],
    *,
    slots: Slots | None = None,
) -> Any:
    """``module(*args)`` with ``tensors`` (by canonical name) in place of its own.

    Names not in ``tensors`` keep the module's own tensors. ``module`` must be the
    module the names belong to (unwrap a compiled model first and strip its prefix with
    :func:`inner_name`). The module's ``Parameter`` objects are back in place, the same
    objects, when the call returns or raises.

    Args:
        module: the module to call.
        tensors: ``{canonical name: tensor}`` (see :class:`Slots`).
        args: the positional arguments of ``module.forward``.
        slots: ``Slots(module)``, when the caller calls often and keeps it.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> block = nn.Linear(2, 2, bias=False)
        >>> net = nn.Sequential(block, block)  # one block under two names
        >>> w = torch.eye(2) * 2
        >>> call(net, {"0.weight": w}, (torch.ones(1, 2),))
        tensor([[4., 4.]])
        >>> isinstance(block.weight, nn.Parameter)
        True
    """
    slots = Slots(module) if slots is None else slots
    return functional_call(module, slots.expand(tensors), args, tie_weights=False, strict=False)
