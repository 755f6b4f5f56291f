"""Record keys, the one contract between probes, detectors and panels (DESIGN.md §2).

A key is ``probe/metric[/layer]``: the probe's name and the metric are lower_snake
(lowercase letters and digits in words joined by single ``_``); the layer parts that may
follow name a parameter, a module, a group or a data set, so they may hold any printable
character but ``/`` (parameter and module names hold dots, capitals and digits), e.g.
``hessian/eig_0``, ``norms/grad/encoder.0.weight``, ``regions/train/layer/net.1``.

A probe declares the keys it writes as :class:`Key` patterns, whose ``<placeholder>``
segments stand for what varies (``hessian/eig_<i>``, ``norms/grad/<param>``); the monitor
refuses a value whose key matches none of its probe's patterns.

Only the standard library is imported here: every floor may read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")
"""A lower_snake name: a probe's name, a metric, a group or task name written into keys."""

_LAYER = r"[^/\x00-\x1f\x7f]+"
KEY = re.compile(rf"{NAME.pattern}/{NAME.pattern}(?:/{_LAYER})*")
"""A record key: ``probe/metric`` in lower_snake, then any layer parts (no empty part)."""

_PLACEHOLDER = re.compile(r"<[a-z_]+>")


def is_name(name: object) -> bool:
    """Whether ``name`` is a lower_snake string (see :data:`NAME`)."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def check_name(name: object, what: str) -> str:
    """``name`` when it is lower_snake, else a ``ValueError`` that names ``what``.

    Examples:
        >>> check_name("grad_subspace_top1", "GradientSubspace(name=...)")
        'grad_subspace_top1'
    """
    if not is_name(name):
        raise ValueError(
            f"{what}: {name!r} is not a lower_snake name (lowercase letters and digits in "
            "words joined by single '_', e.g. 'grad_subspace_top1'); record keys need one"
        )
    return name  # type: ignore[return-value]


def check_key(key: object) -> str:
    """``key`` when it is ``probe/metric[/layer]`` (see :data:`KEY`), else a ``ValueError``.

    Examples:
        >>> check_key("norms/grad/encoder.0.weight")
        'norms/grad/encoder.0.weight'
    """
    if not (isinstance(key, str) and KEY.fullmatch(key)):
        raise ValueError(
            f"record key {key!r} is not 'probe/metric[/layer]' with a lower_snake probe and "
            "metric (e.g. 'hessian/eig_0', 'norms/grad/encoder.0.weight')"
        )
    return key


def _segment_regex(segment: str, *, layer: bool) -> str:
    """A pattern segment as a regex: literal text, ``<placeholder>`` as a wildcard (within
    the segment in the probe and metric parts; any layer text, ``/`` included, after)."""
    wildcard = ".+" if layer else "[^/]+"
    pieces = _PLACEHOLDER.split(segment)
    return wildcard.join(re.escape(piece) for piece in pieces)


@dataclass(frozen=True)
class Key:
    """A family of keys a probe writes: ``pattern`` with ``<placeholder>`` segments, and
    what its values mean (one line).

    The pattern's first part is the probe's name; :meth:`under` moves the family to
    another name (a probe given ``name=``).

    Examples:
        >>> key = Key("hessian/eig_<i>", "the i-th largest eigenvalue")
        >>> key.matches("hessian/eig_3"), key.matches("hessian/bottom_0")
        (True, False)
        >>> key.under("hessian_top5").pattern
        'hessian_top5/eig_<i>'
    """

    pattern: str
    meaning: str

    def __post_init__(self) -> None:
        parts = self.pattern.split("/")
        plain = [_PLACEHOLDER.sub("x", part) for part in parts]
        if len(parts) < 2 or not is_name(parts[0]) or not all(plain) or not is_name(plain[1]):
            raise ValueError(
                f"Key pattern {self.pattern!r}: expected 'probe/metric[/layer]' with a "
                "lower_snake probe name, a lower_snake metric (placeholders like <i> allowed) "
                "and placeholders written <lower_snake>"
            )
        if "<" in "".join(_PLACEHOLDER.sub("", part) for part in parts):
            raise ValueError(f"Key pattern {self.pattern!r}: a '<' outside a <placeholder>")
        regex = "/".join(
            _segment_regex(part, layer=i >= 2) for i, part in enumerate(self.pattern.split("/"))
        )
        object.__setattr__(self, "_regex", re.compile(regex))

    @property
    def probe(self) -> str:
        """The probe name the pattern starts with."""
        return self.pattern.split("/", 1)[0]

    def matches(self, key: str) -> bool:
        """Whether ``key`` belongs to this family."""
        return self._regex.fullmatch(key) is not None  # type: ignore[attr-defined]

    def under(self, name: str) -> Key:
        """The same family for a probe named ``name``."""
        if name == self.probe:
            return self
        return Key(f"{name}/{self.pattern.split('/', 1)[1]}", self.meaning)


def matching(keys: tuple[Key, ...], key: str) -> Key | None:
    """The first of ``keys`` that ``key`` matches, or None."""
    return next((k for k in keys if k.matches(key)), None)
