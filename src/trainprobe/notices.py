"""Warnings that point at the user's line, whichever path inside trainprobe raised them."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parents[1])
"""The trainprobe package's folder: frames inside it are not the user's."""


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside trainprobe (and ``contextlib``), so a
    warning points at the user's line, whatever path inside the library raised it."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = str(Path(frame.f_code.co_filename).resolve())
        if not name.startswith(_PACKAGE) and not name.endswith("contextlib.py"):
            return level
        frame, level = frame.f_back, level + 1
    return level


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` pointing at the user's line (see :func:`user_stacklevel`)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
