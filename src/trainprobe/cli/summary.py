"""The series summary of ``trainprobe report``: one line per recorded key (100 columns),
per-layer (per-group, per-pair) keys folded; and the same as JSON-ready data."""

from __future__ import annotations

import textwrap

import numpy as np

from ..store import Run

WIDTH = 100
_INDENT = " " * 4

GROUP_MIN = 4
"""Per-layer keys ``probe/metric/<layer>`` (three parts or more) are folded into one line
``probe/metric/*`` when their ``probe/metric`` prefix holds at least this many scalar keys;
fewer are listed one per line. Keys of two parts (``scalars/loss``) are never folded."""

_NUM = 9  # width of a number column: "-1.23e+05"
_ELLIPSIS = "..."


def _shorten(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters (both ends carry the meaning)."""
    if len(text) <= width:
        return text
    keep = width - len(_ELLIPSIS)
    head = (keep + 1) // 2
    return text[:head] + _ELLIPSIS + text[len(text) - (keep - head) :]


def _num(value: float) -> str:
    """3 significant digits; ``inf``/``-inf`` kept apart from ``nan`` (overflow is not NaN)."""
    if value is None or np.isnan(value):
        return "nan"
    return f"{value:.3g}"  # Python formats infinities as inf / -inf


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _kind(run: Run, key: str) -> str:
    return run._key(key)[1]  # "scalar" | "array"; Run keeps it private


def _scalar_stats(series) -> dict:
    values = series.values
    finite = values[np.isfinite(values)]
    n = len(series)
    return {
        "key": series.key,
        "points": n,
        "first_step": int(series.steps[0]) if n else None,
        "last_step": int(series.steps[-1]) if n else None,
        "first": float(values[0]) if n else float("nan"),
        "last": float(values[-1]) if n else float("nan"),
        "min": float(finite.min()) if finite.size else float("nan"),
        "max": float(finite.max()) if finite.size else float("nan"),
        "nonfinite": int(n - finite.size),
    }


def _array_stats(run: Run, key: str) -> dict:
    steps, arrays = run.arrays(key)
    shapes = sorted({tuple(a.shape) for a in arrays})
    return {
        "key": key,
        "points": int(steps.size),
        "first_step": int(steps[0]) if steps.size else None,
        "last_step": int(steps[-1]) if steps.size else None,
        "shapes": [list(s) for s in shapes],
    }


def _collect(run: Run) -> tuple[list[dict], list[dict]]:
    scalars, arrays = [], []
    names = run.keys()  # Run has no __iter__
    for key in names:
        if _kind(run, key) == "scalar":
            scalars.append(_scalar_stats(run.series(key)))
        else:
            arrays.append(_array_stats(run, key))
    return scalars, arrays


def summary_dict(run: Run) -> dict:
    """Every recorded series of ``run`` as JSON-ready data (no folding of layers).

    Returns:
        ``{"scalars": [{key, points, first_step, last_step, first, last, min, max,
        nonfinite}], "arrays": [{key, points, first_step, last_step, shapes}]}``, keys in
        recording order. Non-finite ``first``/``last`` and the statistics of an all-NaN
        series are ``None`` (JSON has no NaN); ``min``/``max`` ignore NaN and inf.
    """
    scalars, arrays = _collect(run)
    for row in scalars:
        for field in ("first", "last", "min", "max"):
            row[field] = _finite_or_none(row[field])
    return {"scalars": scalars, "arrays": arrays}


def _fold(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """``(label, rows)`` in recording order: single keys alone, big per-layer groups folded."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        parts = row["key"].split("/", 2)
        if len(parts) == 3:
            groups.setdefault(f"{parts[0]}/{parts[1]}", []).append(row)
    out, done = [], set()
    for row in rows:
        parts = row["key"].split("/", 2)
        prefix = f"{parts[0]}/{parts[1]}" if len(parts) == 3 else None
        if prefix is None or len(groups[prefix]) < GROUP_MIN:
            out.append((row["key"], [row]))
        elif prefix not in done:
            done.add(prefix)
            out.append((f"{prefix}/*", groups[prefix]))
    return out


def _steps_range(first: int | None, last: int | None) -> str:
    if first is None:
        return "-"
    return str(first) if first == last else f"{first}-{last}"


def format_summary(run: Run, *, width: int = WIDTH) -> str:
    """A compact table of every recorded series, one line per key, fitting ``width`` columns.

    Scalar series show the number of points, the step range and the first, last, min and max
    value (min/max ignore NaN and inf; a footer lists the keys holding non-finite values).
    Per-layer keys ``probe/metric/<layer>`` (or per group, ``conflict/loss/<group>``, or per
    pair) are folded into one ``probe/metric/*`` line when there are :data:`GROUP_MIN` or
    more of them: points and steps are those of the longest, first and last the median over
    them, min and max over all; an indented line under it names how many layers (groups,
    pairs) there are and which hold the min and the max. Long
    keys are shortened in the middle. Array series (e.g. ``hessian_density/density``) are
    listed with their per-step shape.

    Args:
        run: the run to summarise (read only).
        width: the line width to fit (at least 60).

    Returns:
        The table as one string (no trailing newline).

    Raises:
        ValueError: ``width`` is below 60, too narrow for the numbers.
    """
    if width < 60:
        raise ValueError(f"format_summary(width={width}) is too narrow; pass width=60 or more")
    scalars, arrays = _collect(run)
    if not scalars and not arrays:
        return "Series: none recorded yet."
    fixed = 6 + 11 + 4 * _NUM + 2 * 6  # points, steps, 4 numbers, 6 gaps of 2
    kw = width - fixed
    lines = [f"Series: {len(scalars)} scalar, {len(arrays)} array"]
    if scalars:
        head = ("key", "points", "steps", "first", "last", "min", "max")
        lines.append(_row(head, kw))
    for label, rows in _fold(scalars):
        if len(rows) == 1:
            r = rows[0]
            cells = (
                label,
                r["points"],
                _steps_range(r["first_step"], r["last_step"]),
                _num(r["first"]),
                _num(r["last"]),
                _num(r["min"]),
                _num(r["max"]),
            )
            lines.append(_row(cells, kw))
            continue
        longest = max(rows, key=lambda r: r["points"])
        lo = _extreme(rows, "min", min)
        hi = _extreme(rows, "max", max)
        cells = (
            label,
            longest["points"],
            _steps_range(longest["first_step"], longest["last_step"]),
            _num(_median(rows, "first")),
            _num(_median(rows, "last")),
            _num(lo["min"] if lo else float("nan")),
            _num(hi["max"] if hi else float("nan")),
        )
        lines.append(_row(cells, kw))
        head_len = len(label) - 1  # the layer name follows "probe/metric/"
        noun = _member_noun(run, label[:-2], [r["key"][head_len:] for r in rows])
        detail = f"{len(rows)} {noun}; first/last: median over {noun}"
        if lo and hi:
            lo_name = _shorten(lo["key"][head_len:], 28)
            hi_name = _shorten(hi["key"][head_len:], 28)
            detail += f"; min in {lo_name}, max in {hi_name}"
        lines.append(_shorten("      " + detail, width))
    for a in arrays:
        shapes = a["shapes"]
        shape = "x".join(map(str, shapes[0])) if len(shapes) == 1 else "varies"
        if len(shapes) > 1:
            shape += f" ({len(shapes)} shapes)"
        steps = _steps_range(a["first_step"], a["last_step"])
        lines.append(
            _row((a["key"], a["points"], steps, f"array [{shape}]", "", "", ""), kw).rstrip()
        )
    bad = [r for r in scalars if r["nonfinite"]]
    if bad:
        text = "non-finite values in: " + ", ".join(
            f"{r['key']} ({r['nonfinite']} of {r['points']})" for r in bad
        )
        lines.extend(textwrap.wrap(text, width, subsequent_indent=_INDENT))
    return "\n".join(lines)


_NOUNS = {"param": "layers", "module": "layers", "group": "groups", "a": "pairs"}
"""What the members of folded keys are, by the placeholder of the declared key pattern."""


def _member_noun(run: Run, prefix: str, members: list[str]) -> str:
    """``"layers"``, ``"groups"`` (``conflict/loss/<group>``) or ``"pairs"``
    (``conflict/cos/<a>__<b>``) for the keys ``prefix/<member>``: from the pattern a probe
    declared in the run's metadata, else guessed from the key."""
    for probe in run.meta.get("probes") or []:
        for pattern, *_ in probe.get("keys") or [] if isinstance(probe, dict) else []:
            if isinstance(pattern, str) and pattern.startswith(f"{prefix}/<"):
                return _NOUNS.get(pattern[len(prefix) + 2 :].split(">")[0], "members")
    if all("__" in member for member in members):
        return "pairs"
    if prefix.startswith(("conflict/", "attribution/")) and "layer_" not in prefix:
        return "groups"
    return "layers"


def _row(cells: tuple, key_width: int) -> str:
    key, points, steps, *nums = cells
    array_row = nums[1:] == ["", "", ""]  # the shape spans the number columns
    tail = f"  {nums[0]}" if array_row else "".join(f"  {n:>{_NUM}}" for n in nums)
    return f"{_shorten(str(key), key_width):<{key_width}}  {points!s:>6}  {steps:>11}{tail}"


def _median(rows: list[dict], field: str) -> float:
    values = np.array([r[field] for r in rows], dtype=float)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


def _extreme(rows: list[dict], field: str, pick) -> dict | None:
    finite = [r for r in rows if np.isfinite(r[field])]
    return pick(finite, key=lambda r: r[field]) if finite else None
