"""The layering beyond what import-linter checks, read from the source with :mod:`ast`.

``lint-imports`` (the contracts in ``pyproject.toml``) checks which modules import which. It
cannot see *names*: ``from ..curvature.hvp import _objective`` imports a public module, yet it
couples two packages through a private detail. Here:

- no module imports a private name (one starting with ``_``, dunders aside) or anything from a
  private module (a dotted path with a part starting with ``_``) from another top-level
  subpackage of trainprobe; inside one subpackage, private imports are its own business;
- at import time a module imports only the standard library, trainprobe and the declared
  dependencies, so that importing any module (``--doctest-modules`` imports them all) works
  without the optional extras (pandas, pyarrow, safetensors, ...).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "trainprobe"
EXEMPT_MODULES = frozenset({"__future__", "trainprobe._version"})
"""Private by name only: ``__future__`` is the language's, ``_version`` holds ``__version__``
for everyone (it is private so that it is not mistaken for API)."""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top(module: str) -> str:
    """``trainprobe.probes.hessian`` -> ``probes``; ``trainprobe.notices`` -> ``notices``;
    the root ``trainprobe`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` statement reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _private_imports(path: Path, package: Path = PACKAGE) -> list[str]:
    """Each cross-package private import in ``path``, as ``file:line: statement``."""
    module = _module_name(path, package)
    is_package = path.name == "__init__.py"
    where = path.relative_to(package.parent.parent) if package == PACKAGE else path.name
    found = []

    def check(line: int, target: str, name: str | None) -> None:
        if target.split(".")[0] != "trainprobe" or target in EXEMPT_MODULES:
            return
        full = f"{target}.{name}" if name else target
        if full in EXEMPT_MODULES:  # `from trainprobe import _version`
            return
        # `from trainprobe import x` reads from x's package, not from the root's
        top = _top(full if name is not None and _top(target) == "" else target)
        if top == _top(module):
            return
        if any(_is_private(part) for part in target.split(".")) or (
            name is not None and _is_private(name)
        ):
            statement = f"from {target} import {name}" if name else f"import {target}"
            found.append(f"{where}:{line}: {statement}")

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(node.lineno, alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            for alias in node.names:
                check(node.lineno, target, alias.name)
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_scan_sees_the_package():
    assert (PACKAGE / "__init__.py").is_file()
    assert len(_modules()) > 50


def test_the_private_import_rule_on_a_small_package(tmp_path):
    """The checker itself: what it flags and what it lets through."""
    root = tmp_path / "trainprobe"
    files = {
        "__init__.py": "from ._version import __version__\nfrom .a import thing\n",
        "_version.py": "__version__ = '0'\n",
        "notices.py": "",
        "a/__init__.py": "from ._impl import thing\nfrom .mod import _own\n",
        "a/_impl.py": "thing = 1\n",
        "a/mod.py": "from . import _impl\n_own = 1\npublic = 2\n",
        "b/__init__.py": "",
        "b/user.py": (
            "from __future__ import annotations\n"
            "from ..a import thing\n"  # public name, public module: fine
            "from ..a.mod import public\n"  # fine
            "from ..a.mod import _own\n"  # 4: private name
            "from ..a._impl import thing\n"  # 5: private module
            "import trainprobe.a._impl\n"  # 6: private module
            "from .. import _version\n"  # exempt
            "from ..notices import warn_user\n"  # fine
            "from trainprobe.a import _impl\n"  # 9: private module, by name
            "from .. import _secret\n"  # 10: the root's private name
            "from torch import _C\n"  # not trainprobe's
            "def f():\n"
            "    from ..a.mod import _own\n"  # 13: inside a function too
        ),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    hits = _private_imports(root / "b" / "user.py", root)
    assert [hit.split(":")[1] for hit in hits] == ["4", "5", "6", "9", "10", "13"]
    for own in ("__init__.py", "a/__init__.py", "a/mod.py"):
        assert _private_imports(root / own, root) == []


def test_no_private_name_is_imported_across_packages():
    found = [hit for path in _modules() for hit in _private_imports(path)]
    assert not found, "private names imported across trainprobe's packages:\n" + "\n".join(found)


def _declared_dependencies() -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.match(r"[A-Za-z0-9_.-]+", req).group(0) for req in project["dependencies"]}
    return {name.lower().replace("-", "_") for name in names}


def _import_time_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, top-level name)`` of each absolute import run when the module is imported:
    not inside functions, ``if TYPE_CHECKING:`` or ``try: ... except ImportError``."""
    found: list[tuple[int, str]] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name.split(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.append((node.lineno, (node.module or "").split(".")[0]))
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
                if not caught & {"ImportError", "ModuleNotFoundError"}:
                    visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.ClassDef | ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def test_the_import_time_rule_on_a_small_module():
    source = (
        "import os, pandas\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import pyarrow\n"
        "try:\n"
        "    import safetensors\n"
        "except ImportError:\n"
        "    safetensors = None\n"
        "def load():\n"
        "    import lightning\n"
        "class Export:\n"
        "    import wandb\n"
        "from . import sibling\n"
    )
    found = _import_time_imports(ast.parse(source))
    assert found == [(1, "os"), (1, "pandas"), (2, "typing"), (12, "wandb")]


def test_modules_import_only_declared_dependencies_at_import_time():
    allowed = _declared_dependencies() | set(sys.stdlib_module_names) | {"trainprobe"}
    assert {"torch", "numpy"} <= allowed
    bad = [
        f"{path.relative_to(ROOT)}:{line}: import {name}"
        for path in _modules()
        for line, name in _import_time_imports(ast.parse(path.read_text(encoding="utf-8")))
        if name not in allowed
    ]
    assert not bad, (
        "an optional package imported at import time (import it inside the function that "
        "needs it, so that every module imports without the extras):\n" + "\n".join(bad)
    )
