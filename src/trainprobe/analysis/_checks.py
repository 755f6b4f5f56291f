"""Argument validation shared by the detectors: every error names the value and the fix."""

from __future__ import annotations

import math


def check_window(name: str, value: int, *, minimum: int = 3) -> None:
    """Require an integer window of at least ``minimum`` points.

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of points, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(
            f"{name} must be at least {minimum} points for a median to mean anything, got "
            f"{value}; pass {name}={minimum} or more"
        )


def check_count(name: str, value: int, *, minimum: int, what: str) -> None:
    """Require an integer count (not a window) of at least ``minimum``.

    Args:
        name: the argument's name.
        value: the value given.
        minimum: the smallest allowed count.
        what: what the count counts, for the message (e.g. ``"layers to name"``).

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (the number of {what}), got {type(value).__name__}")
    if value < minimum:
        raise ValueError(
            f"{name} must be at least {minimum} (the number of {what}), got "
            f"{value}; pass {name}={minimum} or more"
        )


def check_positive(name: str, value: float) -> None:
    """Require a finite number ``> 0``.

    Raises:
        ValueError: ``value`` is not finite or not positive.
    """
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_fraction(name: str, value: float) -> None:
    """Require ``0 <= value < 1``.

    Raises:
        ValueError: ``value`` is outside ``[0, 1)``.
    """
    if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")


def check_below(low_name: str, low: float, high_name: str, high: float) -> None:
    """Require ``low < high`` for a pair of thresholds.

    Raises:
        ValueError: ``low >= high``.
    """
    if not low < high:
        raise ValueError(
            f"{low_name} ({low!r}) must be smaller than {high_name} ({high!r}); swap or change them"
        )
