"""Local complexity: the density of linear regions around training, held-out and random
points (Humayun, Balestriero & Baraniuk 2024, "Deep Networks Always Grok and Here is Why")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..keys import Key
from ..regions import local_complexity, random_frame, segment_pieces
from ..regions.complexity import DEFAULT_DIM
from .base import PerLayer, ProbeOptions, StepContext, Value
from .schedules import Schedule, log_spaced

Points = Tensor | tuple | list


@dataclass(frozen=True, kw_only=True, eq=False)
class LocalComplexity(ProbeOptions):
    """Neurons whose state changes in a small cross-polytope around each point.

    Around each point ``x`` the neighbourhood is the cross-polytope of radius ``r`` with
    vertices ``x ± r u_i`` along an orthonormal frame of ``dim`` input directions (drawn
    once from ``seed`` and kept, so successive measurements differ only by the model), or
    along the ``directions`` given.
    All vertices of all points go through the model in one forward (eval semantics:
    BatchNorm running statistics, no dropout); a neuron counts when its state differs
    among the vertices: the pre-activation sign at the input of an ``nn.ReLU``,
    ``nn.LeakyReLU`` or ``nn.PReLU`` module, or the argmax of a max-pool window (see
    :func:`trainprobe.regions.local_complexity`). Sign changes among the vertices are
    exactly the hyperplanes of first-layer neurons that cut the neighbourhood, and a lower
    bound for deeper neurons (whose zero sets may bend between the vertices). The output
    layer is not counted, nor are activations applied as functions (``F.relu``), which
    module hooks cannot see.
    The paper finds the count falls around training points (and rises near the decision
    boundary) when a network groks; compare the train, test and random sets.

    Keys: see ``keys`` (``<set>`` is ``train``, ``test`` or ``random``;
    ``segment_pieces`` with ``segments=True``, for sets of two points or more, exact:
    see :func:`trainprobe.regions.segment_pieces`; ReLU, LeakyReLU and PReLU models only).

    Args:
        train: training points ``[N, *shape]`` (or a batch ``(inputs, targets)``);
            default: the step's ``batch=`` inputs.
        test: held-out points, or None.
        random: random points ``[n, *shape]``, or an integer ``n``: drawn once (at the
            first measurement, from ``seed + 1``) from a Gaussian with the train
            points' per-feature mean and standard deviation; None: no random set.
        radius: ``r``, in input units (default 0.1; the paper: 0.005 on standardised
            CIFAR-10); a small fraction of the distance between points.
        dim: frame directions ``k`` (default ``min(20, D)``: the paper's 40 vertices).
        directions: ``[k, D]`` explicit directions ``u_i`` over the ``D = prod(shape)``
            flattened input features (e.g. toward other classes, or along a data
            manifold), used at every measurement instead of a random frame: exactly
            :func:`trainprobe.regions.local_complexity` with ``frame=directions``. Taken
            as given: a row's norm scales its radius (unit rows, e.g. the ``Q`` of
            ``torch.linalg.qr``, keep every vertex at distance ``r``). Finite, no zero
            row, not with ``dim``; the run metadata records its shape and dtype.
        segments: also record ``segment_pieces`` (one forward per piece crossed: off by
            default, since long segments cross many regions).
        max_points: the first points of each set used.
        max_steps: the segment walk's step limit (see ``segment_pieces``).
        seed: the frame (``seed``, unused with ``directions``) and random points
            (``seed + 1``) generators.
        schedule: when to measure (default ``log_spaced()``: the paper reads the
            complexity on a log-scaled step axis; ~10 measurements per decade of steps).
        name: see :class:`~.base.ProbeOptions`.
    """

    name: str = "regions"
    across_ranks = "own_data"
    own_data = "train"
    schedule: Schedule = log_spaced()
    keys = (
        Key(
            "regions/<set>/total",
            "mean over the set's points of the neurons whose state changes in the cross-polytope "
            "around each point, summed over layers (Humayun et al. 2024)",
        ),
        Key(
            "regions/<set>/layer/<module>",
            "mean over the set's points of one module's neurons whose state changes around each "
            "point",
        ),
        Key(
            "regions/<set>/segment_pieces",
            "mean number of linear pieces along the segments between consecutive points",
        ),
    )

    train: Points | None = field(default=None, repr=False)
    test: Points | None = field(default=None, repr=False)
    random: Points | int | None = field(default=None, repr=False)
    radius: float = 0.1
    dim: int | None = None
    directions: Tensor | None = field(default=None, repr=False)
    segments: bool = False
    max_points: int = 256
    max_steps: int = 10_000
    seed: int = 0
    # the given point sets as [N, *shape] tensors (detached inputs of a batch)
    _train: Tensor | None = field(default=None, init=False, repr=False)
    _test: Tensor | None = field(default=None, init=False, repr=False)
    _given_random: Tensor | None = field(default=None, init=False, repr=False)
    _directions: Tensor | None = field(default=None, init=False, repr=False)  # given, [k, D]
    _frames: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)  # [k, D]
    _random: Tensor | None = field(default=None, init=False, repr=False)  # drawn, [n, *shape]

    def __post_init__(self) -> None:
        super().__post_init__()
        self._keep(_train=_points(self.train, "train"), _test=_points(self.test, "test"))
        if isinstance(self.random, int) and not isinstance(self.random, bool):
            _check_int("random", self.random, 1)
        else:
            self._keep(_given_random=_points(self.random, "random"))
        radius = self.radius
        if not (isinstance(radius, int | float) and not isinstance(radius, bool) and radius > 0):
            raise ValueError(f"LocalComplexity: radius must be a number > 0, got {radius!r}")
        if self.dim is not None:
            _check_int("dim", self.dim, 1)
        _check_int("max_points", self.max_points, 1)
        _check_int("max_steps", self.max_steps, 1)
        if self.directions is not None:
            self._keep_directions()

    def _keep_directions(self) -> None:
        """Check ``directions`` against ``dim`` and the point sets given; keep a copy."""
        if self.dim is not None:
            raise ValueError(
                "LocalComplexity: pass directions= (explicit directions) or dim= (the size of "
                "a random frame), not both"
            )
        directions = _checked_directions(self.directions)
        given = {"train": self._train, "test": self._test, "random": self._given_random}
        for name, points in given.items():
            if points is not None:
                _match_directions(directions, points, f"the {name} points")
        self._keep(_directions=directions)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        sets = self._sets(ctx)
        x = torch.cat(list(sets.values()))  # [N_total, *shape]
        counts = local_complexity(ctx.model, x, radius=float(self.radius), frame=self._frame(x))
        out: dict[str, Value] = {}
        rows = counts.counts.float().split([len(p) for p in sets.values()])  # [N_set, L] each
        for (name, points), per_point in zip(sets.items(), rows, strict=True):
            out[f"{self.name}/{name}/total"] = per_point.sum(dim=1).mean()
            out[f"{self.name}/{name}/layer"] = PerLayer(counts.layers, per_point.mean(dim=0))
            if self.segments and len(points) >= 2:
                pieces = segment_pieces(
                    ctx.model, points[:-1], points[1:], max_steps=self.max_steps
                ).pieces
                out[f"{self.name}/{name}/segment_pieces"] = pieces.double().mean()
        return out

    def _sets(self, ctx: StepContext) -> dict[str, Tensor]:
        """The point sets on the model's device and dtype, ``max_points`` each."""
        train = self._train if self._train is not None else _step_inputs(ctx.batch)
        like = next((p for p in ctx.model.parameters() if p.is_floating_point()), train)
        sets = {"train": train, "test": self._test}
        if self.random is not None:
            sets["random"] = (
                self._given_random if self._given_random is not None else self._random_points(train)
            )
        moved = {
            name: points[: self.max_points].to(device=like.device, dtype=like.dtype)
            for name, points in sets.items()
            if points is not None
        }
        shapes = {name: tuple(p.shape[1:]) for name, p in moved.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"LocalComplexity: point sets differ in shape: {shapes}")
        return moved

    def _random_points(self, train: Tensor) -> Tensor:
        """``n`` Gaussian points matching the train points' per-feature mean and std."""
        if self._random is None or self._random.shape[1:] != train.shape[1:]:
            std, mean = torch.std_mean(train.double(), dim=0, correction=0)  # [*shape] each
            generator = torch.Generator().manual_seed(self.seed + 1)
            noise = torch.randn(
                (self.random, *train.shape[1:]), generator=generator, dtype=torch.float64
            )
            self._keep(_random=mean + std * noise.to(mean.device))  # [n, *shape]
        return self._random

    def _frame(self, x: Tensor) -> Tensor:
        if self._directions is not None:
            return _match_directions(self._directions, x, "the points")
        features = x[0].numel()
        if features not in self._frames:
            dim = min(DEFAULT_DIM, features) if self.dim is None else self.dim
            generator = torch.Generator().manual_seed(self.seed)
            frame = random_frame(dim, features, generator=generator, dtype=torch.float64)
            self._frames[features] = frame  # [k, D], cast to the points' dtype when used
        return self._frames[features]


def _points(value: object, what: str) -> Tensor | None:
    """A set's ``[N, *shape]`` points from a tensor or a batch ``(inputs, ...)``."""
    if value is None:
        return None
    inputs = value[0] if isinstance(value, tuple | list) and value else value
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
        raise TypeError(
            f"LocalComplexity: {what}= must be a floating tensor [N, *shape] or a batch "
            f"(inputs, targets), got {type(value).__name__}"
        )
    return inputs.detach()


def _checked_directions(value: object) -> Tensor:
    """``directions`` ``[k, D]`` detached, once checked: floating, finite, no zero row."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        what = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(
            f"LocalComplexity: directions= must be a floating tensor [k, D] (k directions over "
            f"the D flattened input features), got {what}"
        )
    if value.ndim != 2 or 0 in value.shape:
        raise ValueError(
            f"LocalComplexity: directions= must be [k, D] with k >= 1 directions over the D "
            f"flattened input features, got shape {tuple(value.shape)}; flatten each "
            "direction, e.g. directions.reshape(k, -1)"
        )
    rows = value.detach().to("cpu", torch.float64)  # deliberate: read once, when built
    bad = (~torch.isfinite(rows).all(dim=1)).nonzero()[:, 0].tolist()
    if bad:
        raise ValueError(
            f"LocalComplexity: directions= has NaN or infinite entries in rows {bad[:8]}; "
            "pass finite directions"
        )
    zero = (rows.abs().amax(dim=1) == 0).nonzero()[:, 0].tolist()
    if zero:
        raise ValueError(
            f"LocalComplexity: directions= rows {zero[:8]} are zero (both their vertices "
            "would be the point itself); drop them or pass nonzero directions"
        )
    return value.detach().clone()


def _match_directions(directions: Tensor, points: Tensor, what: str) -> Tensor:
    """``directions`` if its ``D`` is the points' features per example, else a ValueError."""
    features = math.prod(points.shape[1:])
    if directions.shape[1] != features:
        raise ValueError(
            f"LocalComplexity: directions= are [k, {directions.shape[1]}] but {what} have "
            f"{features} features per example (shape {tuple(points.shape[1:])}); pass "
            f"directions of shape [k, {features}]"
        )
    return directions


def _step_inputs(batch: Any) -> Tensor:
    if batch is None:
        raise ValueError(
            "LocalComplexity needs points: pass train= to the probe, or batch= to mon.step()"
        )
    try:
        return _points(batch, "the step's batch")  # type: ignore[return-value]
    except TypeError as err:
        raise ValueError(f"{err}; pass train= (the inputs) to the probe") from None


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"LocalComplexity: {name} must be an integer >= {minimum}, got {value!r}")
