"""The dashboard's registry (``dashboard.panels``): each row's key patterns are declared once,
beside its function, and the registry only references them."""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

import trainprobe.dashboard
from tests.synth import write_run
from trainprobe.dashboard import PANELS, build

PACKAGE = Path(trainprobe.dashboard.__file__).parent
KEY_LITERAL = re.compile(r"^[a-z_]+/")
"""A string that starts like a record key (``norms/grad``, ``regions/*/layer/*``)."""


def needs_name(func) -> str:
    """``loss_panel`` -> ``LOSS_NEEDS``; ``grad_heatmap`` -> ``GRAD_HEATMAP_NEEDS``."""
    return func.__name__.removesuffix("_panel").upper() + "_NEEDS"


def key_literals(path: Path) -> list[tuple[str, int]]:
    """Key-like string constants of a module and their lines, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docs
        and KEY_LITERAL.match(node.value)
    ]


def test_every_row_reads_the_patterns_declared_beside_its_function():
    for panel in PANELS:
        func = getattr(panel.func, "func", panel.func)  # the catch-all row is a partial
        module = sys.modules[func.__module__]
        declared = getattr(module, needs_name(func), None)
        assert declared is panel.needs, (
            f"row {panel.name!r}: needs must be {module.__name__}.{needs_name(func)}, "
            f"declared beside {func.__name__}"
        )


def test_each_key_literal_is_spelled_in_one_place():
    seen: dict[str, list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.glob("*.py")):
        for literal, line in key_literals(path):
            seen[literal].append(f"{path.name}:{line}")
    assert seen, "the scan found no key literal at all"
    twice = {literal: where for literal, where in seen.items() if len(where) > 1}
    assert twice == {}, f"key literals spelled more than once: {twice}"
    assert key_literals(PACKAGE / "panels.py") == []


def test_the_empty_page_names_the_families_the_rows_read(tmp_path):
    note = build(write_run(tmp_path / "r", {})).layout.annotations[0].text
    for family in ("scalars/*", "norms/*", "hessian_density/*", "regions/*", "nonfinite/*"):
        assert family in note
