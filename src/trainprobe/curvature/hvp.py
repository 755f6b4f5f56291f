"""Hessian-vector products of a loss in a model's parameters, one or many vectors a call.

:func:`hessian_operator` returns a :class:`HessianOperator`: the Hessian
``H = ∇²_w L(w)`` at the model's current parameters ``w`` (flattened to ``[P]``, see
:class:`trainprobe.functional.ParamLayout`) as a symmetric operator with ``matvec(v [P])`` and
``matmat(V [P, k])`` for every algorithm of this package. The data loop lives only
here: ``L`` is one batch's loss, or the exact dataset loss over several batches
``L = Σ_b (n_b / N) L_b`` for mean-reduced losses (``Σ_b L_b`` for summed ones), the
last short batch included.

Three engines, all over one :class:`trainprobe.functional.Objective` on a flat ``w``:

- ``"graph"``: double backward. The gradient graph ``g(w) = ∇L`` is built once per
  batch when the operator is made; each product is ``∂(gᵀv)/∂w`` on that graph, and
  ``matmat`` vmaps it over the ``k`` vectors (``is_grads_batched``). The cheapest per
  product on CPU (see ``benchmarks/curvature.py``); holds one graph per batch.
- ``"jvp"``: forward-over-reverse, ``Hv = jvp(grad(L), (w,), (v,))``, vmapped over
  the vectors: nothing cached, a fresh forward and backward each call.
- ``"linearize"``: ``torch.func.linearize(grad(L), w)`` once, then the recorded
  linear map is replayed (vmapped) per call.
- ``"fd"``: central finite differences of first-order gradients,
  ``Hv ≈ (∇L(w + hv) − ∇L(w − hv)) / 2h``, through any kernel that has a backward at all
  (fused or custom ``autograd.Function`` layers marked ``@once_differentiable``, which
  the exact engines refuse). Four gradients per product: each one is also taken at
  ``2h`` for its own error estimate, and one over ``fd_tol`` is retried at smaller steps,
  then refused with :class:`.fd.FiniteDifferenceError` (the step rule, the estimate and
  why every product needs its own: :mod:`.fd`). ``operator.fd_error`` is the largest
  estimate so far.

``"auto"`` picks ``"graph"`` while at most :data:`MAX_CACHED_BATCHES` batches must be
cached, else ``"jvp"``; where the graph engine finds a layer without a double backward,
``"auto"`` falls back to ``"fd"`` with a warning that names the layer and the error
estimate. The choice is in ``operator.engine`` (and why ``"auto"`` fell back, in
``operator.fallback``); the scaled-dot-product attention kernels every engine's
evaluations run on (``"math"``: the scope pins it, finite differences included) are in
``operator.attention``. No engine returns a
product through an operation without the derivative it needs: ``"jvp"`` and
``"linearize"`` raise where forward AD is missing, and ``"graph"`` checks the gradient
graph when the operator is made (:mod:`.differentiability`: a custom
``autograd.Function`` whose backward is ``@once_differentiable`` would otherwise be
differentiated as if its backward were constant). No product changes the
model: parameters and buffers enter as detached copies (BatchNorm statistics never
move), ``.grad`` is never written, module modes are restored and the global RNG is
forked around every evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, linearize, vmap
from torch.utils._pytree import tree_map

from ..functional import (
    LossFn,
    Mode,
    NonFiniteLoss,
    Objective,
    ParamLayout,
    ParamSelection,
    check_loss_fn,
    default_batch_size,
    forward_ad_losses,
    full_float32,
)
from ..notices import warn_user
from .differentiability import NoDoubleBackward, check_double_backward
from .fd import FD_TOL, CentralDifferences
from .pieces import _pieces

Engine = Literal["auto", "graph", "jvp", "linearize", "fd"]
EXACT_ENGINES = ("graph", "jvp", "linearize")
"""The engines whose products are exact up to rounding."""
ENGINES = (*EXACT_ENGINES, "fd")
MAX_CACHED_BATCHES = 16
"""``engine="auto"`` caches gradient graphs for at most this many batches."""
SDPA_FLAGS = (
    ("flash", "flash_sdp_enabled"),
    ("efficient", "mem_efficient_sdp_enabled"),
    ("cudnn", "cudnn_sdp_enabled"),
    ("math", "math_sdp_enabled"),
)
"""Scaled-dot-product attention kernels and the ``torch.backends.cuda`` flag of each."""


def sdpa_kernels() -> str:
    """The scaled-dot-product attention kernels torch may choose from now, joined by
    ``+`` in :data:`SDPA_FLAGS` order: ``"math"`` inside
    :func:`~trainprobe.functional.differentiable_attention`, ``"flash+efficient+cudnn+math"``
    with torch's defaults. Read from the global flags that ``sdpa_kernel`` sets (the CPU's
    fused kernel follows the ``flash`` flag); a flag this torch lacks counts as off."""
    flags = torch.backends.cuda
    return "+".join(name for name, flag in SDPA_FLAGS if getattr(flags, flag, lambda: False)())


class HessianOperator:
    """The Hessian of a model's loss as a symmetric ``[P, P]`` operator (see module doc).

    Make one with :func:`hessian_operator`. Attributes:
        layout: the parameters the Hessian is taken in (``P = layout.size``).
        dim: ``P``.
        dtype, device: of the vectors ``matvec``/``matmat`` take and return.
        engine: the engine in use (``"graph"``, ``"jvp"``, ``"linearize"`` or ``"fd"``).
        mode: ``"eval"`` or ``"train"`` forward semantics.
        loss: the (dataset) loss at ``w``, a 0-d tensor.
        gradient: ``∇L(w)`` ``[P]``.
        point: ``w`` ``[P]`` (a detached copy).
        matvecs: Hessian-vector products applied so far (a ``matmat`` of ``k`` counts ``k``).
        fd_error: with ``engine="fd"``, the largest estimated relative error of any
            product so far (:mod:`.fd`), else None.
        fallback: why ``engine="auto"`` runs on ``"fd"`` (the layer without a double
            backward), else None.
        attention: the scaled-dot-product attention kernels its evaluations may run on
            (:func:`sdpa_kernels` inside the evaluation scope: ``"math"``).
        reduce: what combines the loss, gradient and every product over processes (see
            :func:`hessian_operator`), or None.
    """

    def __init__(
        self,
        objective: Objective,
        pieces: list[tuple[Any, float]],
        *,
        engine: str,
        reduce: Callable[[Tensor], Tensor] | None = None,
        fd_tol: float = FD_TOL,
    ) -> None:
        self.objective = objective
        self.reduce, self.fd_tol = reduce, fd_tol
        self.layout, self.dim = objective.layout, objective.layout.size
        self.device, self.dtype = objective.device, objective.dtype
        self.mode, self.engine = objective.mode, engine
        self.matvecs = 0
        self._vmap_replay = True
        #: whether matmat vmaps its columns (else one product at a time; see matmat)
        self.batched = self.device.type != "cpu" or engine == "jvp"
        self._pieces = pieces
        self.point = objective.flat_point()  # [P]
        self.fd_error: float | None = None
        self.fallback: str | None = None
        self.attention = ""
        self._refinement: HessianOperator | None = None
        objective.check_deterministic(pieces[0][0])
        self._prepare()

    @property
    def refinable(self) -> bool:
        """Whether :meth:`refinement` gives a float64 operator."""
        return self.dtype != torch.float64 and self.engine != "fd"

    def refinement(self) -> HessianOperator | None:
        """The same Hessian at the same point in float64 (made on the first call, then
        kept), for :func:`~.lanczos.lanczos`'s refinement where float32 products leave
        an eigenvalue under their rounding floor; None when this operator is float64
        already or runs on finite differences (whose error is the step's, not the
        dtype's). Its products count in its own ``matvecs``."""
        if not self.refinable:
            return None
        if self._refinement is None:
            objective = self.objective.astype(torch.float64)
            pieces = [(_cast_floats(b, torch.float64), wt) for b, wt in self._pieces]
            self._refinement = HessianOperator(
                objective, pieces, engine=self.engine, reduce=self.reduce, fd_tol=self.fd_tol
            )
        return self._refinement

    # -- evaluation --------------------------------------------------------------------
    def _loss_at(self, w: Tensor, batch: Any, weight: float) -> Tensor:
        """``weight · L(w, batch)`` as a 0-d tensor (call inside ``objective.scope()``)."""
        return weight * self.objective.at(w, batch)

    def _prepare(self) -> None:
        """Loss and gradient per batch; unused-parameter and double-backward checks."""
        w = self.point.clone().requires_grad_(True)
        graphs, grads, losses, used = [], [], [], torch.zeros(len(self.layout.names), dtype=bool)
        for index, (batch, weight) in enumerate(self._pieces):
            parts = self.layout.unflatten(w)
            with torch.enable_grad(), self.objective.scope():
                self.attention = sdpa_kernels()  # what every evaluation's scope allows
                value = weight * self.objective(parts, batch)
                if self.reduce is None:  # else checked once combined, the same on every rank
                    _check_finite_loss(value, index)
                per_param = torch.autograd.grad(
                    value,
                    list(parts.values()),
                    allow_unused=True,
                    create_graph=self.engine == "graph",
                )
            used |= torch.tensor([g is not None for g in per_param])
            flat = self.layout.flatten(
                {
                    name: torch.zeros_like(part) if g is None else g
                    for (name, part), g in zip(parts.items(), per_param, strict=True)
                }
            )  # [P]
            if self.engine == "graph":
                check_double_backward(flat, self.objective, batch)
            graphs.append(flat)
            grads.append(flat.detach())
            losses.append(value.detach())
        _check_used(self.layout, used)
        self.loss = torch.stack(losses).sum()
        self.gradient = torch.stack(grads).sum(dim=0)  # [P]
        if self.reduce is not None:  # one collective for both
            both = self.reduce(torch.cat([self.loss.reshape(1), self.gradient]))  # [1 + P]
            self.loss, self.gradient = both[0], both[1:]
            _check_finite_loss(self.loss, None)
        self._w = w
        self._graphs = graphs if self.engine == "graph" else []
        if self.engine == "fd":
            self._fd = CentralDifferences(
                self._gradient_at, self.point, tol=self.fd_tol, reduce=self.reduce
            )
            self._fd.calibrate(_probe_direction(self.dim, self.point))
            self.fd_error = self._fd.error
        self._linear = []
        if self.engine == "linearize":
            try:
                self._linear = [self._linearize(b, wt) for b, wt in self._pieces]
            except RuntimeError as err:
                raise _engine_error(self.engine, err) from err

    # -- finite differences ------------------------------------------------------------
    def _gradient_at(self, w: Tensor) -> Tensor:
        """``∇L(w)`` ``[P]`` summed over the batches, by first-order autograd only."""
        total = torch.zeros_like(w)
        for batch, weight in self._pieces:
            leaf = w.detach().requires_grad_(True)
            parts = self.layout.unflatten(leaf)
            with torch.enable_grad(), self.objective.scope():
                value = weight * self.objective(parts, batch)
                grads = torch.autograd.grad(value, list(parts.values()), allow_unused=True)
            total += self.layout.flatten(
                {
                    n: torch.zeros_like(p) if g is None else g
                    for (n, p), g in zip(parts.items(), grads, strict=True)
                }
            )
        return total

    def _linearize(self, batch: Any, weight: float) -> Callable[[Tensor], Tensor]:
        gradient = grad(lambda w: self._loss_at(w, batch, weight))
        with self.objective.scope(), forward_ad_losses(), warnings.catch_warnings():
            # torch.fx constant folding inside linearize is chatty about get_attr nodes
            warnings.filterwarnings("ignore", "Attempted to insert a get_attr", UserWarning)
            _, linear = linearize(gradient, self.point)
        return linear

    # -- products ----------------------------------------------------------------------
    def _replay(self, linear: Callable[[Tensor], Tensor], vs: Tensor) -> Tensor:
        """The recorded linear map on ``V [P, k]``: vmapped, or column by column where
        vmap cannot batch the recorded graph (torch 2.13: conv after conv raises a
        view/stride error inside the replay); the fallback is exact, only slower."""
        if vs.shape[1] > 1 and self._vmap_replay:
            try:
                return vmap(linear, in_dims=1, out_dims=1)(vs)
            except RuntimeError as err:
                self._vmap_replay = False
                warn_user(
                    f"linearize engine: vmap cannot batch this model's recorded graph "
                    f"({str(err).splitlines()[0][:80]}); applying it one vector at a time, "
                    "engine='graph' batches",
                    RuntimeWarning,
                )
        return torch.stack([linear(vs[:, i]) for i in range(vs.shape[1])], dim=1)  # [P, k]

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v [P]`` (cast to the operator's dtype and device)."""
        if v.ndim != 1 or v.shape[0] != self.dim:
            raise ValueError(f"matvec: expected a [{self.dim}] vector, got {tuple(v.shape)}")
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def matmat(self, vs: Tensor) -> Tensor:
        """``H V`` for ``V [P, k]``: one batched (``vmap``) call per batch of data, except
        where batching was measured to lose (the CPU with the ``graph`` and ``linearize``
        engines: 0.55–0.66× the speed of single products on a 27k-parameter CNN, see
        ``benchmarks/curvature.py``); there the columns go one at a time."""
        if vs.ndim != 2 or vs.shape[0] != self.dim:
            raise ValueError(f"matmat: expected a [{self.dim}, k] matrix, got {tuple(vs.shape)}")
        vs = vs.detach().to(device=self.device, dtype=self.dtype)
        try:
            with full_float32(self.device):  # the cached graph's double backward too
                if self.engine == "fd":  # combined over processes inside
                    out = self._fd.products(vs)
                    self.fd_error = self._fd.error
                elif self.batched or vs.shape[1] == 1:
                    out = sum(self._products(vs))  # [P, k]
                else:
                    out = torch.cat(
                        [sum(self._products(vs[:, i : i + 1])) for i in range(vs.shape[1])], 1
                    )
        except RuntimeError as err:
            raise _engine_error(self.engine, err) from err
        if self.reduce is not None and self.engine != "fd":
            out = self.reduce(out)
        self.matvecs += vs.shape[1]
        if not bool(torch.isfinite(out).all()):  # deliberate sync: a NaN must not go unnoticed
            raise FloatingPointError(
                f"a Hessian-vector product is not finite (loss {float(self.loss):.4g}); the "
                "loss's second derivative overflows or is undefined here: check the model "
                "for NaN/inf, and in half precision pass dtype=torch.float32"
            )
        return out

    def _products(self, vs: Tensor) -> Iterable[Tensor]:
        if self.engine == "graph":
            for flat in self._graphs:
                yield _double_backward(flat, self._w, vs)
        elif self.engine == "linearize":
            for linear in self._linear:
                yield self._replay(linear, vs)
        else:
            for batch, weight in self._pieces:
                gradient = grad(lambda w, b=batch, wt=weight: self._loss_at(w, b, wt))

                def product(v: Tensor, g: Callable = gradient) -> Tensor:
                    return jvp(g, (self.point,), (v,))[1]

                with self.objective.scope(), forward_ad_losses():
                    yield vmap(product, in_dims=1, out_dims=1)(vs)


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """``batch`` with its floating tensors in ``dtype`` (the rest as they are)."""
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, batch
    )


def _double_backward(flat: Tensor, w: Tensor, vs: Tensor) -> Tensor:
    """``[P, k]`` columns ``∂(gᵀ v_i)/∂w`` on the cached gradient graph ``g = flat``."""
    if not flat.requires_grad:  # the loss is (at most) linear in w: H = 0
        return torch.zeros_like(vs)
    if vs.shape[1] == 1:
        (out,) = torch.autograd.grad(flat, w, vs[:, 0], retain_graph=True, allow_unused=True)
        return torch.zeros_like(vs) if out is None else out.reshape(-1, 1)
    (out,) = torch.autograd.grad(
        flat, w, vs.T.contiguous(), retain_graph=True, allow_unused=True, is_grads_batched=True
    )  # [k, P]
    return torch.zeros_like(vs) if out is None else out.T


def _probe_direction(dim: int, like: Tensor) -> Tensor:
    """``[P]``: a fixed random unit vector (the same on every rank)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(dim, generator=gen, dtype=torch.float64)
    return (v / v.norm()).to(like)


def _check_finite_loss(value: Tensor, index: int | None) -> None:
    """``index``: the batch; None for the loss combined over processes (``reduce``)."""
    if not bool(torch.isfinite(value)):  # deliberate sync, once per batch at construction
        where = (
            f"on batch {index}"
            if index is not None
            else "combined over processes (at least one process's batch gives it)"
        )
        raise NonFiniteLoss(
            f"the loss is {value.detach().item()} {where}: its Hessian is undefined "
            "there; fix the NaN/inf in the model or data if it recurs"
        )


class UnusedParameters(ValueError):
    """Selected parameters the loss does not depend on (their Hessian rows are zero)."""

    def __init__(self, unused: list[str], used: list[str]) -> None:
        super().__init__(
            f"parameters {unused} do not affect the loss (unused in the forward pass), so "
            "their Hessian rows are zero; leave them out with params=..."
        )
        self.unused, self.used = unused, used


def _check_used(layout: ParamLayout, used: Tensor) -> None:
    flags = used.tolist()
    unused = [n for n, u in zip(layout.names, flags, strict=True) if not u]
    if unused:
        raise UnusedParameters(unused, [n for n, u in zip(layout.names, flags, strict=True) if u])


def _engine_error(engine: str, err: RuntimeError) -> RuntimeError:
    text = str(err)
    other = "jvp" if engine in ("graph", "linearize") else "graph"
    if any(s in text for s in ("double backward", "not implemented", "forward AD", "vmap")):
        return RuntimeError(
            f"the {engine!r} HVP engine cannot differentiate this model ({text.splitlines()[0]}); "
            f"an op lacks the needed derivative: try engine={other!r}"
        )
    return err


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    batch: Any = None,
    batches: Iterable[Any] | None = None,
    params: ParamSelection = None,
    mode: Mode = "eval",
    engine: Engine = "auto",
    dtype: torch.dtype | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    batch_size: Callable[[Any], int] = default_batch_size,
    reduce: Callable[[Tensor], Tensor] | None = None,
    fd_tol: float = FD_TOL,
) -> HessianOperator:
    """The Hessian of ``loss_fn`` at ``model``'s current parameters, as an operator.

    Args:
        model: the network (not modified; its parameters are read once, now).
        loss_fn: ``loss(model, batch) -> scalar``; :func:`trainprobe.functional.criterion_loss`
            wraps ``criterion(model(x), y)``.
        batch: one batch (anything ``loss_fn`` takes). Give ``batch`` or ``batches``.
        batches: an iterable of batches (a DataLoader): ``L = Σ_b w_b L_b`` with
            ``w_b = n_b / N`` for ``reduction="mean"`` losses, ``1`` for ``"sum"``.
            Read once, now, under a forked RNG (a shuffling loader does not move
            the global RNG); the batches are kept for the operator's lifetime.
        params: which parameters (see :func:`trainprobe.functional.select_params`); others
            are fixed. The default, every trainable parameter, leaves out those the loss
            does not use (``operator.layout`` names the ones taken); an unused parameter
            named explicitly is an error.
        mode: ``"eval"`` (default; BatchNorm running statistics, no dropout) or
            ``"train"`` (BatchNorm batch statistics, running statistics untouched).
            Randomness in the loss raises a ``ValueError`` naming the module.
        engine: ``"auto"``, ``"graph"``, ``"jvp"``, ``"linearize"`` or ``"fd"`` (module doc).
        dtype: compute dtype (default: the parameters', float32 for bfloat16 and float16
            parameters: a half-precision product has three significant digits; pass
            ``dtype=torch.bfloat16`` to take that); ``torch.float64`` gives exact
            references. Floating tensors of the batches are cast to it.
        reduction: how ``loss_fn`` reduces over examples, for the batch weights.
        batch_size: ``batch -> number of examples`` (default: the first tensor's
            leading size).
        reduce: combines a tensor over processes, e.g. the mean over data-parallel ranks
            whose batches are equal shares of the global batch (the global loss is the
            mean of theirs, and so are its gradient and Hessian): applied to the loss and
            gradient (one call) and to every product, so every rank holds the global
            batch's operator. Every rank must then make the same calls (the same
            Lanczos, seeded alike). A non-finite loss on any rank raises on all.
        fd_tol: with the ``"fd"`` engine, the largest estimated relative error a product
            may have (:mod:`.fd`); also where ``"auto"`` falls back to it.

    Raises:
        ValueError: bad arguments, a random loss, unused parameters (see messages).
        FiniteDifferenceError: an ``"fd"`` product over ``fd_tol`` (a ``FloatingPointError``).
        NonFiniteLoss: the loss is not finite (a ``FloatingPointError``).

    Examples:
        ``L(w) = ½ Σ_i (w·x_i)²`` through a bias-free ``Linear`` has the Hessian
        ``Σ_i x_i x_iᵀ`` whatever ``w``: here ``diag(1, 4)``.

        >>> import torch
        >>> from torch import nn
        >>> from trainprobe.curvature import lanczos
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> H = hessian_operator(
        ...     model, lambda m, x: 0.5 * (m(x) ** 2).sum(), batch=x, dtype=torch.float64
        ... )
        >>> H.dim, H.layout.names
        (2, ('weight',))
        >>> H.matvec(torch.ones(2, dtype=torch.float64))
        tensor([1., 4.], dtype=torch.float64)
        >>> [round(v, 6) for v in lanczos(H, H.dim, top=2).values.tolist()]
        [4.0, 1.0]
    """
    check_loss_fn(loss_fn)
    if engine not in ("auto", *ENGINES):
        raise ValueError(f"engine must be 'auto' or one of {ENGINES}, got {engine!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    objective = Objective(model, loss_fn, params=params, mode=mode, dtype=dtype)
    if dtype is None and objective.dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # a half-precision HVP has 3 significant digits
        objective = Objective(model, loss_fn, params=params, mode=mode, dtype=dtype)
    pieces = _pieces(batch, batches, reduction, batch_size, objective.device, objective.dtype)
    chose = engine == "auto"
    if chose:
        engine = "graph" if len(pieces) <= MAX_CACHED_BATCHES else "jvp"
    try:
        return _operator(objective, pieces, engine, reduce, fd_tol, fallback=chose)
    except UnusedParameters as err:
        if params is not None or not err.used:
            raise
        used = err.used
    # The default selection is what training moves: parameters the loss uses (an unused
    # one gets no .grad either). Named explicitly, an unused parameter is an error.
    objective = Objective(model, loss_fn, params=used, mode=mode, dtype=dtype)
    return _operator(objective, pieces, engine, reduce, fd_tol, fallback=chose)


def _operator(
    objective: Objective,
    pieces: list[tuple[Any, float]],
    engine: str,
    reduce: Callable[[Tensor], Tensor] | None,
    fd_tol: float,
    *,
    fallback: bool,
) -> HessianOperator:
    """The operator on ``engine``; with ``fallback`` (``engine="auto"``), finite
    differences where the graph engine finds a layer without a double backward."""
    try:
        return HessianOperator(objective, pieces, engine=engine, reduce=reduce, fd_tol=fd_tol)
    except NoDoubleBackward as err:
        if not fallback:
            raise
        operator = HessianOperator(objective, pieces, engine="fd", reduce=reduce, fd_tol=fd_tol)
        operator.fallback = str(err).split(". Use ")[0]
        warn_user(
            f"trainprobe: {operator.fallback}; engine='auto' uses finite "
            "differences of gradients instead (engine='fd': four gradients per product, each "
            f"one checked; estimated relative error {operator.fd_error:.1e} so far)"
        )
        return operator
