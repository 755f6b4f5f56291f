"""``trainprobe report --set DETECTOR.PARAMETER=VALUE``: detector thresholds from the command
line, as the ``config`` of :func:`trainprobe.analysis.analyze` (which checks the names)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EXAMPLE = "exploding_gradients.jump_factor=20"


def parse_settings(items: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``["exploding_gradients.jump_factor=20"]`` -> ``{"exploding_gradients":
    {"jump_factor": 20}}``; a later setting of the same parameter wins.

    Raises:
        ValueError: an item is not ``DETECTOR.PARAMETER=VALUE``.

    Examples:
        >>> parse_settings(["loss_spike.window=100", "update_ratio.skip=*bias,*norm*"])
        {'loss_spike': {'window': 100}, 'update_ratio': {'skip': '*bias,*norm*'}}
    """
    config: dict[str, dict[str, Any]] = {}
    for item in items or ():
        name, equals, text = item.partition("=")
        detector, dot, parameter = name.strip().partition(".")
        if not (equals and dot and detector and parameter and text.strip()):
            raise ValueError(
                f"--set {item!r}: expected DETECTOR.PARAMETER=VALUE, e.g. --set {EXAMPLE}"
            )
        config.setdefault(detector, {})[parameter.strip()] = parse_value(text.strip())
    return config


def parse_value(text: str) -> bool | int | float | str:
    """``true``/``false`` (any case) as a bool, then an int, then a float, else the text.

    Examples:
        >>> [parse_value(t) for t in ("20", "1e-3", "0.5", "TRUE", "*bias")]
        [20, 0.001, 0.5, True, '*bias']
    """
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text
