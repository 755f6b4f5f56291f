"""Parameters and gradients seen as matrices, and the argument checks the spectra share.

A weight's singular values are those of the linear map it applies: a Linear weight
``[out, in]`` is that map; a convolution kernel ``[out, in, *k]`` maps each
``in·Πk`` input patch to ``out`` channels, so its matrix is ``[out, in·Πk]`` (the
unfolding spectral normalisation uses, Miyato et al. 2018: the per-patch map, not the
whole convolution over an image, whose spectrum Sedghi, Gupta & Long 2019 compute);
an embedding ``[num, dim]`` is a matrix as it is.
Biases, norm scales and other 1-D tensors are no matrices: the probes skip them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_matrix(tensor: Tensor) -> bool:
    """Whether ``tensor`` has a spectrum: at least 2-D and not empty."""
    return tensor.ndim >= 2 and tensor.numel() > 0


def as_matrix(tensor: Tensor) -> Tensor:
    """A parameter or gradient as a ``[rows, cols]`` matrix (a view where possible).

    - ``[out, in]`` (Linear, embeddings, recurrent weights): as is;
    - ``[out, in, *k]`` (Conv1d/2d/3d kernels): ``[out, in·Πk]``, rows = output
      channels. ConvTranspose kernels are stored ``[in, out/groups, *k]``: their rows
      are the *input* channels; grouped kernels give ``[out, in/groups·Πk]``.

    Args:
        tensor: ``[d0, d1, ...]`` with at least two dimensions and one element.

    Returns:
        ``[d0, d1·d2·...]``, sharing memory with ``tensor`` when it is contiguous.

    Raises:
        TypeError: ``tensor`` is not a tensor.
        ValueError: ``tensor`` is 0-D or 1-D (a bias or a norm scale has no
            spectrum; the spectra probes skip such parameters) or empty.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"as_matrix takes a tensor, got {type(tensor).__name__}")
    if not is_matrix(tensor):
        raise ValueError(
            f"as_matrix: a tensor of shape {tuple(tensor.shape)} is not a matrix; pass a "
            "weight with at least 2 dimensions and one element (biases and norm scales "
            "have no spectrum)"
        )
    return tensor.reshape(tensor.shape[0], -1)  # [rows, cols]


#: Gate blocks stacked in a recurrent ``weight_hh_l*`` by ``nn.RNNBase.mode``, in
#: PyTorch's order (``nn.RNN``'s modes ``RNN_TANH``/``RNN_RELU`` have a single block).
GATES = {"GRU": ("r", "z", "n"), "LSTM": ("i", "f", "g", "o"), "RNN_TANH": (), "RNN_RELU": ()}


def gate_blocks(matrix: Tensor, mode: str) -> dict[str, Tensor]:
    """The gate blocks of a recurrent weight ``[gates·H, cols]``: ``{gate: [H, cols]}``.

    ``nn.GRU`` stacks ``W_hr | W_hz | W_hn`` (reset, update, candidate), ``nn.LSTM``
    ``W_hi | W_hf | W_hg | W_ho`` (input, forget, cell candidate, output) along the
    rows of ``weight_hh_l*`` (``cols = H``, or the projection size of an LSTM with
    ``proj_size``). ``nn.RNN`` has one block, the matrix itself: ``{}``.

    Args:
        matrix: ``[gates·H, cols]`` recurrent weight (views are returned).
        mode: the module's ``mode``: ``"GRU"``, ``"LSTM"``, ``"RNN_TANH"``, ``"RNN_RELU"``.

    Raises:
        ValueError: an unknown ``mode``, or rows not a multiple of the gate count.
    """
    if mode not in GATES:
        raise ValueError(f"gate_blocks: mode must be one of {sorted(GATES)}, got {mode!r}")
    gates = GATES[mode]
    if gates and (matrix.ndim != 2 or matrix.shape[0] % len(gates)):
        raise ValueError(
            f"gate_blocks: a {mode} recurrent weight is [{len(gates)}·H, cols], got shape "
            f"{tuple(matrix.shape)}"
        )
    return dict(zip(gates, matrix.chunk(len(gates)) if gates else (), strict=True))


def check_matrix(matrix: object, owner: str) -> Tensor:
    """``matrix`` if it is a 2-D non-empty floating tensor; else a TypeError or ValueError."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"{owner} takes a 2-D tensor, got {type(matrix).__name__}")
    if matrix.ndim != 2 or matrix.numel() == 0:
        raise ValueError(
            f"{owner} takes a non-empty 2-D matrix, got shape {tuple(matrix.shape)}; "
            "reshape a parameter with as_matrix(tensor)"
        )
    if not matrix.is_floating_point():
        raise TypeError(f"{owner} takes a floating-point matrix, got {matrix.dtype}")
    return matrix


def compute_dtype(matrix: Tensor) -> torch.dtype:
    """float64 for float64 input, else float32 (half types have no SVD kernels)."""
    return torch.float64 if matrix.dtype == torch.float64 else torch.float32


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int ``>= minimum`` (bools refused); else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
