"""Gradient flow through depth and time: the gradient reaching each module's output."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..keys import Key
from .activations import SKIPPED, _first_tensor, _is_compiled
from .base import OnHost, PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, every
from .tensors import stack_scalars


def _wide(grad: Tensor) -> Tensor:
    """``grad`` detached, in float32 at least (float64 stays), for sums of squares."""
    return grad.detach().to(torch.float64 if grad.dtype == torch.float64 else torch.float32)


@dataclass
class _Flow:
    """What one module's output received in this step's backward passes (summed)."""

    time_dim: int | None
    squares: Tensor | None = None  # 0-d: ||dL/dy||² over the batch
    positions: Tensor | None = None  # [T]: ||dL/dy_t||² per position, with a time_dim

    def add(self, grad: Tensor) -> None:
        g = _wide(grad)
        squares = g.pow(2).sum()
        self.squares = squares if self.squares is None else self.squares + squares
        if self.time_dim is None or g.ndim < 2:
            return
        per = g.movedim(self.time_dim, 0).reshape(g.shape[self.time_dim], -1).pow(2).sum(1)
        if self.positions is None or self.positions.shape != per.shape:
            self.positions = per  # [T] (a new length restarts the profile)
        else:
            self.positions = self.positions + per


@dataclass
class _Calls:
    """A recurrent cell's outputs, one per call (one per time step): ``||∂L/∂h_t||²`` at
    call ``t`` of each forward pass, summed over the passes of the step."""

    count: int = 0  # calls in the current forward pass
    squares: list[Tensor | None] = field(default_factory=list)

    def hook(self) -> Any:
        t = self.count
        self.count += 1
        if t == len(self.squares):
            self.squares.append(None)

        def add(grad: Tensor) -> None:
            sq = _wide(grad).pow(2).sum()
            self.squares[t] = sq if self.squares[t] is None else self.squares[t] + sq

        return add

    def positions(self) -> Tensor | None:
        """``[T]`` per-call squares (a call whose output got no gradient reads 0)."""
        got = [s for s in self.squares if s is not None]
        if len(self.squares) < 2 or not got:
            return None
        zero = torch.zeros_like(got[0])
        return torch.stack([zero if s is None else s for s in self.squares])


def _output_tensor(output: Any) -> Tensor | None:
    """The tensor a module returned: an RNN's sequence output (not its last state), a
    packed sequence's data ``[sum_T, H]``, else the first tensor of a tuple."""
    head = output[0] if isinstance(output, tuple | list) and output else output
    if isinstance(output, PackedSequence) or isinstance(head, PackedSequence):
        return (output if isinstance(output, PackedSequence) else head).data
    return _first_tensor(output)


def _profile_index(length: int, points: int) -> Tensor:
    """``[k]`` positions (on the CPU) spread evenly from the first to the last of
    ``length``, ``points`` of them less repeats."""
    return torch.linspace(0, length - 1, points).round().long().unique()


def _label(name: str) -> str:
    """A module's name in the keys: the watched model itself (``""``) is ``model``."""
    return name or "model"


class _TensorHooks:
    """The hooks put on this step's output tensors, removed with the module hooks."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


@dataclass(frozen=True, kw_only=True, eq=False)
class GradientFlow(ProbeOptions):
    """The norm of ``∂L/∂y`` for each watched module's output ``y`` (depth), and for a
    module reading a sequence ``x`` ``[B, T, ...]`` the norm of ``∂L/∂x_t`` at each
    position ``t`` (time).

    Parameter gradients say how much each weight moves; they do not say how much signal
    reaches a layer from above. A recurrent net can have ordinary parameter gradients
    while ``∂L/∂h_1`` is 1e-10 of ``∂L/∂h_T``: the gradient vanishes through time
    (Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013), and what the
    first steps of a sequence carry is never learned. The recurrence is inside the
    module, so time is read at its input: ``∂L/∂x_t = (∂h_t/∂x_t)ᵀ ∂L/∂h_t`` is what
    reaches position ``t`` through the recurrence. A forward hook on each watched module
    puts a hook on its output tensor (a pre-hook on its input sequence); during the
    user's backward they add up ``||∂L/∂y||²`` (and ``||∂L/∂x_t||²`` per position, summed
    over the batch and the features) on the device, without changing any gradient.
    Several backward passes in one step block (gradient accumulation) add up.

    A recurrent cell (``nn.RNNCell``/``nn.GRUCell``/``nn.LSTMCell``, called once per time
    step by a hand-written loop) gets its positions from its calls: ``||∂L/∂h_t||`` of the
    output of call ``t`` (the hidden state, with all it passes on to later steps).

    Positions: a module reads a sequence when ``time_dims`` names it, and every
    ``nn.RNN``/``nn.GRU``/``nn.LSTM`` does (axis 1 with ``batch_first``, else 0; a packed
    sequence or integer ids have no positions to read). A floating input that does not
    require a gradient (the data itself) is passed on as a leaf that does, with the same
    values: parameter gradients are unchanged (bit for bit), at the cost of the input's
    gradient. ``first``/``last`` are the first and last positions, ``ratio = first /
    last``, and ``profile`` the norms at ``profile_points`` positions spread evenly from
    the first to the last.

    Under ``torch.distributed`` (DDP, FSDP2) each rank's hooks see ``∂L_r/∂y_r`` of its
    own mean loss ``L_r``, and the gradient the ranks apply is that of their mean ``L =
    (1/W) Σ_r L_r``, so ``||∂L/∂y||² = Σ_r ||∂L_r/∂y_r||² / W²`` (the same per position):
    each rank sends its squares divided by ``W²`` (:class:`~.base.OnHost`, summed by the
    monitor) and the keys are those of one process on the global batch.

    Keys: see ``keys``. It cannot hook a ``torch.compile``'d module (hooks there run
    only while tracing): it is disabled with a warning there; watch ``model._orig_mod``.

    Args:
        modules: names of the modules to watch (default: every leaf module but dropout,
            identity and reshaping ones, and every recurrent module).
        time_dims: ``{module name: axis}`` of positions in other modules' inputs (e.g.
            ``{"encoder": 1}`` for a ``[B, T, D]`` transformer block; ``""`` is the
            watched model itself, ``model`` in the keys).
        profile_points: positions kept in ``profile`` (default 16).
        schedule: when to measure (default every 10 steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "grad_flow"
    across_ranks = "combined"  # squares / W² summed over ranks
    schedule: Schedule = every(10)
    keys = (
        Key("grad_flow/norm/<module>", "‖∂L/∂y‖ of the module's output y over the batch"),
        Key("grad_flow/first/<module>", "‖∂L/∂x_t‖ at the first position of the input sequence"),
        Key("grad_flow/last/<module>", "‖∂L/∂x_t‖ at the last position of the input sequence"),
        Key(
            "grad_flow/ratio/<module>",
            "first / last: under 1e-3, the gradient vanishes through time",
        ),
        Key(
            "grad_flow/profile/<module>",
            "[profile_points] ‖∂L/∂x_t‖ at positions spread evenly from the first to the last",
        ),
    )
    needs = frozenset({"activations"})

    modules: Iterable[str] | None = None
    time_dims: Mapping[str, int] | None = None
    profile_points: int = 16
    _flows: dict[str, _Flow] = field(default_factory=dict, init=False, repr=False)
    _inputs: dict[str, _Flow] = field(default_factory=dict, init=False, repr=False)
    _calls: dict[str, _Calls] = field(default_factory=dict, init=False, repr=False)
    _watched_cache: tuple[nn.Module, dict[str, nn.Module]] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.modules, str):
            raise TypeError("GradientFlow(modules=...) takes a list of names, not one string")
        dims = self.time_dims
        if dims is not None and (
            not isinstance(dims, Mapping)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims.values())
        ):
            raise TypeError(
                "GradientFlow(time_dims=...) must map module names to the axis of positions "
                f"in their outputs, e.g. {{'encoder': 1}}, got {dims!r}"
            )
        p = self.profile_points
        if isinstance(p, bool) or not isinstance(p, int) or p < 2:
            raise ValueError(f"GradientFlow(profile_points=...) must be an integer >= 2, got {p!r}")

    def _watched(self, model: nn.Module) -> dict[str, nn.Module]:
        if _is_compiled(model):
            raise RuntimeError(
                "GradientFlow cannot hook a torch.compile'd module (hooks run only while "
                "tracing); watch the uncompiled module (model._orig_mod) or drop GradientFlow"
            )
        named = dict(model.named_modules())
        wanted = [*(self.modules or ()), *(self.time_dims or {})]
        missing = [m for m in wanted if m not in named]
        if missing:
            raise ValueError(
                f"GradientFlow: no module named {missing} in the model; "
                f"choose from {[n for n in named if n][:20]}"
            )
        if self.modules is not None:
            return {m: named[m] for m in (*self.modules, *(self.time_dims or {}))}
        timed = {m: named[m] for m in self.time_dims or {}}
        return timed | {
            n: m
            for n, m in named.items()
            if n
            and (isinstance(m, nn.RNNBase) or not any(m.children()))
            and not isinstance(m, SKIPPED)
        }

    def _time_dim(self, name: str, module: nn.Module) -> int | None:
        if self.time_dims is not None and name in self.time_dims:
            return self.time_dims[name]
        if isinstance(module, nn.RNNBase):
            return 1 if module.batch_first else 0
        return None

    def attach(self, model: nn.Module) -> list[Any]:
        self._flows.clear()
        self._inputs.clear()
        self._calls.clear()
        if self._watched_cache is None or self._watched_cache[0] is not model:
            self._keep(_watched_cache=(model, self._watched(model)))
        tensors = _TensorHooks()

        def new_pass(_m: nn.Module, _args: Any) -> None:  # time restarts at each forward
            for calls in self._calls.values():
                calls.count = 0

        handles: list[Any] = [tensors, model.register_forward_pre_hook(new_pass)]
        try:
            for name, module in self._watched_cache[1].items():
                handles += self._hook(name, module, tensors)
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _hook(self, name: str, module: nn.Module, tensors: _TensorHooks) -> list[Any]:
        """A forward hook adding up ``||∂L/∂y||²`` of the output; with a time axis, a
        forward pre-hook adding up ``||∂L/∂x_t||²`` of the input sequence."""
        out = self._flows[name] = _Flow(None)

        def on_output(_m: nn.Module, _i: Any, output: Any) -> None:
            tensor = _output_tensor(output)
            if tensor is not None and tensor.requires_grad:
                tensors.handles.append(tensor.register_hook(out.add))

        handles = [module.register_forward_hook(on_output)]
        if isinstance(module, nn.RNNCellBase):  # called once per time step
            calls = self._calls[name] = _Calls()

            def on_call(_m: nn.Module, _i: Any, output: Any) -> None:
                tensor = _output_tensor(output)
                if tensor is not None and tensor.requires_grad:
                    tensors.handles.append(tensor.register_hook(calls.hook()))

            handles.append(module.register_forward_hook(on_call))
        time_dim = self._time_dim(name, module)
        if time_dim is None:
            return handles
        seq = self._inputs[name] = _Flow(time_dim)

        def on_input(_m: nn.Module, args: tuple) -> tuple | None:
            x = args[0] if args else None
            if not isinstance(x, Tensor) or not x.is_floating_point():
                return None  # a packed sequence or token ids: no positions to read
            if not torch.is_grad_enabled():
                return None
            if x.requires_grad:
                tensors.handles.append(x.register_hook(seq.add))
                return None
            # raw data: a leaf that asks for its gradient (same values), passed on as a
            # copy, so that a module writing into its input in place still can
            leaf = x.detach().requires_grad_(True)
            tensors.handles.append(leaf.register_hook(seq.add))
            return (leaf.clone(), *args[1:])

        handles.append(module.register_forward_pre_hook(on_input))
        return handles

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        flows = {n: f for n, f in self._flows.items() if f.squares is not None}
        self._flows.clear()
        if not flows:
            return {}
        timed = {n: f.positions for n, f in self._inputs.items() if f.positions is not None}
        for name, calls in self._calls.items():
            positions = calls.positions()
            if positions is not None:
                timed[name] = positions  # [T]: ||∂L/∂h_t||² of the cell's calls
        self._inputs.clear()
        self._calls.clear()
        if ctx.ranks is not None:
            return self._squares(ctx, flows, timed)
        names = tuple(map(_label, flows))
        out: dict[str, Value] = {
            f"{self.name}/norm": PerLayer(  # hooks saw the AMP-scaled loss's gradients
                names, ctx.unscaled(stack_scalars([f.squares for f in flows.values()]).sqrt())
            ),
        }
        if timed:
            seq = tuple(map(_label, timed))
            first = ctx.unscaled(stack_scalars([p[0] for p in timed.values()]).sqrt())  # [S]
            last = ctx.unscaled(stack_scalars([p[-1] for p in timed.values()]).sqrt())  # [S]
            out[f"{self.name}/first"] = PerLayer(seq, first)
            out[f"{self.name}/last"] = PerLayer(seq, last)
            out[f"{self.name}/ratio"] = PerLayer(seq, first / last)
            for name, positions in timed.items():
                index = _profile_index(positions.shape[0], self.profile_points)
                profile = ctx.unscaled(positions[index.to(positions.device)].sqrt())  # [k]
                out[f"{self.name}/profile/{_label(name)}"] = profile
        return out

    def _squares(
        self, ctx: StepContext, flows: dict[str, _Flow], timed: dict[str, Tensor]
    ) -> dict[str, Value]:
        """Under ranks: this rank's squares times ``(1 / (W · loss scale))²`` (see the class
        doc), as values the monitor sums over ranks and finishes on the host: the norms,
        first and last positions in one, each module's profile in its own (its length is
        that module's)."""
        rows = [f.squares for f in flows.values()]
        rows += [p[0] for p in timed.values()] + [p[-1] for p in timed.values()]
        squares = stack_scalars(rows).double()  # [M + 2S]
        factor = torch.full((), 1.0 / ctx.ranks.world, dtype=torch.float64, device=squares.device)
        factor = ctx.unscaled(factor).square()  # (1 / (W · loss scale))²
        finish = partial(
            _flow_norms,
            probe=self.name,
            names=tuple(map(_label, flows)),
            timed=tuple(map(_label, timed)),
        )
        out: dict[str, Value] = {
            f"{self.name}/squares": OnHost(squares * factor, finish, reduce="sum")
        }
        for name, positions in timed.items():
            index = _profile_index(positions.shape[0], self.profile_points)
            picked = positions[index.to(positions.device)].double() * factor.to(positions.device)
            key = f"{self.name}/profile/{_label(name)}"
            out[f"{self.name}/profile_squares/{_label(name)}"] = OnHost(
                picked, partial(_profile, key=key), reduce="sum"
            )  # [k]
        return out


def _flow_norms(
    squares: np.ndarray, *, probe: str, names: tuple[str, ...], timed: tuple[str, ...]
) -> dict[str, float]:
    """``norm``, ``first``, ``last`` and ``ratio`` from ``[M + 2S]`` squares summed over ranks."""
    norms = np.sqrt(np.asarray(squares, dtype=np.float64).reshape(-1))  # [M + 2S]
    m, s = len(names), len(timed)
    out = {f"{probe}/norm/{n}": float(v) for n, v in zip(names, norms[:m], strict=True)}
    first, last = norms[m : m + s], norms[m + s :]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = first / last  # inf or NaN where the last position got nothing, as in torch
    for label, a, b, r in zip(timed, first, last, ratio, strict=True):
        out.update({f"{probe}/first/{label}": float(a), f"{probe}/last/{label}": float(b)})
        out[f"{probe}/ratio/{label}"] = float(r)
    return out


def _profile(squares: np.ndarray, *, key: str) -> dict[str, np.ndarray]:
    """``{key: [k] norms}`` from a profile's squares summed over ranks."""
    return {key: np.sqrt(np.asarray(squares, dtype=np.float64).reshape(-1))}
