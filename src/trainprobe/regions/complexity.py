"""Local complexity: how many neurons change state within a small neighbourhood of a point
(Humayun, Balestriero & Baraniuk 2024, "Deep Networks Always Grok and Here is Why").

The neighbourhood of a point ``x`` is the cross-polytope of radius ``r`` spanned by an
orthonormal frame ``u_1, ..., u_k`` of input directions: its ``2k`` vertices are
``x ± r u_i``. All vertices of all points go through the model in one batched forward
(eval semantics); a neuron counts for ``x`` when its state differs among the vertices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..functional import rng_fork, semantics, unwrap
from ._hooks import PatternRecorder, pattern_modules, remove

DEFAULT_DIM = 20
"""Frame directions by default (capped at the input dimension): the paper's 40-vertex
neighbourhood (``n_frame = 40`` in the authors' CIFAR-10 configuration)."""


@dataclass(frozen=True)
class ComplexityCounts:
    """Neurons whose state changes within each point's neighbourhood.

    Attributes:
        layers: the watched modules in call order (a module called several times
            pools the neurons of all its calls).
        counts: ``[N, L]`` changed neurons per point and layer (int64).
        neurons: ``[L]`` neurons per layer and point (elements of the module's input;
            output elements for max-pools).
    """

    layers: tuple[str, ...]
    counts: Tensor  # [N, L]
    neurons: Tensor  # [L]

    @property
    def total(self) -> Tensor:
        """``[N]`` changed neurons per point, summed over layers."""
        return self.counts.sum(dim=1)


def random_frame(
    dim: int, features: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[dim, features]`` orthonormal rows, uniformly (Haar) distributed.

    The QR factor of a Gaussian ``[features, dim]`` matrix, its columns' signs fixed by
    the diagonal of ``R`` (Mezzadri 2007, "How to generate random matrices from the
    classical compact groups"). Drawn on the CPU from ``generator``.

    Raises:
        ValueError: ``dim`` not an integer in ``[1, features]``.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= features:
        raise ValueError(
            f"frame dim must be an integer in [1, {features}] (the input dimension), got {dim!r}"
        )
    gaussian = torch.randn(features, dim, generator=generator, dtype=torch.float64)  # [D, k]
    q, r = torch.linalg.qr(gaussian)  # [D, k], [k, k]
    return (q * torch.sign(torch.diagonal(r))).T.to(dtype)  # [k, D]


def cross_polytope(x: Tensor, frame: Tensor, radius: float) -> Tensor:
    """The ``2k`` vertices ``x ± r u_i`` of every point's neighbourhood.

    Args:
        x: ``[N, *shape]`` points.
        frame: ``[k, D]`` directions ``u_i`` (unit rows), ``D = prod(shape)``.
        radius: ``r``.

    Returns:
        ``[N, 2k, *shape]``: ``x + r u_1, ..., x + r u_k, x − r u_1, ..., x − r u_k``.
    """
    flat = x.reshape(x.shape[0], 1, -1)  # [N, 1, D]
    step = radius * frame.to(device=x.device, dtype=x.dtype)[None]  # [1, k, D]
    vertices = torch.cat([flat + step, flat - step], dim=1)  # [N, 2k, D]
    return vertices.reshape(x.shape[0], 2 * frame.shape[0], *x.shape[1:])


def local_complexity(
    model: nn.Module,
    x: Tensor,
    *,
    radius: float,
    frame: Tensor | None = None,
    dim: int | None = None,
    generator: torch.Generator | None = None,
) -> ComplexityCounts:
    """Neurons whose state changes among the vertices of each point's cross-polytope.

    ``LC(x) = Σ_layers #{n : state_n(v) ≠ state_n(v') for some vertices v, v'}``, the
    number of neurons whose zero set (the boundary of a linear region) separates two
    vertices. A neuron of a ReLU/LeakyReLU/PReLU module is its input element ``z`` with
    state ``z > 0``; a max-pool neuron is one output element with state its argmax
    position within the window (ties keep the first maximum, so a window of equal
    inputs, e.g. all zero after a ReLU, does not change while it stays tied).

    What is counted is a sign change AMONG THE VERTICES. For a first-layer neuron, ``z``
    is affine in the input, so this is exactly whether its hyperplane cuts the
    neighbourhood. A deeper neuron's ``z`` is only piecewise affine: it may change sign
    inside the neighbourhood and agree at every vertex, so the count is a lower bound of
    the neurons whose zero set meets the neighbourhood. The model's output is not a
    neuron and is not counted (a final ``nn.ReLU`` module would be).

    Evaluated in eval mode (BatchNorm running statistics, no dropout; every module's
    mode restored), without gradients and with the global RNG forked: the model, its
    buffers and ``.grad`` are left as they were. Hooks are removed in ``finally``.

    Args:
        model: built from affine layers and the modules listed in
            :data:`~trainprobe.regions._hooks.SUPPORTED` (see ``pattern_modules``).
        x: ``[N, *shape]`` points, in the model's dtype and device.
        radius: ``r > 0``, in input units.
        frame: ``[k, D]`` orthonormal directions shared by all points; default: a random
            frame of ``dim`` directions drawn from ``generator``.
        dim: directions of a random frame (default ``min(20, D)``).
        generator: the randomness of a random frame (required without ``frame``).

    Raises:
        ValueError: bad ``x``, ``radius`` or ``frame``, no ``generator`` for a random
            frame, or a model that is not piecewise linear (see ``pattern_modules``).
    """
    _check_points(x, radius)
    features = x[0].numel()
    if frame is None:
        if generator is None:
            raise ValueError("local_complexity: pass frame= or a torch.Generator as generator=")
        default = min(DEFAULT_DIM, features)
        frame = random_frame(default if dim is None else dim, features, generator=generator)
    if frame.ndim != 2 or frame.shape[1] != features or frame.shape[0] < 1:
        raise ValueError(
            f"local_complexity: frame must be [k, {features}] (k >= 1 directions over the "
            f"flattened input), got {tuple(frame.shape)}"
        )
    vertices = cross_polytope(x, frame, radius).flatten(0, 1)  # [N·2k, *shape]
    model = unwrap(model)  # the eager module: hooks run, no recompiles
    recorder = PatternRecorder(
        pattern_modules(model, "local_complexity"), len(vertices), "local_complexity"
    )
    handles = recorder.attach()
    try:
        with torch.no_grad(), semantics(model, "eval"), rng_fork(x.device):
            model(vertices)
    finally:
        remove(handles)
    return _tally(recorder.calls, len(x))


def _tally(calls: list[tuple[str, Tensor]], points: int) -> ComplexityCounts:
    """Changed neurons per point and layer from per-call ``[N·V, F]`` states."""
    counts: dict[str, Tensor] = {}
    neurons: dict[str, int] = {}
    for name, state in calls:
        grouped = state.reshape(points, -1, state.shape[1])  # [N, V, F]
        changed = (grouped != grouped[:, :1]).any(dim=1).sum(dim=1)  # [N]
        counts[name] = counts[name] + changed if name in counts else changed
        neurons[name] = neurons.get(name, 0) + state.shape[1]
    device = calls[0][1].device if calls else torch.device("cpu")
    if not counts:
        return ComplexityCounts(
            (),
            torch.zeros(points, 0, dtype=torch.int64, device=device),
            torch.zeros(0, dtype=torch.int64),
        )
    return ComplexityCounts(
        tuple(counts),
        torch.stack(list(counts.values()), dim=1),  # [N, L]
        torch.tensor(list(neurons.values()), dtype=torch.int64),
    )


def _check_points(x: object, radius: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or len(x) == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"points must be a floating tensor [N, *shape] with N >= 1 (batch first), got {shape}"
        )
    if (
        isinstance(radius, bool)
        or not isinstance(radius, int | float)
        or not (math.isfinite(radius) and radius > 0)
    ):
        raise ValueError(f"radius must be a finite number > 0 (input units), got {radius!r}")
