"""Typed blobs for array-valued records: dtype and shape travel with the bytes."""

from __future__ import annotations

import json

import numpy as np

_ALLOWED_KINDS = frozenset("biuf")  # bool, signed/unsigned int, float


def encode_array(value: np.ndarray) -> tuple[str, str, bytes]:
    """Encode an array as ``(dtype, shape_json, little-endian bytes)``.

    Raises:
        TypeError: if the dtype is not bool, integer or floating point.
    """
    arr = np.asarray(value)
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise TypeError(
            f"array records must be bool, integer or float, got dtype {arr.dtype}; "
            "convert the value to a numeric array before recording it"
        )
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return little.dtype.str, json.dumps(list(arr.shape)), np.ascontiguousarray(little).tobytes()


def decode_array(dtype: str, shape: str, data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_array`; returns a native-endian, writable array."""
    arr = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)
