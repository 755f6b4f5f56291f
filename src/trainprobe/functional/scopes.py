"""The scopes every functional evaluation runs in; each restores what it touches.

:func:`semantics` sets module modes and BatchNorm flags for the duration of a call and
puts them back in ``finally``; :func:`rng_fork` forks the global RNG so nothing here
consumes it; :func:`differentiable_attention` pins scaled-dot-product attention to its
math kernel; :func:`full_float32` turns TensorFloat-32 off on CUDA; :func:`no_autocast`
turns the user's autocast off; :func:`evaluation` is the five together.
:func:`forward_ad_losses` is added by the forward-over-reverse HVP engines.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .loss import Mode


@contextmanager
def semantics(model: nn.Module, mode: Mode) -> Iterator[None]:
    """Evaluate ``model`` with ``mode`` semantics, restoring every flag afterwards.

    ``"eval"``: every module in eval mode (BatchNorm uses its running statistics,
    dropout is off). ``"train"``: every module in train mode, BatchNorm normalises
    with the batch statistics but its running statistics are not updated
    (``track_running_stats`` is off for the call).
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        model.train(mode == "train")
        if mode == "train":
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


def rng_fork(device: torch.device) -> AbstractContextManager:
    """Fork the global RNG (CPU and ``device``'s) so nothing here consumes it."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def differentiable_attention() -> AbstractContextManager:
    """Scaled-dot-product attention on its math kernel, the one with every derivative
    (the fused CPU and GPU kernels have no double backward or forward AD)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the old kernels are differentiable anyway
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """float32 matrix products and convolutions in full float32 on CUDA (TensorFloat-32
    off, both flags restored): with TF32, cuDNN's default, a float32 Hessian-vector
    product of a BatchNorm CNN on an H200 was 4.8e-5 off the float64 one and
    per-example gradients 4.2e-3 off a loop of single-example backward passes (1.9e-7 and
    5e-9 without; ``benchmarks/gpu.py``). A measurement must not inherit that error."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; same effect
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


_MSE_LOSS = torch.nn.functional.mse_loss


def _mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.mse_loss`` with the plain mean written as ``square(input - target).mean()``
    (the same value; other reductions and the legacy arguments go to torch's own)."""
    if reduction != "mean" or size_average is not None or reduce is not None or weight is not None:
        kwargs = {"weight": weight} if weight is not None else {}
        return _MSE_LOSS(input, target, size_average, reduce, reduction, **kwargs)
    if input.shape != target.shape:  # torch's warning about broadcasting, kept
        return _MSE_LOSS(input, target)
    return torch.square(input - target).mean()


@contextmanager
def forward_ad_losses() -> Iterator[None]:
    """``torch.nn.functional.mse_loss`` (``reduction="mean"``, which ``nn.MSELoss`` calls)
    as its composite for the duration: under forward-over-reverse its fused kernel raises
    "ZeroTensors are immutable" in ``jvp(grad(f))`` and crashes the process with a
    segmentation fault in ``linearize(grad(f))`` (torch 2.13). The composite has every
    derivative; ``reduction="sum"``, ``"none"`` and the other losses are unaffected.
    Code that imported ``mse_loss`` by name before the scope keeps torch's kernel."""
    functional = torch.nn.functional
    saved = functional.mse_loss
    functional.mse_loss = _mse_loss
    try:
        yield
    finally:
        functional.mse_loss = saved


def no_autocast(device: torch.device) -> AbstractContextManager:
    """Autocast off on ``device``: a probe measuring inside the user's ``torch.autocast``
    block computes in its own dtype (the parameters', or the probe's ``dtype=``), not in
    bf16/fp16 (a Hessian-vector product in bf16 has 3 significant digits)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to turn off
        return nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def evaluation(model: nn.Module, mode: Mode, device: torch.device | None = None) -> Iterator[None]:
    """:func:`rng_fork` (on ``device``, default the model's), :func:`semantics`,
    :func:`differentiable_attention` and :func:`full_float32` together: the scope of
    every functional call."""
    device = model_device(model) if device is None else device
    with ExitStack() as stack:
        stack.enter_context(rng_fork(device))
        stack.enter_context(no_autocast(device))
        stack.enter_context(full_float32(device))
        stack.enter_context(semantics(model, mode))
        stack.enter_context(differentiable_attention())
        yield
