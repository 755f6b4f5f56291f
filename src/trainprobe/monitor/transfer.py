"""Device values -> host records: one transfer per device per flush."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..probes.base import OnHost, PerLayer, Value
from ..store import Record

_HOST_DTYPE = {torch.bool: np.bool_}


def _collect(pending: Sequence[tuple[int, Mapping[str, Value]]]) -> dict[torch.device, list]:
    """Tensors to move, grouped by device: ``[(record index, key, tensor), ...]``."""
    groups: dict[torch.device, list] = {}
    for index, (_, values) in enumerate(pending):
        for key, value in values.items():
            tensor = value.values if isinstance(value, (PerLayer, OnHost)) else value
            if isinstance(tensor, Tensor):
                groups.setdefault(tensor.device, []).append((index, key, tensor.detach()))
    return groups


def _to_numpy(items: list, device: torch.device) -> list[np.ndarray]:
    """Host copies of ``items``' tensors; one ``cat`` and one copy for non-CPU devices."""
    if device.type == "cpu":  # numpy has no bfloat16: widen those
        return [(t.float() if t.dtype == torch.bfloat16 else t).numpy() for _, _, t in items]
    wide = torch.float32 if device.type == "mps" else torch.float64
    flat = torch.cat([t.reshape(-1).to(wide) for _, _, t in items])  # [sum numel]
    host = flat.cpu().numpy()  # deliberate sync: the one transfer of this flush
    out, offset = [], 0
    for _, _, t in items:
        chunk = host[offset : offset + t.numel()].reshape(tuple(t.shape))
        offset += t.numel()
        kind = _HOST_DTYPE.get(t.dtype)
        out.append(chunk.astype(kind) if kind is not None else chunk)
    return out


def _expand(key: str, value: Value, host: np.ndarray | None) -> dict[str, float | np.ndarray]:
    if isinstance(value, OnHost):
        finished = {
            k: float(v) if np.ndim(v) == 0 else np.asarray(v, dtype=np.float64)
            for k, v in value.finish(host).items()
        }
        prefix = key.split("/", 1)[0] + "/"
        stray = [k for k in finished if not k.startswith(prefix)]
        if stray:
            raise ValueError(
                f"{key}: OnHost.finish wrote keys {stray} outside '{prefix}'; a probe's "
                "keys must start with its name"
            )
        return finished
    if isinstance(value, PerLayer):
        numbers = host.astype(np.float64).reshape(-1)
        if len(value.names) != numbers.shape[0]:
            raise ValueError(
                f"{key}: PerLayer has {len(value.names)} names but {numbers.shape[0]} values; "
                "give one name per entry of the [L] tensor"
            )
        return {f"{key}/{name}": float(x) for name, x in zip(value.names, numbers, strict=True)}
    if host is None:
        return {key: float(value)}
    if host.ndim == 0:
        return {key: float(host)}
    return {key: np.array(host)}


def to_host(
    pending: Sequence[tuple[int, Mapping[str, Value]]],
    on_error: Callable[[str, Exception], None],
) -> list[Record]:
    """Records with every tensor value moved to the host (floats and numpy arrays).

    A value that fails to expand is left out and reported as ``on_error(key, err)``,
    which may raise; the other values are kept.
    """
    hosted: dict[tuple[int, str], np.ndarray] = {}
    for device, items in _collect(pending).items():
        for (index, key, _), array in zip(items, _to_numpy(items, device), strict=True):
            hosted[(index, key)] = array
    records = []
    for index, (step, values) in enumerate(pending):
        flat: dict[str, float | np.ndarray] = {}
        for key, value in values.items():
            try:
                flat.update(_expand(key, value, hosted.get((index, key))))
            except Exception as err:
                on_error(key, err)
        records.append(Record(step, flat))
    return records
