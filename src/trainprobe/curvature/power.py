"""Power iteration for the eigenvalue of largest magnitude of a symmetric operator."""

from __future__ import annotations

import torch
from torch import Tensor

from ..notices import warn_user
from .lanczos import Eigenpairs, _start
from .operator import Operator, as_matvec, operator_placement


def power_iteration(
    operator: Operator,
    dim: int,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Eigenpairs:
    """The eigenvalue of largest magnitude by power iteration: a cheap fallback.

    ``v ← A v / ||A v||``, ``θ = vᵀ A v``; stops when the residual ``||A v − θ v||``
    is at most ``tol · |θ|``. It needs no basis (``O(n)`` memory), but converges
    at the rate ``|λ_2 / λ_1|`` per product, and finds the largest *magnitude*
    (a large negative eigenvalue wins over the top one): prefer :func:`lanczos`.

    Returns:
        :class:`Eigenpairs` with one value.

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.tensor([4.0, 3.0, -1.0], dtype=torch.float64))
        >>> pair = power_iteration(A, 3, tol=1e-10, max_iter=500)
        >>> round(float(pair.values[0]), 6), pair.converged
        (4.0, True)

        The largest *magnitude* wins, not the largest value:

        >>> B = torch.diag(torch.tensor([1.0, 0.5, -3.0], dtype=torch.float64))
        >>> round(float(power_iteration(B, 3, tol=1e-10, max_iter=500).values[0]), 6)
        -3.0
    """
    matvec = as_matvec(operator, dim)
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got {tol!r}, {max_iter!r}")
    device, in_dtype = operator_placement(operator, device, dtype)
    v = _start(dim, start, generator, device)  # [n] float64, unit
    theta, residual, converged, count = 0.0, float("inf"), False, 0
    while count < max_iter:
        count += 1
        w = matvec(v.to(in_dtype)).detach().to(torch.float64).reshape(-1)  # [n]
        theta = float(v @ w)  # deliberate sync: the stopping test is on the host
        residual = float(torch.linalg.vector_norm(w - theta * v))
        converged = residual <= tol * abs(theta)
        norm = torch.linalg.vector_norm(w)
        if converged or not norm > 0:
            break
        v = w / norm
    if not converged:
        warn_user(
            f"power_iteration: not converged after {max_iter} products (residual "
            f"{residual:.3g}, wanted <= {tol * abs(theta):.3g}); use lanczos",
            RuntimeWarning,
        )
    return Eigenpairs(
        values=torch.tensor([theta], dtype=torch.float64),
        vectors=v.reshape(-1, 1),
        residuals=torch.tensor([residual], dtype=torch.float64),
        matvecs=count,
        converged=converged,
    )
