"""Refuse a gradient graph that cannot be differentiated again, naming the layer.

The ``"graph"`` engine differentiates the gradient ``g(w)`` built with
``create_graph=True``. A custom ``autograd.Function`` whose backward is marked
``@once_differentiable`` (as many fused kernels are) computes its part of ``g`` without
a graph and hangs an error node on it; that node has no path back to ``w``, so autograd
prunes it and a double backward *silently* treats that part of ``g`` as constant: the
products are wrong, with no error (a tanh MLP with such an activation: top eigenvalues
0.345, 0.330, 0.306 against 0.508, 0.465, 0.436 exact). C++ operations without a double
backward leave a ``NotImplemented`` node the same way. :func:`check_double_backward`
walks the gradient graph once, when the operator is made, and raises if it holds either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction

from ..functional import Objective

#: Node names autograd gives to the stand-ins of a missing derivative.
MISSING = frozenset(
    {
        "torch::autograd::Error",
        "torch::autograd::DelayedError",
        "torch::autograd::NotImplemented",
    }
)


class NoDoubleBackward(RuntimeError):
    """The gradient graph has a node without a double backward (see the module doc)."""


def _nodes(root: Any) -> list[Any]:
    """Every autograd node reachable from ``root`` (iterative, each once)."""
    seen, stack, out = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        out.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return out


def check_double_backward(gradient: Tensor, objective: Objective, batch: Any) -> None:
    """:class:`NoDoubleBackward` (a ``RuntimeError``) if the gradient graph ``gradient``
    ``[P]`` has a node without a
    double backward; the message names the custom ``autograd.Function`` and the module
    whose output it makes, found in one more forward pass (only on failure).

    Args:
        gradient: ``∇L`` built with ``create_graph=True``.
        objective: the objective it is the gradient of.
        batch: the batch it was taken on.
    """
    if gradient.grad_fn is None:
        return
    missing = sorted({n.name() for n in _nodes(gradient.grad_fn) if n.name() in MISSING})
    if not missing:
        return
    culprits = _custom_functions(objective, batch)
    where = (
        "; ".join(culprits)
        if culprits
        else f"an operation whose double backward autograd lacks ({', '.join(missing)})"
    )
    raise NoDoubleBackward(
        f"the 'graph' HVP engine cannot differentiate this model twice: {where} has no "
        "double backward (a backward marked @once_differentiable, as fused kernels often "
        "are), so its Hessian-vector products would silently be wrong. Use a "
        "differentiable implementation while measuring curvature (e.g. the torch ops the "
        "kernel fuses), give the Function a backward built from differentiable torch ops, "
        "or take the Hessian only in the parameters after it (params=...)"
    )


def _custom_functions(objective: Objective, batch: Any) -> list[str]:
    """``"autograd.Function Name (module 'path', Type)"`` for every custom Function in
    the loss graph whose backward is ``@once_differentiable`` (every custom Function if
    none is marked so)."""
    owners: dict[Any, tuple[str, nn.Module]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and isinstance(output.grad_fn, BackwardCFunction):
                owners.setdefault(output.grad_fn, (name, module))

        return record

    modules = list(objective.model.named_modules())
    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    try:
        with torch.enable_grad(), objective.scope():
            loss = objective(objective.leaves(), batch)
    finally:
        for handle in handles:
            handle.remove()
    custom = [n for n in _nodes(loss.grad_fn) if isinstance(n, BackwardCFunction)]
    marked = [n for n in custom if _once_differentiable(n)] or custom
    names = []
    for node in marked:
        cls = getattr(node, "_forward_cls", type(node))
        text = f"autograd.Function {cls.__name__}"
        if node in owners:
            name, module = owners[node]
            text += f" (the output of module {name!r}, {type(module).__name__})"
        names.append(text)
    return sorted(set(names))


def _once_differentiable(node: Any) -> bool:
    """Whether the node's Function has a backward wrapped by ``once_differentiable``
    (torch's wrapper: code named ``wrapper`` in ``torch/autograd/function.py``)."""
    backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
    code = getattr(backward, "__code__", None)
    return (
        code is not None
        and code.co_name == "wrapper"
        and code.co_filename.replace("\\", "/").endswith("torch/autograd/function.py")
    )
