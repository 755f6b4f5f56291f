"""Finding, reading and checking checkpoint files for :func:`trainprobe.scan.scan`.

A checkpoint file is one of :data:`SUFFIXES` directly inside the scanned directory
(not in sub-directories). It may hold:

- a raw ``state_dict`` (``{name: tensor}``), as ``torch.save(model.state_dict(), f)``;
- a checkpoint dict with the weights under ``model``, ``state_dict`` or
  ``model_state_dict``, optionally the optimizer state under ``optimizer`` or
  ``optimizer_state_dict`` and the step under ``step`` or ``global_step``;
- a safetensors file (needs the optional ``safetensors`` package);
- a whole pickled model (``torch.save(model, f)``): only with ``trust=True``, since
  unpickling it runs code from the file.

PyTorch files are read with ``torch.load(path, map_location="cpu", weights_only=True)``,
which refuses any Python object other than tensors and plain containers (a pickle that
would run code included). The step, first found in this order: a ``step`` or
``global_step`` entry; a number labelled ``step`` in the file name (``step500``,
``step_500``, ``step=500``, ``ckpt_epoch0_step1000.pt`` -> 1000); an ``epoch`` entry
(several checkpoints per epoch then collide, and the scan reports the repeats); the last
integer in the file name's stem (``ckpt_000500.pt`` -> 500).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: File name endings read as checkpoints.
SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_WEIGHT_KEYS = ("model", "state_dict", "model_state_dict")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict")
_STEP_KEYS = ("step", "global_step")
_LABELLED_STEP = re.compile(r"(?:global_)?step[_=-]?(\d+)", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Checkpoint:
    """The contents of one checkpoint file.

    Attributes:
        path: the file.
        step: the training step it was saved at.
        weights: ``{name: tensor}`` for ``model.load_state_dict``.
        optimizer_state: ``optimizer.state_dict()`` as saved, or None.
    """

    path: Path
    step: int
    weights: Mapping[str, Tensor]
    optimizer_state: Mapping[str, Any] | None = None


def find_checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint files directly inside ``ckpt_dir``, sorted by name.

    Raises:
        FileNotFoundError: ``ckpt_dir`` is not a directory.
    """
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {str(directory)!r} does not exist or is not a directory; "
            "pass the folder that holds the .pt/.pth/.bin/.safetensors files"
        )
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in SUFFIXES)


def step_from_name(path: Path) -> int | None:
    """A number labelled ``step`` in the stem (``step500_seed42.pt`` -> 500), else the last
    integer in it (``ckpt_000500.pt`` -> 500), or None."""
    labelled = _LABELLED_STEP.findall(path.stem)
    if labelled:
        return int(labelled[-1])
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else None


def load_checkpoint(path: str | Path, *, trust: bool = False, lazy: bool = False) -> Checkpoint:
    """Read one checkpoint file on the CPU.

    Args:
        path: a ``.pt``/``.pth``/``.bin`` (``torch.save``) or ``.safetensors`` file.
        trust: allow unpickling arbitrary Python objects (a whole saved model); this
            runs code from the file, so only for files from a trusted source.
        lazy: map the tensors' bytes from the file (``mmap``) instead of reading them,
            for a pass that needs only the step and the names (the scan's index of a
            directory). Only zip-format ``torch.save`` files map; legacy (pre-zip) and
            ``.safetensors`` files are read whole.

    Raises:
        CheckpointError: unreadable or truncated file, a pickle refused without
            ``trust``, no weights found, or no step in the file or its name.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raw = _read_safetensors(path)
    else:
        raw = _read_torch(path, trust, mmap=lazy and _is_zip(path))
    weights, optimizer_state, step = _unpack(path, raw)
    if step is None and _LABELLED_STEP.search(path.stem):
        step = step_from_name(path)
    if step is None and isinstance(raw, Mapping):
        step = _as_int(raw.get("epoch"))
    if step is None:
        step = step_from_name(path)
    if step is None:
        raise CheckpointError(
            f"{path.name}: no step: the checkpoint has no 'step'/'global_step'/'epoch' entry "
            "and the file name holds no number; rename it e.g. to step_500.pt"
        )
    return Checkpoint(path, step, weights, optimizer_state)


def _is_zip(path: Path) -> bool:
    """A ``torch.save`` file in the zip format (the default since torch 1.6), which mmaps."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _read_torch(path: Path, trust: bool, *, mmap: bool = False) -> Any:
    try:
        if trust:  # the user opted in (--trust-checkpoints): unpickling runs code from the file
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = _ANSI.sub("", str(err))
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text and found:
            what = f" (it references {found.group(1)})"
            raise CheckpointError(
                f"{path.name}: refused to unpickle: the file holds Python objects, not only "
                f"tensors{what}; if you trust this file (e.g. a whole model saved with "
                "torch.save(model)), pass trust_checkpoints=True (CLI: --trust-checkpoints), "
                "which runs code from the file"
            ) from err
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        reason = detail.group(1) if detail else _first_line(text)
        raise CheckpointError(
            f"{path.name}: unreadable or truncated (UnpicklingError: {reason})"
        ) from err
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(
            f"{path.name}: unreadable or truncated ({type(err).__name__}: "
            f"{_first_line(_ANSI.sub('', str(err)))})"
        ) from err


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise CheckpointError(
            f"{path.name}: reading .safetensors files needs the safetensors package: "
            "pip install safetensors"
        ) from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(
            f"{path.name}: unreadable safetensors file ({type(err).__name__}: "
            f"{_first_line(str(err))})"
        ) from err


def _unpack(path: Path, raw: Any) -> tuple[dict[str, Tensor], dict | None, int | None]:
    """``(weights, optimizer_state, step)`` of a loaded object."""
    if isinstance(raw, nn.Module):  # a whole pickled model (trusted)
        return dict(raw.state_dict()), None, None
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path.name}: expected a state_dict or a checkpoint dict, got {type(raw).__name__}"
        )
    weights: Any = raw
    for key in _WEIGHT_KEYS:
        if key in raw:
            weights = raw[key]
            weights = weights.state_dict() if isinstance(weights, nn.Module) else weights
            break
    if not isinstance(weights, Mapping) or not weights:
        raise CheckpointError(f"{path.name}: no weights found (an empty or non-dict state_dict)")
    tensors = {k: v for k, v in weights.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path.name}: no tensors found; expected a state_dict or a dict with one of "
            f"the entries {', '.join(_WEIGHT_KEYS)}"
        )
    optimizer = next((raw[k] for k in _OPTIMIZER_KEYS if isinstance(raw.get(k), Mapping)), None)
    step = next((_as_int(raw[k]) for k in _STEP_KEYS if _as_int(raw.get(k)) is not None), None)
    return _strip_prefix(tensors), optimizer, step


def _as_int(value: Any) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _strip_prefix(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that DistributedDataParallel adds to every name."""
    if all(k.startswith("module.") for k in weights):
        return {k[len("module.") :]: v for k, v in weights.items()}
    return weights


def check_weights(path: Path, weights: Mapping[str, Tensor], model: nn.Module) -> None:
    """Compare names and shapes with ``model.state_dict()`` before loading.

    Raises:
        CheckpointError: missing or unexpected names, or shapes that differ (listed).
    """
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    shapes = [
        f"{k}: checkpoint {list(weights[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if shapes:
        more = " ..." if len(shapes) > 5 else ""
        problems.append(f"wrong shapes ({'; '.join(shapes[:5])}{more})")
    if problems:
        raise CheckpointError(
            f"{path.name}: does not fit the model from model_fn: {', '.join(problems)}; "
            "check that --model builds the architecture that was saved"
        )


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > 5 else ''}]"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no message"
    return line[:200]
