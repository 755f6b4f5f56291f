"""The exact number of linear pieces of a ReLU network along segments of input space.

Along ``x(t) = a + t (b − a)``, ``t ∈ [0, 1]``, a network whose nonlinearities are
ReLU/LeakyReLU/PReLU is piecewise affine in ``t``. Within one piece the activation
pattern is fixed, so every pre-activation is affine, ``z_n(t) = α_n + β_n t``, and the
piece ends at the first ``t`` where some ``z_n`` reaches zero heading to the other side.
Walking from ``t = 0`` to ``1`` one breakpoint at a time counts the pieces exactly (up
to floating-point roundoff; float64 by default), as in the exact line counts of Hanin &
Rolnick 2019, "Complexity of Linear Regions in Deep Networks".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..functional import call, rng_fork, semantics, unwrap
from ._hooks import PinnedPatterns, pattern_modules, remove

_OWNER = "segment_pieces"


@dataclass(frozen=True)
class SegmentPieces:
    """Activation regions crossed by each segment.

    Attributes:
        pieces: ``[S]`` pieces per segment (1 + breakpoints inside ``(0, 1)``), int64.
        breakpoints: ``[S, K]`` the breakpoints ``t`` in ascending order, NaN-padded
            (``K`` the most breakpoints of any segment).
    """

    pieces: Tensor  # [S]
    breakpoints: Tensor  # [S, K]


def segment_pieces(
    model: nn.Module,
    a: Tensor,
    b: Tensor,
    *,
    max_steps: int = 10_000,
    dtype: torch.dtype = torch.float64,
) -> SegmentPieces:
    """Pieces of the activation pattern along each segment ``a[s] → b[s]``, exactly.

    The walk pins the pattern of the current piece (the activations' outputs become
    ``where(mask, z, slope · z)``), so the pinned network is affine and one forward of
    both ends gives every ``α_n = z_n(a)`` and ``β_n = z_n(b) − z_n(a)``. The next
    breakpoint is ``t* = min {−α_n / β_n : neuron n heading across zero}`` over the
    neurons of all layers; every neuron reaching zero at ``t*`` flips (neurons downstream
    are continuous at ``t*`` and keep their state) and the walk goes on from ``t*``. Each
    piece costs one forward of ``2S`` rows, all segments in parallel.

    A piece is an activation region; consecutive regions give the network's output
    different affine maps except in degenerate cases (a neuron with zero outgoing
    weights, a LeakyReLU of slope 1), so ``pieces`` bounds the output's affine pieces
    from above and equals them generically. Max-pools are not supported.

    Evaluated in eval mode with ``dtype`` copies of the parameters and buffers, without
    gradients, the global RNG forked; nothing of the model changes.

    Args:
        model: piecewise linear with ``nn.ReLU``/``nn.LeakyReLU``/``nn.PReLU`` modules.
        a: ``[S, *shape]`` segment starts.
        b: ``[S, *shape]`` segment ends.
        max_steps: walk steps allowed (one per piece, plus one per exact tie at a
            breakpoint).
        dtype: compute dtype.

    Raises:
        ValueError: ``a`` and ``b`` not matching floating tensors, ``max_steps`` not a
            positive integer or exceeded, a max-pool, or a model that is not piecewise
            linear.
    """
    _check(a, b, max_steps)
    model = unwrap(model)  # the eager module: hooks run, no recompiles
    segments = len(a)
    pinned = PinnedPatterns(pattern_modules(model, _OWNER, pools=False), 2 * segments, _OWNER)
    tensors = {
        name: t.detach().to(dtype) if t.is_floating_point() else t
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    ends = torch.cat([a, b]).to(dtype)  # [2S, *shape]: rows s and S + s bound segment s

    sizes: list[int] = []  # neurons per call, from the first (free) forward

    def forward(mask: Tensor | None) -> list[Tensor]:
        pinned.masks = None if mask is None else [m.repeat(2, 1) for m in mask.split(sizes, 1)]
        pinned.values = []
        call(model, tensors, (ends,))
        sizes[:] = [v.shape[1] for v in pinned.values]
        return pinned.values

    handles = pinned.attach()
    try:
        with torch.no_grad(), semantics(model, "eval"), rng_fork(a.device):
            return _walk(forward, segments, max_steps)
    finally:
        remove(handles)


def _walk(
    forward: Callable[[Tensor | None], list[Tensor]], segments: int, max_steps: int
) -> SegmentPieces:
    """Breakpoints of every segment, all walked in parallel (see ``segment_pieces``)."""
    free = forward(None)
    mask = torch.cat([z[:segments] > 0 for z in free], dim=1)  # [S, F]: the pattern at a
    t = torch.zeros(segments, dtype=free[0].dtype, device=mask.device)  # [S]
    pieces = torch.ones(segments, dtype=torch.int64, device=mask.device)  # [S]
    found: list[Tensor] = []
    for _ in range(max_steps):
        z = torch.cat(forward(mask), dim=1)  # [2S, F] pinned pre-activations
        alpha, beta = z[:segments], z[segments:] - z[:segments]  # [S, F] each
        heading = torch.where(mask, beta < 0, beta > 0)  # [S, F]: moving to the other side
        root = torch.where(heading, -alpha / torch.where(heading, beta, 1), torch.inf)
        stale = root <= t[:, None]  # [S, F]: off its side already (a tie, or z(a) = 0)
        fix = stale.any(dim=1)  # [S]: these rows only correct their pattern
        nearest = root.amin(dim=1)  # [S]
        crossing = ~fix & (nearest < 1)  # [S]
        if not (fix.any() or crossing.any()):  # deliberate sync: one per step of the walk
            return SegmentPieces(pieces, _ascending(found, pieces))
        flip = torch.where(fix[:, None], stale, crossing[:, None] & (root <= nearest[:, None]))
        mask = mask ^ flip
        t = torch.where(crossing, nearest, t)
        pieces = pieces + crossing
        found.append(torch.where(crossing, nearest, torch.nan))  # [S]
    raise ValueError(
        f"segment_pieces: the segments cross more than max_steps={max_steps} regions; "
        "raise max_steps= or use shorter segments"
    )


def _ascending(found: list[Tensor], pieces: Tensor) -> Tensor:
    """``[S, K]`` breakpoints per segment, ascending, NaN-padded."""
    if not found:
        return torch.zeros(len(pieces), 0, dtype=torch.float64, device=pieces.device)
    stacked = torch.stack(found, dim=1).sort(dim=1).values  # NaN sorts last
    return stacked[:, : int(pieces.max()) - 1]  # deliberate sync: the width of the result


def _check(a: object, b: object, max_steps: object) -> None:
    ok = isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point()
    if not ok or a.shape != b.shape or a.ndim < 2 or len(a) == 0:
        shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in (a, b)]
        raise ValueError(
            f"segment_pieces: a and b must be floating tensors of one shape [S, *shape] with "
            f"S >= 1 (segment starts and ends, batch first), got {shapes[0]} and {shapes[1]}"
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"segment_pieces: max_steps must be an integer >= 1, got {max_steps!r}")
